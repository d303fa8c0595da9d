"""The loopback Hetzner fake as a pytest fixture.

Register with ``pytest_plugins = ["tests.fakes.hetzner"]`` (or import the fixture); the fixture
yields a running ``FakeHetzner``: give ``fake_hetzner.url`` to ``hcloud.Client(api_endpoint=)``
or to ``HCLOUD_API_ENDPOINT``, and read ``fake_hetzner.servers`` to see what exists.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from provisioning.localdev.fake_hetzner import FakeHetzner

__all__ = ["FakeHetzner", "QuickFakeHetzner", "fake_hetzner"]


class QuickFakeHetzner(FakeHetzner):
    """The fake whose server loop notices `stop()` within 20 ms (the default poll is 0.5 s, paid
    at every fixture teardown)."""

    def start(self) -> QuickFakeHetzner:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.02,), name="fake-hetzner", daemon=True
        )
        self._thread.start()
        return self


@pytest.fixture
def fake_hetzner() -> Iterator[FakeHetzner]:
    with QuickFakeHetzner(action_seconds=0.0) as fake:
        yield fake
