"""Suite-wide fixtures. App-specific fixtures live beside their tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.conf import settings

from tests.fakes.runner_backend import RecordingBackend
from tests.fakes.stripe import RefusingHTTPClient

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


@pytest.fixture(autouse=True)
def stripe_http() -> Iterator[RefusingHTTPClient]:
    """No test reaches Stripe: every Stripe API call is refused unless the test gives an answer."""
    import stripe

    previous = stripe.default_http_client
    client = RefusingHTTPClient()
    stripe.default_http_client = client
    yield client
    stripe.default_http_client = previous
