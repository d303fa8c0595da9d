"""The real stack for the reliability suite: gunicorn (the README's settings), worker processes
and the local runner, against loopback fakes of Hetzner and GitHub's OIDC issuer (in process).

Everything listens on 127.0.0.1 on free ports. Server and workers use
`bench.reliability.server_settings` (the project's settings plus the runner knobs that are only
settings); all timings are shortened so that timeouts and retries happen in seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import LOOPBACK_DEPLOYMENT_ENV, ROOT

WEBHOOK_SECRET = "whsec_reliabilitySuiteOnlyNotSecret0001"
WEBHOOK_UUID = "00000000-0000-4000-8000-0000000000a1"
STRIPE_KEY = "sk_test_reliabilitySuiteOnlyNotAStripeKey00"
SECRET_KEY = "reliability-only-not-secret-0123456789abcdefghijklmnopqrstuvwxyz"

# Shortened clocks: a silent run times out in 15 s, a retry waits 1-2 s, an unclaimed dispatch is
# re-sent after 30 s, the worker ticks twice a second. (A shorter claim window re-sends runs that
# are only slow to start on a loaded 2-core machine, and each re-send starts one more runner.)
TIMINGS = {
    "JOB_TIMEOUT_SECONDS": "15",
    "RETRY_BACKOFF_SECONDS": "1",
    "RETRY_BACKOFF_MAX_SECONDS": "2",
    "DISPATCH_CLAIM_TIMEOUT_SECONDS": "30",
    "MAX_RETRIES": "2",
    "WORKER_INTERVAL_SECONDS": "0.5",
    "LOCAL_RUNNER_STEP_SECONDS": "0.2",
    "LOCAL_RUNNER_HEARTBEAT_SECONDS": "1",
}
RUNNER_EXTRA_ENV = {"RUNNER_HCLOUD_POLL_SECONDS": "0.2", "RUNNER_RETRY_BACKOFF_SECONDS": "0.5"}


def _secret_key() -> str:
    with contextlib.suppress(Exception):
        from django.conf import settings

        return str(settings.SECRET_KEY)
    return SECRET_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    db_url: str
    hetzner_url: str
    issuer: Any  # DevOidcIssuer
    workdir: Path
    chaos_dir: Path
    workers: int = 2
    gunicorn_workers: int = 4
    threads: int = 4
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Added to (and overriding) env(): e.g. a loopback Stripe API for the catch-up case.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/stripe/webhook/{WEBHOOK_UUID}/"

    def env(self) -> dict[str, str]:
        import json

        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST"))}
        env.update(TIMINGS)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "bench.reliability.server_settings",
                # The suite's own: sessions it makes for the servers must verify there.
                "DJANGO_SECRET_KEY": _secret_key(),
                "DJANGO_DEBUG": "0",
                **LOOPBACK_DEPLOYMENT_ENV,
                "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
                "DJANGO_SECURE_SSL_REDIRECT": "0",
                "DJANGO_SECURE_COOKIES": "0",
                "DJANGO_HSTS_SECONDS": "0",
                "DATABASE_URL": self.db_url,
                "DATABASE_CONN_MAX_AGE": "60",
                "PUBLIC_BASE_URL": self.base_url,
                "PROVISIONING_RUNNER": "local",
                "LOCAL_OIDC_ISSUER_URL": self.issuer.base_url,
                "PROVISIONING_OIDC_ISSUER": self.issuer.issuer,
                "PROVISIONING_OIDC_JWKS_URL": self.issuer.jwks_url,
                "LOCAL_HETZNER_URL": self.hetzner_url,
                # A project with raised limits, like the session's fake Hetzner: these cases are
                # about storms, kills and restarts, not capacity (`make launch` measures that).
                # With the default 3,600 calls/hour, builds of a few seconds would bound the
                # runs in flight to one.
                "HETZNER_API_BUDGET_PER_HOUR": "1000000",
                "PROVISIONING_MAX_IN_FLIGHT": "100",
                "LOCAL_RUNNER_LOG_DIR": str(self.workdir / "runner-logs"),
                "STRIPE_SECRET_KEY": STRIPE_KEY,
                "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "STRIPE_WEBHOOK_UUID": WEBHOOK_UUID,
                "BILLING_LOCAL_CHECKOUT": "0",
                "RELIABILITY_CHAOS_RUNNER": "1",
                "RELIABILITY_RUNNER_EXTRA_ENV": json.dumps(
                    {**RUNNER_EXTRA_ENV, "CHAOS_DIR": str(self.chaos_dir), "CHAOS_KILL_PROB": "0.5"}
                ),
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                # No Stripe API here: the catch-up duty is off unless a case serves a fake one.
                "STRIPE_RECONCILE_INTERVAL_SECONDS": "0",
            }
        )
        env.update(self.extra_env)
        return env

    def manage(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.chaos_dir.mkdir(parents=True, exist_ok=True)
        self.manage("setup_stripe_webhook")
        self.start_server()
        self.start_workers()
        return self

    def start_server(self) -> None:
        self._spawn(
            "gunicorn",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "config.wsgi",
                "-w",
                str(self.gunicorn_workers),
                "-k",
                "gthread",
                "--threads",
                str(self.threads),
                "-b",
                f"127.0.0.1:{self.port}",
                "--timeout",
                "60",
                "--graceful-timeout",
                "5",
                "--log-level",
                "warning",
            ],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code < 600:
                    return
            if self.procs["gunicorn"].poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not start: {self.log('gunicorn')[-3000:]}")

    def start_workers(self) -> None:
        for n in range(self.workers):
            self._spawn(
                f"worker-{n}",
                [
                    sys.executable,
                    "manage.py",
                    "provisioning_worker",
                    "--interval",
                    TIMINGS["WORKER_INTERVAL_SECONDS"],
                    "--name",
                    f"reliability-{self.port}-{n}",
                ],
            )

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            del name
        self.procs.clear()
        self.kill_runners()

    def kill_runners(self) -> None:
        """Stop every local run this stack started (their pid files name them)."""
        logs = self.workdir / "runner-logs"
        for pid_file in logs.glob("*.pid") if logs.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"provisioning.runner" in cmdline or b"chaos_runner" in cmdline:
                    os.killpg(pid, signal.SIGKILL)


def post_signed(client: httpx.Client, url: str, body: bytes, header: str) -> httpx.Response:
    return client.post(
        url,
        content=body,
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": header,
        },
    )
