"""Fixtures for the reliability suite (`make reliability`; never collected by `make test`).

PostgreSQL only. pytest-django builds the test database (`test_<name>` of DATABASE_URL, from the
models); the suite then runs the real stack against it: gunicorn with the README's settings, two
`manage.py provisioning_worker` processes, the local runner (through bench/reliability/
chaos_runner.py), a fake Hetzner and the development OIDC issuer in this process.

Knobs (environment): RELIABILITY_KILL_RUNS (100), RELIABILITY_ORDERS (50), RELIABILITY_STORM
(100), RELIABILITY_FUZZ_EXAMPLES (10000), RELIABILITY_RESTART_ORDERS (40),
RELIABILITY_SCHEMATHESIS_SECONDS (60), RELIABILITY_FUZZ_SECONDS (150),
RELIABILITY_KILL_WAVE (50), RELIABILITY_CATCHUP_ORDERS (8).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from bench.reliability.stack import Stack

FIGURES: list[str] = []


FIGURES_FILE = Path(
    os.environ.get(
        "RELIABILITY_FIGURES_FILE",
        Path(__file__).resolve().parents[2] / "var" / "reliability-figures.log",
    )
)


def figure(line: str) -> None:
    """Record a line for the end-of-run summary, print it now (for -s) and append it to
    FIGURES_FILE (var/reliability-figures.log), so an interrupted run keeps its figures."""
    FIGURES.append(line)
    print(line, flush=True)
    with contextlib.suppress(OSError):
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        with FIGURES_FILE.open("a") as out:
            out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


logging.getLogger("httpx").setLevel(logging.WARNING)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        return
    skip = pytest.mark.skip(
        reason="the reliability suite runs on PostgreSQL only: set DATABASE_URL"
    )
    for item in items:
        item.add_marker(skip)


def knob(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def db_url(dbname: str | None = None) -> str:
    from django.db import connection

    db = connection.settings_dict  # the test database once pytest-django has made it
    return (
        f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:"
        f"{db.get('PORT') or 5432}/{dbname or db['NAME']}"
    )


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment: Any, django_db_blocker: Any) -> Iterator[None]:
    """The test database, built from the models (no migrations), whatever the tests are marked.

    pytest-django's own fixture only builds databases for tests marked django_db, and that mark
    would wrap each test in a transaction the servers cannot see.
    """
    from django.test.utils import setup_databases, teardown_databases
    from pytest_django.fixtures import _disable_migrations

    _disable_migrations()
    with django_db_blocker.unblock():
        config = setup_databases(
            verbosity=0, interactive=False, aliases={"default"}, serialized_aliases=set()
        )
    yield
    with django_db_blocker.unblock():
        teardown_databases(config, verbosity=0)


@pytest.fixture(scope="session")
def live_db(django_db_setup: Any, django_db_blocker: Any) -> Iterator[str]:
    """The test database, open to this process and to the servers for the whole session."""
    with django_db_blocker.unblock():
        yield db_url()


@pytest.fixture(scope="session")
def hetzner() -> Iterator[Any]:
    from provisioning.localdev.fake_hetzner import FakeHetzner

    # One fake for the whole session: its stacks build several hundred VMs (the storm alone is 100)
    # and poll fast. This stands for a project whose server limit and API budget were raised;
    # the limits themselves are exercised in tests/runner and tests/provisioning/test_capacity.py.
    with FakeHetzner(server_limit=100_000, rate_limit=1_000_000) as fake:
        yield fake


@pytest.fixture(scope="session")
def issuer() -> Iterator[Any]:
    from provisioning.localdev.oidc_issuer import DevOidcIssuer

    with DevOidcIssuer() as dev:
        yield dev


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="reliability-"))
    yield path
    if not os.environ.get("RELIABILITY_KEEP"):
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"logs kept in {path}")


@pytest.fixture(scope="session")
def stack(live_db: str, hetzner: Any, issuer: Any, workdir: Path) -> Iterator[Stack]:
    s = Stack(
        db_url=live_db,
        hetzner_url=hetzner.url,
        issuer=issuer,
        workdir=workdir / "main",
        chaos_dir=workdir / "chaos",
    )
    s.start()
    yield s
    s.stop()
    errors = [ln for ln in s.log("gunicorn").splitlines() if " ERROR " in ln or "Traceback" in ln]
    figure(f"[stack] server log: {len(errors)} ERROR/Traceback lines over the session")


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> float:
    """Poll until check() is true; the seconds it took. Fails the test on timeout."""
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Sampler(threading.Thread):
    """Runs `sample()` every `interval` seconds on its own thread until stopped."""

    def __init__(self, sample: Callable[[], Any], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.sample_fn = sample
        self.interval = interval
        self.results: list[Any] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.results.append(self.sample_fn())
            except Exception as exc:
                self.errors.append(repr(exc))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


@pytest.fixture
def make_users(live_db: str) -> Callable[[str, int], list[Any]]:
    from django.contrib.auth import get_user_model

    def make(prefix: str, n: int) -> list[Any]:
        User = get_user_model()
        stamp = str(int(time.time() * 1000))[-8:]
        return [
            User.objects.create_user(username=f"{prefix}-{stamp}-{i}", password=None)
            for i in range(n)
        ]

    return make


@contextlib.contextmanager
def chaos(stack: Stack) -> Iterator[Path]:
    """Turn on chaos_runner's kills for runs started inside the block."""
    flag = stack.chaos_dir / "enabled"
    flag.touch()
    try:
        yield stack.chaos_dir
    finally:
        flag.unlink(missing_ok=True)
