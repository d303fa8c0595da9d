"""Deadlines and reconciliation: an attempt past its deadline is failed even while it beats, and a
run GitHub reports finished while its job is still provisioning is failed with the reason."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from provisioning import services
from provisioning.backends.base import UNFINISHED_RUN_STATUSES, RunStatus
from provisioning.errors import InvalidTransition
from provisioning.models import Actor, JobEvent, JobStatus, ProvisioningJob, Step
from provisioning.services import Run
from provisioning.worker import Worker
from tests.factories import AgentFactory
from tests.provisioning.helpers import enqueue

pytestmark = pytest.mark.django_db


def in_flight(
    fake_github, *, step: str | None = Step.CONFIGURE, **fields
) -> tuple[ProvisioningJob, Run]:
    """A job dispatched to the fake GitHub, claimed by its run, at `step`; `fields` updated after."""
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    job.refresh_from_db()
    run = Run(run_id=job.workflow_run_id)
    services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    if step:
        services.job_heartbeat(job_id=job.pk, run=run, step=step, progress=40)
    if fields:
        ProvisioningJob.objects.filter(pk=job.pk).update(**fields)
    job.refresh_from_db()
    return job, run


def checked_long_ago(settings) -> dict:
    """Claimed longer ago than the reconcile interval (and never checked): due for a check."""
    return {
        "claimed_at": timezone.now() - timedelta(seconds=settings.RECONCILE_INTERVAL_SECONDS + 5)
    }


def list_calls(fake_github) -> int:
    path = f"/repos/{fake_github.repository}/actions/workflows/{fake_github.workflow_file}/runs"
    return sum(1 for r in fake_github.requests if r.method == "GET" and r.url.path == path)


def run_reads(fake_github, run_id: str) -> int:
    path = f"/repos/{fake_github.repository}/actions/runs/{run_id}"
    return sum(1 for r in fake_github.requests if r.method == "GET" and r.url.path == path)


# --- the absolute deadline -----------------------------------------------------------------------


def test_the_worker_fails_an_attempt_past_its_deadline_although_its_heartbeats_are_fresh(
    fake_github, settings, django_capture_on_commit_callbacks
):
    now = timezone.now()
    job, run = in_flight(
        fake_github,
        claimed_at=now - timedelta(seconds=settings.JOB_DEADLINE_SECONDS + 1),
        last_heartbeat_at=now,
    )
    assert not job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS)

    with django_capture_on_commit_callbacks(execute=True):
        report = Worker(name="w1").tick()

    assert report.ok, report.failed
    assert report.done["timeout"] == 1
    job.refresh_from_db()
    assert (job.status, job.attempt, job.retry_count, job.failed_step) == (
        JobStatus.QUEUED,
        2,
        1,
        Step.TIMEOUT,
    )
    event = JobEvent.objects.get(job=job, action=JobEvent.Action.TIMEOUT)
    assert event.actor == Actor.SYSTEM
    assert f"{settings.JOB_DEADLINE_SECONDS}s deadline" in event.reason
    assert "heartbeats still arriving" in event.reason
    assert fake_github.cancelled == [run.run_id]  # the hung run is stopped
    # The old run's next heartbeat is refused (409): its job is queued again.
    with pytest.raises(InvalidTransition):
        services.job_heartbeat(job_id=job.pk, run=run)


# --- reconciliation against GitHub ---------------------------------------------------------------


def test_a_run_github_reports_finished_fails_its_provisioning_job_with_the_reason(
    fake_github, settings
):
    job, run = in_flight(fake_github, **checked_long_ago(settings))
    fake_github.set_run(run.run_id, status="completed", conclusion="failure")

    failed = services.job_reconcile_runs()

    assert failed == 1
    job.refresh_from_db()
    assert (job.status, job.attempt, job.retry_count, job.failed_step) == (
        JobStatus.QUEUED,
        2,
        1,
        Step.CONFIGURE,
    )
    expected = (
        f"GitHub reports run {run.run_id} completed (failure) while the job was still provisioning"
    )
    assert job.error.startswith(expected)
    event = JobEvent.objects.get(job=job, action=JobEvent.Action.FAIL)
    assert (event.actor, event.from_status, event.to_status) == (
        Actor.SYSTEM,
        JobStatus.PROVISIONING,
        JobStatus.QUEUED,
    )
    assert (event.workflow_run_id, event.attempt, event.step) == (run.run_id, 1, Step.CONFIGURE)
    assert event.reason.startswith(expected)


def test_a_finished_run_with_no_retries_left_fails_the_job_and_a_job_without_a_step_gets_timeout(
    fake_github, settings
):
    job, run = in_flight(fake_github, step=None, max_retries=0, **checked_long_ago(settings))
    ProvisioningJob.objects.filter(pk=job.pk).update(step="")
    fake_github.set_run(run.run_id, status="completed", conclusion="cancelled")

    assert services.job_reconcile_runs() == 1

    job.refresh_from_db()
    assert (job.status, job.failed_step) == (JobStatus.FAILED, Step.TIMEOUT)
    assert job.completed_at is not None
    assert f"run {run.run_id} completed (cancelled)" in job.error


def test_a_run_still_in_progress_is_left_alone_and_not_asked_again_within_the_interval(
    fake_github, settings
):
    job, run = in_flight(fake_github, **checked_long_ago(settings))
    fake_github.set_run(run.run_id, status="in_progress")

    assert services.job_reconcile_runs() == 0
    assert services.job_reconcile_runs() == 0  # checked a moment ago: not due

    job.refresh_from_db()
    assert (job.status, job.attempt, job.step) == (JobStatus.PROVISIONING, 1, Step.CONFIGURE)
    assert job.reconciled_at is not None
    # Found among the listed unfinished runs: no call about this run, one list round only.
    assert run_reads(fake_github, run.run_id) == 0
    assert list_calls(fake_github) == len(UNFINISHED_RUN_STATUSES)
    assert not JobEvent.objects.filter(job=job, action=JobEvent.Action.FAIL).exists()


def test_a_freshly_claimed_run_is_not_asked_about(fake_github):
    job, run = in_flight(fake_github)
    fake_github.set_run(run.run_id, status="completed", conclusion="failure")

    assert services.job_reconcile_runs() == 0

    assert run_reads(fake_github, run.run_id) == 0
    job.refresh_from_db()
    assert job.status == JobStatus.PROVISIONING


def test_a_run_github_does_not_know_leaves_the_job_unreconciled(fake_github, settings):
    job, run = in_flight(fake_github, **checked_long_ago(settings))
    fake_github.runs.pop(run.run_id)  # 404

    assert services.job_reconcile_runs() == 0

    job.refresh_from_db()
    assert job.status == JobStatus.PROVISIONING
    assert job.reconciled_at is None  # still counts as unreconciled


def test_github_errors_are_logged_and_leave_the_job_untouched(fake_github, settings, caplog):
    job, run = in_flight(fake_github, **checked_long_ago(settings))
    fake_github.set_run(run.run_id, status="completed", conclusion="failure")
    fake_github.fail_next(1, status=502)

    assert services.job_reconcile_runs() == 0

    job.refresh_from_db()
    assert (job.status, job.attempt, job.reconciled_at) == (JobStatus.PROVISIONING, 1, None)
    assert "could not list runs" in caplog.text
    # GitHub is back: the next round settles it.
    assert services.job_reconcile_runs() == 1


def test_a_round_stops_after_a_few_errors_in_a_row(settings):
    class Down:
        name = "github"
        asked: list[str] = []

        def get_run(self, *, run_id: str) -> RunStatus | None:
            self.asked.append(run_id)
            raise ConnectionError("GitHub unreachable")

    for _ in range(5):
        job = enqueue(AgentFactory())
        ProvisioningJob.objects.filter(pk=job.pk).update(
            status=JobStatus.PROVISIONING,
            workflow_run_id=f"1{job.pk.int % 10**9}",
            run_attempt=1,
            claimed_at=timezone.now() - timedelta(hours=1),
            last_heartbeat_at=timezone.now(),
        )
    down = Down()

    assert services.job_reconcile_runs(backend=down) == 0

    assert len(down.asked) == services.RECONCILE_MAX_CONSECUTIVE_ERRORS
    assert not ProvisioningJob.objects.filter(reconciled_at__isnull=False).exists()


def test_a_run_that_reports_complete_while_github_is_asked_wins(fake_github, settings):
    """The run's own `complete` lands between GitHub's answer and the row lock: nothing fails."""
    job, run = in_flight(fake_github, **checked_long_ago(settings))
    fake_github.set_run(run.run_id, status="completed", conclusion="success")

    class CompletesFirst:
        name = "github"

        def get_run(self, *, run_id: str) -> RunStatus | None:
            services.job_complete(job_id=job.pk, run=run, server_id="42", ipv4="203.0.113.9")
            return RunStatus(run_id=run_id, status="completed", conclusion="success")

    assert services.job_reconcile_runs(backend=CompletesFirst()) == 0

    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    assert not JobEvent.objects.filter(job=job, action=JobEvent.Action.FAIL).exists()


def test_the_runs_own_late_fail_report_is_answered_as_already_reported(fake_github, settings):
    job, run = in_flight(fake_github, **checked_long_ago(settings))
    fake_github.set_run(run.run_id, status="completed", conclusion="failure")
    services.job_reconcile_runs()

    again = services.job_fail(
        job_id=job.pk, run=run, error="ansible exit 2", failed_step=Step.CONFIGURE
    )

    assert (again.status, again.attempt) == (JobStatus.QUEUED, 2)
    assert JobEvent.objects.filter(job=job, action=JobEvent.Action.FAIL).count() == 1


# --- the worker duty -----------------------------------------------------------------------------


def test_the_worker_reconciles_on_its_first_tick_then_once_per_interval(
    fake_github, settings, monkeypatch
):
    job, run = in_flight(fake_github, **checked_long_ago(settings))
    fake_github.set_run(run.run_id, status="completed", conclusion="failure")
    calls = []
    real = services.job_reconcile_runs
    monkeypatch.setattr(services, "job_reconcile_runs", lambda **kw: calls.append(kw) or real(**kw))
    clock = [1000.0]
    monkeypatch.setattr("provisioning.worker.time.monotonic", lambda: clock[0])
    worker = Worker(name="w1")

    first = worker.tick()
    clock[0] += settings.RECONCILE_INTERVAL_SECONDS - 1
    second = worker.tick()
    clock[0] += 1
    worker.tick()

    assert first.done["reconcile"] == 1
    assert second.done["reconcile"] == 0
    assert len(calls) == 2
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED and job.failed_step == Step.CONFIGURE


def test_a_failing_reconcile_duty_does_not_stop_the_other_duties(fake_github, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(services, "job_reconcile_runs", broken)
    enqueue(AgentFactory())

    report = Worker(name="w1").tick()

    assert report.failed == {"reconcile": "RuntimeError: boom"}
    assert report.done["dispatch"] == 1
