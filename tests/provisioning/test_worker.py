"""The worker's tick against GitHub faked at the wire, and the command's signal handling."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from provisioning import services
from provisioning.models import JobEvent, JobStatus, ProvisioningJob, Step, WorkerBeat
from provisioning.services import Run
from provisioning.worker import Worker
from tests.factories import AgentFactory
from tests.provisioning.helpers import claimed, enqueue, requeue_now

BASE_DIR = Path(__file__).resolve().parents[2]


# --- one tick, GitHub at the wire ----------------------------------------------------------------


@pytest.mark.django_db
def test_a_tick_dispatches_a_due_job_with_the_right_inputs_and_stores_the_run_id(fake_github):
    job = enqueue(AgentFactory())

    report = Worker(name="w1").tick()

    assert report.ok, report.failed
    assert report.done["dispatch"] == 1
    assert fake_github.dispatched_inputs() == [
        {"job_id": str(job.pk), "attempt": "1", "mode": "provision"}
    ]
    sent = fake_github.dispatches[0]
    assert (sent.ref, sent.return_run_details) == ("main", True)
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert job.workflow_run_id == sent.run_id
    assert job.dispatched_at is not None
    event = JobEvent.objects.get(job=job, action=JobEvent.Action.DISPATCH)
    assert event.workflow_run_id == sent.run_id


@pytest.mark.django_db
def test_a_github_502_leaves_the_job_queued_and_a_later_tick_dispatches_it(fake_github):
    job = enqueue(AgentFactory())
    fake_github.fail_next(1, status=502)

    Worker(name="w1").tick()

    job.refresh_from_db()
    assert (job.status, job.workflow_run_id, job.dispatched_at) == (JobStatus.QUEUED, None, None)
    assert job.next_attempt_at is not None and job.next_attempt_at > timezone.now()
    assert job.retry_count == 0  # a failed dispatch spends no retry
    failed = JobEvent.objects.get(job=job, action=JobEvent.Action.DISPATCH_FAILED)
    assert "502" in failed.reason
    assert fake_github.dispatches == []

    Worker(name="w1").tick()  # still backing off: nothing sent
    assert fake_github.dispatches == []
    requeue_now(job)  # the backoff has passed
    Worker(name="w1").tick()

    job.refresh_from_db()
    assert len(fake_github.dispatches) == 1
    assert job.workflow_run_id == fake_github.dispatches[0].run_id


@pytest.mark.django_db
def test_a_github_timeout_is_handled_like_a_5xx(fake_github):
    job = enqueue(AgentFactory())
    fake_github.timeout_next(1)

    report = Worker(name="w1").tick()

    assert report.ok
    job.refresh_from_db()
    assert (job.status, job.workflow_run_id) == (JobStatus.QUEUED, None)
    assert JobEvent.objects.filter(job=job, action=JobEvent.Action.DISPATCH_FAILED).exists()


@pytest.mark.django_db
def test_the_sweep_times_out_a_silent_job_requeues_it_and_cancels_its_run(
    fake_github, settings, django_capture_on_commit_callbacks
):
    job = enqueue(AgentFactory())
    Worker(name="w1").tick()
    job.refresh_from_db()
    run = Run(run_id=job.workflow_run_id)
    services.job_claim(job_id=job.pk, attempt=1, run=run)
    silent = timezone.now() - timedelta(seconds=settings.JOB_TIMEOUT_SECONDS + 1)
    ProvisioningJob.objects.filter(pk=job.pk).update(last_heartbeat_at=silent)

    with django_capture_on_commit_callbacks(execute=True):
        report = Worker(name="w1").tick()

    assert report.done["timeout"] == 1
    job.refresh_from_db()
    assert (job.status, job.retry_count, job.attempt, job.failed_step) == (
        JobStatus.QUEUED,
        1,
        2,
        Step.TIMEOUT,
    )
    assert fake_github.cancelled == [run.run_id]
    assert JobEvent.objects.filter(job=job, action=JobEvent.Action.TIMEOUT).count() == 1


@pytest.mark.django_db
def test_a_failed_provision_gets_one_cleanup_run(fake_github):
    job = enqueue(AgentFactory(), max_retries=0)
    Worker(name="w1").tick()
    job.refresh_from_db()
    run = Run(run_id=job.workflow_run_id)
    services.job_claim(job_id=job.pk, attempt=1, run=run)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE)

    first = Worker(name="w1").tick()
    second = Worker(name="w1").tick()

    assert (first.done["cleanup"], second.done["cleanup"]) == (1, 0)
    assert fake_github.dispatched_inputs()[-1] == {
        "job_id": str(job.pk),
        "attempt": "1",
        "mode": "cleanup",
    }


@pytest.mark.django_db
def test_a_failing_duty_does_not_stop_the_others(backend):
    job = enqueue(AgentFactory())

    def broken() -> int:
        raise RuntimeError("sweep exploded")

    class BrokenSweep(Worker):
        def duties(self):
            return [(n, broken if n == "timeout" else d) for n, d in super().duties()]

    report = BrokenSweep(name="w1", backend=backend).tick()

    assert report.failed == {"timeout": "RuntimeError: sweep exploded"}
    assert report.done["beat"] == 1
    assert report.done["dispatch"] == 1
    assert backend.runs_for(job.pk) != []


@pytest.mark.django_db
def test_each_tick_records_the_workers_beat(backend):
    worker = Worker(name="host-a:123", backend=backend)

    worker.tick()
    first = WorkerBeat.objects.get(name="host-a:123")
    worker.tick()
    second = WorkerBeat.objects.get(name="host-a:123")

    assert (first.ticks, second.ticks) == (1, 2)
    assert second.last_tick_at >= first.last_tick_at
    assert second.started_at == first.started_at


@pytest.mark.django_db
def test_a_worker_gone_for_a_week_is_forgotten(backend):
    old = timezone.now() - timedelta(days=8)
    WorkerBeat.objects.create(name="gone:1", last_tick_at=old, started_at=old)

    Worker(name="new:2", backend=backend).tick()

    assert list(WorkerBeat.objects.values_list("name", flat=True)) == ["new:2"]


@pytest.mark.django_db
def test_run_once_ticks_once(backend):
    assert Worker(name="w", backend=backend).run(once=True) == 1


@pytest.mark.django_db
def test_stop_ends_the_loop_after_the_current_tick(backend):
    worker = Worker(name="w", backend=backend, interval=30)
    threading.Timer(0.2, worker.stop).start()

    started = time.monotonic()
    ticks = worker.run()

    assert ticks == 1
    assert time.monotonic() - started < 5


@pytest.mark.django_db
def test_a_claimed_job_is_not_dispatched_again(backend):
    job, _ = claimed(backend)

    report = Worker(name="w", backend=backend).tick()

    assert report.done["dispatch"] == 0
    assert len(backend.runs_for(job.pk)) == 1


# --- the command in a real process: SIGTERM finishes the tick and exits 0 -------------------------

# On SQLite the test database lives in memory, so the child builds the tables it needs in its own
# database file and then runs the real command.
SQLITE_CHILD = """
import sys
import django
django.setup()
from django.apps import apps
from django.core.management import call_command
from django.db import connection
with connection.schema_editor() as editor:
    for label in ("contenttypes", "auth", "provisioning"):
        for model in apps.get_app_config(label).get_models():
            editor.create_model(model)
call_command("provisioning_worker", *sys.argv[1:])
"""


def _start_worker(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DJANGO_SECRET_KEY": "test-only",
        "DJANGO_TESTING": "1",
        "PROVISIONING_RUNNER": "local",
        "PYTHONUNBUFFERED": "1",
    }
    db = django_settings.DATABASES["default"]
    if db["ENGINE"].endswith("postgresql"):
        # The test database, whose tables exist and whose rows this test commits.
        user, host, port = db["USER"], db["HOST"] or "127.0.0.1", db["PORT"] or 5432
        password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
        env["DATABASE_URL"] = f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"
        command = [sys.executable, "manage.py", "provisioning_worker", *args]
    else:
        env.pop("DATABASE_URL", None)
        env["SQLITE_PATH"] = str(tmp_path / "worker.sqlite3")
        command = [sys.executable, "-c", SQLITE_CHILD, *args]
    return subprocess.Popen(
        command,
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lines(stream) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str], needle: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not seen in {timeout}s; got: {''.join(seen)}")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_worker_command_stops_cleanly_on_a_signal(tmp_path, sig):
    connection.close()  # the child may need the database to itself (SQLite file locks)
    process = _start_worker(tmp_path, "--interval", "0.1", "--name", "signal-test")
    try:
        stderr = _lines(process.stderr)
        _wait_for(stderr, "worker signal-test started", timeout=60)
        time.sleep(0.5)  # a few ticks

        process.send_signal(sig)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0
    assert "worker signal-test stopped after" in out
    ticks = int(out.split("stopped after ")[1].split(" ")[0])
    assert ticks >= 2
