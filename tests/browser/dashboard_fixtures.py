"""Fixtures for the dashboard's browser tests: the whole local pipeline around the live server.

Chromium and the page come from tests/browser/conftest.py (`browser`, `page`).

`pipeline` wires a live server to loopback fakes the way `make run` does: the fake Hetzner, the
development OIDC issuer, a Stripe webhook endpoint recorded offline, the local runner backend
(the runner as a subprocess that calls back into the live server over HTTP) and a worker thread.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.db import connections

from billing import services as billing_services
from billing.webhook import webhook_url
from provisioning import backends
from tests.fakes.hetzner import FakeHetzner
from tests.fakes.oidc import running_issuer

T = TypeVar("T")

WEBHOOK_SECRET = "whsec_dashboardBrowserTestsOnly"
WEBHOOK_UUID = "0b7d2c4e-1f3a-4c5b-8d6e-7f8091a2b3c4"
STRIPE_TEST_KEY = "sk_test_dashboardBrowserTestsOnly000000"


class WorkerThread(threading.Thread):
    """provisioning.worker's loop on a short interval, in this process so it uses the test
    database, on its own connection as a separate worker process would."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(name="dashboard-test-worker", daemon=True)
        from provisioning.worker import Worker

        self.worker = Worker(name="browser-test-worker", interval=interval)

    def run(self) -> None:
        self.worker.run()  # closes its connection when it stops

    def stop(self) -> None:
        self.worker.stop()
        self.join(timeout=10)


@dataclass
class Pipeline:
    base_url: str
    hetzner: FakeHetzner
    log_dir: Path

    def db(self, fn: Callable[[], T]) -> T:
        """Run ORM code in a short-lived thread with its own connection.

        While Playwright's sync API runs, the main thread has a running event loop: Django then
        refuses ORM calls there, and asgiref would hand the thread a second, never-closed
        connection (which would block the test database's teardown).
        """
        result: list[T] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                result.append(fn())
            except BaseException as exc:
                errors.append(exc)
            finally:
                connections.close_all()

        thread = threading.Thread(target=target, name="dashboard-test-db")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return result[0]

    def runner_logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )


@pytest.fixture
def pipeline(live_server: Any, settings: Any, tmp_path: Path) -> Iterator[Pipeline]:
    """The local pipeline around `live_server`, torn down in reverse order."""
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
    settings.DEBUG = False
    settings.PUBLIC_BASE_URL = live_server.url
    # Billing: the local stand-in checkout, a webhook endpoint recorded the way `make run` does.
    settings.BILLING_LOCAL_CHECKOUT = True
    settings.STRIPE_LIVE_MODE = False
    settings.STRIPE_SECRET_KEY = STRIPE_TEST_KEY
    settings.STRIPE_TEST_SECRET_KEY = STRIPE_TEST_KEY
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_WEBHOOK_UUID = WEBHOOK_UUID
    billing_services.webhook_endpoint_setup(
        secret=WEBHOOK_SECRET,
        endpoint_uuid=WEBHOOK_UUID,
        url=webhook_url(WEBHOOK_UUID),
        api_key=STRIPE_TEST_KEY,
        livemode=False,
        api_version=settings.STRIPE_API_VERSION,
    )
    # Provisioning: the local runner against the fakes, fast steps, dispatch right after payment.
    log_dir = tmp_path / "runner-logs"
    settings.PROVISIONING_RUNNER = "local"
    settings.DISPATCH_ON_COMMIT = True
    settings.LOCAL_RUNNER_LOG_DIR = log_dir
    settings.DASHBOARD_POLL_SECONDS = 1  # the page polls every 3 s in production
    settings.LOCAL_RUNNER_STEP_SECONDS = 0.8
    settings.LOCAL_RUNNER_HEARTBEAT_SECONDS = 0.3
    settings.LOCAL_RUNNER_EXTRA_ENV = {
        "RUNNER_HCLOUD_POLL_SECONDS": "0.1",
        "RUNNER_CLAIM_RETRY_SECONDS": "10",
        "RUNNER_RETRY_BACKOFF_SECONDS": "0.2",
    }
    with FakeHetzner(action_seconds=0.0) as hetzner:
        settings.LOCAL_HETZNER_URL = hetzner.url
        issuer = running_issuer(settings)  # sets the OIDC issuer, JWKS URL and LOCAL_OIDC_*
        next(issuer)
        backends.reset_backend()
        worker = WorkerThread()
        worker.start()
        try:
            yield Pipeline(base_url=live_server.url, hetzner=hetzner, log_dir=log_dir)
        finally:
            worker.stop()
            local = backends.get_backend()
            terminate_all = getattr(local, "terminate_all", None)
            if terminate_all is not None:
                terminate_all()
            backends.reset_backend()
            next(issuer, None)  # stops the issuer and forgets its keys
            shutil.rmtree(log_dir, ignore_errors=True)
