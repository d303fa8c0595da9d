"""Suite-wide fixtures. App-specific fixtures live beside their tests."""

from __future__ import annotations

import pytest
from django.conf import settings

from tests.fakes.runner_backend import RecordingBackend

pytest_plugins = ["tests.fakes.oidc", "tests.fakes.github"]


def _on_postgres() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _on_postgres():
        return
    skip = pytest.mark.skip(
        reason="PostgreSQL only (row locks, SKIP LOCKED, real concurrency): set DATABASE_URL"
    )
    for item in items:
        if "postgres_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def backend() -> RecordingBackend:
    """A runner backend that records dispatches and hands out run ids, like GitHub would."""
    return RecordingBackend()
