"""The loopback Hetzner fake as a pytest fixture.

Register with ``pytest_plugins = ["tests.fakes.hetzner"]`` (or import the fixture); the fixture
yields a running ``FakeHetzner``: give ``fake_hetzner.url`` to ``hcloud.Client(api_endpoint=)``
or to ``HCLOUD_API_ENDPOINT``, and read ``fake_hetzner.servers`` to see what exists.

``FakeHetzner`` here is ``provisioning.localdev.fake_hetzner.FakeHetzner`` whose server loop
notices ``stop()`` within 20 ms: the default poll of 0.5 s is paid at every fixture teardown.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from provisioning.localdev import fake_hetzner as localdev

__all__ = ["FakeHetzner", "fake_hetzner"]


class FakeHetzner(localdev.FakeHetzner):
    def start(self) -> FakeHetzner:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.02,), name="fake-hetzner", daemon=True
        )
        self._thread.start()
        return self


@pytest.fixture
def fake_hetzner() -> Iterator[FakeHetzner]:
    with FakeHetzner(
        action_seconds=0.0, ssh_keys=("agent-provisioning-local", "provisioning-test", "k")
    ) as fake:
        yield fake
