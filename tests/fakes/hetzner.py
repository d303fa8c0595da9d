"""The loopback Hetzner fake as a pytest fixture.

Register with ``pytest_plugins = ["tests.fakes.hetzner"]`` (or import the fixture); the fixture
yields a running ``FakeHetzner``: give ``fake_hetzner.url`` to ``hcloud.Client(api_endpoint=)``
or to ``HCLOUD_API_ENDPOINT``, and read ``fake_hetzner.servers`` to see what exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning.localdev.fake_hetzner import FakeHetzner

__all__ = ["FakeHetzner", "fake_hetzner"]


@pytest.fixture
def fake_hetzner() -> Iterator[FakeHetzner]:
    with FakeHetzner(action_seconds=0.0) as fake:
        yield fake
