"""The whole local pipeline inside one test process, on loopback and PostgreSQL.

``pipeline`` wires together what `make run` starts as separate processes: pytest-django's
``live_server`` (the callback API), an in-process dev OIDC issuer and fake Hetzner on free ports,
the worker (``provisioning.worker.Worker.tick`` in a background thread) and the real local
runner backend, whose runs are real ``python -m provisioning.runner run ...`` subprocesses.

Runner knobs per attempt: the runner's own ``RUNNER_FAIL_STEP``/``RUNNER_KILL_AT_STEP`` apply to
every run, so the local backend starts a small shim instead (``RUNNER_SHIM``) that sets them
only for the attempts a test names (``pipeline.knobs(attempt=1, kill_at="wait-ssh")``) and then
calls the runner's ``main`` exactly as ``python -m provisioning.runner`` would.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.db import close_old_connections, connection

from provisioning import backends
from provisioning.api import oidc
from provisioning.backends.local import LocalBackend
from provisioning.localdev.oidc_issuer import DevOidcIssuer
from provisioning.models import JobEvent, ProvisioningJob
from tests.fakes.hetzner import FakeHetzner

# `python -c RUNNER_SHIM run --mode ... --job-id ... --attempt N`: E2E_ATTEMPT_<N>_FAIL_STEP and
# E2E_ATTEMPT_<N>_KILL_AT_STEP become the runner's knobs for attempt N only.
RUNNER_SHIM = """
import os, sys
args = sys.argv[1:]
attempt = args[args.index("--attempt") + 1] if "--attempt" in args else "?"
for knob in ("FAIL_STEP", "KILL_AT_STEP"):
    os.environ.pop("RUNNER_" + knob, None)
    value = os.environ.get("E2E_ATTEMPT_%s_%s" % (attempt, knob))
    if value and "--mode" in args and args[args.index("--mode") + 1] == "provision":
        os.environ["RUNNER_" + knob] = value
from provisioning.runner.cli import main
raise SystemExit(main(args))
"""

POLL_SECONDS = 0.05
TICK_SECONDS = 0.15


@dataclass
class Pipeline:
    settings: Any
    cloud: FakeHetzner
    issuer: DevOidcIssuer
    log_dir: Path
    worker_errors: list[str] = field(default_factory=list)
    ticks: int = 0

    # -- arranging -------------------------------------------------------------------------------
    def knobs(self, *, attempt: int, fail_step: str = "", kill_at: str = "") -> None:
        """Make the runner of ``attempt`` fail at ``fail_step`` or die at ``kill_at``."""
        self.settings.LOCAL_RUNNER_COMMAND = [sys.executable, "-c", RUNNER_SHIM]
        extra = dict(self.settings.LOCAL_RUNNER_EXTRA_ENV)
        if fail_step:
            extra[f"E2E_ATTEMPT_{attempt}_FAIL_STEP"] = fail_step
        if kill_at:
            extra[f"E2E_ATTEMPT_{attempt}_KILL_AT_STEP"] = kill_at
        self.settings.LOCAL_RUNNER_EXTRA_ENV = extra

    # -- observing -------------------------------------------------------------------------------
    def vms_of(self, job: ProvisioningJob) -> list[dict[str, Any]]:
        return [s for s in self.cloud.servers if s["labels"].get("job-id") == str(job.pk)]

    def wait_for(
        self,
        job: ProvisioningJob,
        condition: Callable[[ProvisioningJob], bool],
        *,
        what: str,
        timeout: float = 45.0,
    ) -> ProvisioningJob:
        """Poll the job until ``condition`` holds; on timeout fail with its whole story."""
        deadline = time.monotonic() + timeout
        while True:
            job.refresh_from_db()
            if condition(job):
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.dump(job)}")
            time.sleep(POLL_SECONDS)

    def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        what: str,
        job: ProvisioningJob,
        timeout: float = 30.0,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.dump(job)}")
            time.sleep(POLL_SECONDS)

    def wait_for_timeout_then_relax(self, job: ProvisioningJob) -> None:
        """Wait for the worker to time the killed attempt out, then lengthen the timeout again so
        a slow machine cannot time out the healthy retry too."""
        self.wait_until(
            lambda: JobEvent.objects.filter(job=job, action=JobEvent.Action.TIMEOUT).exists(),
            what="the killed attempt to time out",
            job=job,
            timeout=60,
        )
        self.settings.JOB_TIMEOUT_SECONDS = 60

    def events(self, job: ProvisioningJob) -> list[JobEvent]:
        return list(JobEvent.objects.filter(job=job).order_by("created_at", "id"))

    def dump(self, job: ProvisioningJob) -> str:
        job.refresh_from_db()
        lines = [
            f"job {job.pk}: status={job.status} attempt={job.attempt} retry_count="
            f"{job.retry_count}/{job.max_retries} step={job.step!r} progress={job.progress} "
            f"run={job.workflow_run_id} failed_step={job.failed_step!r} error={job.error!r}",
            "events:",
        ]
        for e in self.events(job):
            lines.append(
                f"  {e.created_at:%H:%M:%S.%f} {e.actor} {e.action} {e.from_status or '-'}->"
                f"{e.to_status or '-'} attempt={e.attempt} run={e.workflow_run_id} "
                f"step={e.step!r} {e.reason[:300]!r}"
            )
        lines.append(f"worker ticks: {self.ticks}; worker errors: {self.worker_errors[-5:]}")
        lines.append(f"cloud servers: {[(s['name'], s['labels']) for s in self.cloud.servers]}")
        for log in sorted(self.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime):
            lines.append(f"--- runner log {log.name} ---")
            lines.append(log.read_text(errors="replace")[-4000:])
        return "\n".join(lines)


def _tick_forever(pipeline: Pipeline, stop: threading.Event) -> None:
    """The worker: `Worker.tick()` every TICK_SECONDS, as `manage.py provisioning_worker` does."""
    from provisioning.worker import Worker

    worker = Worker(name="e2e-worker", interval=TICK_SECONDS)
    try:
        while not stop.is_set():
            report = worker.tick()
            pipeline.ticks += 1
            pipeline.worker_errors.extend(f"{k}: {v}" for k, v in report.failed.items())
            stop.wait(TICK_SECONDS)
    finally:
        close_old_connections()
        connection.close()


@pytest.fixture
def pipeline(live_server, settings, tmp_path) -> Iterator[Pipeline]:
    log_dir = tmp_path / "runner-logs"
    settings.PUBLIC_BASE_URL = live_server.url
    settings.PROVISIONING_RUNNER = "local"
    settings.DISPATCH_ON_COMMIT = False  # the worker dispatches, as under `make run`'s worker
    settings.LOCAL_RUNNER_LOG_DIR = log_dir
    settings.LOCAL_RUNNER_STEP_SECONDS = 0.1
    settings.LOCAL_RUNNER_HEARTBEAT_SECONDS = 0.3
    settings.LOCAL_RUNNER_FAIL_STEP = ""
    settings.LOCAL_RUNNER_KILL_AT_STEP = ""
    settings.LOCAL_RUNNER_COMMAND = None  # the real `python -m provisioning.runner`
    settings.LOCAL_RUNNER_EXTRA_ENV = {
        "RUNNER_HCLOUD_POLL_SECONDS": "0.1",
        "RUNNER_RETRY_BACKOFF_SECONDS": "0.2",
        "RUNNER_CLAIM_RETRY_SECONDS": "1",
        "RUNNER_HTTP_TIMEOUT_SECONDS": "10",
    }
    settings.JOB_TIMEOUT_SECONDS = 60
    settings.RETRY_BACKOFF_SECONDS = 0
    settings.MAX_RETRIES = 3
    settings.DISPATCH_CLAIM_TIMEOUT_SECONDS = 60
    settings.WORKER_INTERVAL_SECONDS = TICK_SECONDS

    issuer = DevOidcIssuer(
        repository=settings.GITHUB_REPOSITORY,
        repository_id=str(settings.GITHUB_REPOSITORY_ID),
        workflow_file=settings.GITHUB_WORKFLOW_FILE,
        ref=settings.GITHUB_REF,
        audience=settings.PROVISIONING_OIDC_AUDIENCE,
        request_token="e2e-request-token",
    )
    with FakeHetzner(action_seconds=0.0) as cloud, issuer:
        settings.LOCAL_HETZNER_URL = cloud.url
        settings.LOCAL_OIDC_ISSUER_URL = issuer.base_url
        settings.LOCAL_OIDC_REQUEST_TOKEN = issuer.request_token
        settings.PROVISIONING_OIDC_ISSUER = issuer.issuer
        settings.PROVISIONING_OIDC_JWKS_URL = issuer.jwks_url
        settings.PROVISIONING_OIDC_RUNNER_ENVIRONMENTS = ["github-hosted"]
        oidc.reset_key_cache()
        backends.reset_backend()

        pipe = Pipeline(settings=settings, cloud=cloud, issuer=issuer, log_dir=log_dir)
        stop = threading.Event()
        worker = threading.Thread(target=_tick_forever, args=(pipe, stop), name="e2e-worker")
        worker.start()
        try:
            yield pipe
        finally:
            stop.set()
            worker.join(timeout=30)
            backend = backends.get_backend()
            if isinstance(backend, LocalBackend):
                backend.terminate_all()
                # Each run's pid file goes when its process has exited.
                deadline = time.monotonic() + 15
                while any(log_dir.glob("*.pid")) and time.monotonic() < deadline:
                    time.sleep(0.1)
            backends.reset_backend()
            oidc.reset_key_cache()
