"""Suite-wide fixtures. App-specific fixtures live beside their tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db.backends.postgresql.operations import DatabaseOperations as PostgresOperations

from tests.fakes.runner_backend import RecordingBackend
from tests.fakes.stripe import RefusingHTTPClient

pytest_plugins = ["tests.fakes.oidc", "tests.fakes.github"]


def _on_postgres() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


NEEDS_POSTGRES = (
    "need PostgreSQL: row locks, SKIP LOCKED, real concurrency; set DATABASE_URL or start "
    "PostgreSQL at 127.0.0.1:5432 to run them"
)
SKIP_SUMMARY = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _on_postgres():
        return
    skip = pytest.mark.skip(reason=NEEDS_POSTGRES)
    for item in items:
        if "postgres_only" in item.keywords:
            item.add_marker(skip)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Count the skipped tests by reason; `pytest_sessionfinish` prints it as the last line."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if r.when != "teardown"]
    if not skipped:
        return
    by_reason = Counter(_skip_reason(r) for r in skipped)
    parts = [
        f"{n} test{'s' if n != 1 else ''} skipped ({reason})"
        for reason, n in by_reason.most_common()
    ]
    prefix = "" if _on_postgres() else "SQLite: "
    config.stash[SKIP_SUMMARY] = prefix + "; ".join(parts)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    # Runs after the terminal reporter's "N passed, M skipped" line, so this is the last line.
    result = yield
    line = session.config.stash.get(SKIP_SUMMARY, "")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if line and reporter is not None:
        reporter.write_line(line, yellow=True, bold=True)
    return result


def _flush_by_delete(
    self: Any, style: Any, tables: list[str], *, reset_sequences: bool = False, **kwargs: Any
) -> list[str]:
    """PostgreSQL's flush between transactional tests as DELETEs, not one TRUNCATE.

    TRUNCATE gives each of the ~130 tables (dj-stripe's included) new files, which costs seconds
    per transactional test; the tables hold a handful of rows, so DELETE empties them in
    milliseconds. Django's foreign keys are DEFERRABLE INITIALLY DEFERRED, so the order does not
    matter inside the flush's one transaction; a leftover reference still fails the commit.
    """
    if reset_sequences or kwargs.get("allow_cascade") or not tables:
        return _truncate_flush(self, style, tables, reset_sequences=reset_sequences, **kwargs)
    quote = self.quote_name
    return [f"{style.SQL_KEYWORD('DELETE FROM')} {style.SQL_FIELD(quote(t))};" for t in tables]


_truncate_flush = PostgresOperations.sql_flush


@pytest.fixture(autouse=True, scope="session")
def fast_flush() -> Iterator[None]:
    PostgresOperations.sql_flush = _flush_by_delete  # type: ignore[method-assign]
    yield
    PostgresOperations.sql_flush = _truncate_flush  # type: ignore[method-assign]


def _db_blocker(config: pytest.Config) -> Any:
    try:
        from pytest_django.plugin import blocking_manager_key
    except ImportError:  # pytest-django before the stash key
        from pytest_django.plugin import _blocking_manager

        return _blocking_manager
    return config.stash[blocking_manager_key]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After a transactional test with `available_apps`, put back what its flush took.

    Django flushes such a test's apps without sending post_migrate, so auth's permissions and
    the content types are gone for every later test (an operator given `retry_job` would get
    none). A flush of the whole database sends it; this does the same for the restricted one.
    """
    result = yield
    marker = item.get_closest_marker("django_db")
    if marker is not None and marker.kwargs.get("available_apps") is not None:
        from django.core.management.sql import emit_post_migrate_signal

        with _db_blocker(item.config).unblock():
            emit_post_migrate_signal(verbosity=0, interactive=False, db="default")
    return result


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


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    """Every test starts with an empty cache: allauth keeps its rate limits there (one
    confirmation email per address per few minutes, sign-ups per address), and one test's
    sign-up must not hold back the next one's."""
    from django.core.cache import cache

    cache.clear()
