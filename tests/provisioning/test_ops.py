"""/healthz and /metrics: computed from the database at request time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import DatabaseError
from django.db.models import F
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from provisioning import services
from provisioning.models import JobKind, ProvisioningJob, Step, WorkerBeat
from provisioning.worker import Worker
from tests.factories import AgentFactory, UserFactory
from tests.provisioning.helpers import claimed, enqueue

pytestmark = pytest.mark.django_db


def samples(client: Client, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


# --- /healthz ------------------------------------------------------------------------------------


def test_healthz_says_when_no_worker_ever_ran(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["database"] == "ok"
    assert response.json()["worker"] == "absent"
    assert response.json()["last_tick_age_seconds"] is None


def test_healthz_is_ok_after_a_worker_ticked(client, backend):
    Worker(name="w", backend=backend).tick()

    body = client.get("/healthz").json()

    assert body["worker"] == "ok"
    assert 0 <= body["last_tick_age_seconds"] < 5


def test_healthz_reports_a_stale_worker_but_stays_200(client, settings):
    settings.WORKER_INTERVAL_SECONDS = 5
    old = timezone.now() - timedelta(seconds=61)
    WorkerBeat.objects.create(name="w", last_tick_at=old, started_at=old)

    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["worker"] == "stale"
    assert response.json()["last_tick_age_seconds"] >= 61


def test_healthz_is_503_when_the_database_is_unreachable(client, monkeypatch):
    from django.db.backends.utils import CursorWrapper

    def refuse(*args, **kwargs):
        raise DatabaseError("connection refused")

    monkeypatch.setattr(CursorWrapper, "execute", refuse)

    response = client.get("/healthz")

    assert response.status_code == 503
    assert response.json()["database"] == "unreachable"


# --- /metrics ------------------------------------------------------------------------------------


def test_metrics_count_jobs_by_status_and_kind_and_report_ages(client, backend, settings):
    job, _ = claimed(backend)
    ProvisioningJob.objects.filter(pk=job.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(seconds=settings.JOB_TIMEOUT_SECONDS + 30)
    )
    queued = enqueue(AgentFactory())
    ProvisioningJob.objects.filter(pk=queued.pk).update(
        created_at=timezone.now() - timedelta(seconds=120)
    )
    enqueue(AgentFactory(), kind=JobKind.DEPROVISION)

    m = samples(client)

    assert m[("provisioning_jobs", (("kind", "provision"), ("status", "queued")))] == 1
    assert m[("provisioning_jobs", (("kind", "deprovision"), ("status", "queued")))] == 1
    assert m[("provisioning_jobs", (("kind", "provision"), ("status", "provisioning")))] == 1
    assert m[("provisioning_failed_jobs", ())] == 0
    assert m[("provisioning_oldest_queued_job_age_seconds", ())] >= 120
    assert m[("provisioning_oldest_heartbeat_age_seconds", ())] >= settings.JOB_TIMEOUT_SECONDS
    assert m[("provisioning_stale_jobs", ())] == 1


def test_metrics_report_outcomes_and_the_provisioning_duration(client, backend):
    user = UserFactory()
    ok, ok_run = claimed(backend, AgentFactory(owner=user))
    services.job_complete(job_id=ok.pk, run=ok_run, server_id="1", ipv4="203.0.113.1")
    ProvisioningJob.objects.filter(pk=ok.pk).update(
        claimed_at=F("completed_at") - timedelta(seconds=400)
    )
    bad, bad_run = claimed(backend, AgentFactory(owner=user), max_retries=0)
    services.job_fail(job_id=bad.pk, run=bad_run, error="boom", failed_step=Step.CONFIGURE)

    m = samples(client)

    finished = "provisioning_jobs_finished_24h"
    assert m[(finished, (("kind", "provision"), ("outcome", "running")))] == 1
    assert m[(finished, (("kind", "provision"), ("outcome", "failed")))] == 1
    assert m[(finished, (("kind", "deprovision"), ("outcome", "running")))] == 0
    assert m[("provisioning_failed_jobs", ())] == 1
    assert ("provisioning_jobs", (("kind", "provision"), ("status", "running"))) not in m
    assert m[("provisioning_job_duration_seconds_count", ())] == 1
    assert m[("provisioning_job_duration_seconds_sum", ())] == pytest.approx(400)
    assert m[("provisioning_job_duration_seconds_bucket", (("le", "300.0"),))] == 0
    assert m[("provisioning_job_duration_seconds_bucket", (("le", "600.0"),))] == 1
    assert m[("provisioning_job_duration_seconds_bucket", (("le", "+Inf"),))] == 1


def test_metrics_report_the_workers_last_tick(client, backend):
    empty = samples(client)
    Worker(name="w", backend=backend).tick()
    after = samples(client)

    assert empty[("provisioning_worker_last_tick_age_seconds", ())] == float("inf")
    assert empty[("provisioning_workers_alive", ())] == 0
    assert after[("provisioning_worker_last_tick_age_seconds", ())] < 5
    assert after[("provisioning_workers_alive", ())] == 1


def test_metrics_need_the_token_when_one_is_set(client, settings):
    settings.METRICS_TOKEN = "scrape-secret"

    anonymous = client.get("/metrics")
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer nope")
    right = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret")

    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert right.status_code == 200


def test_ops_endpoints_answer_get_only(client):
    assert client.post("/healthz").status_code == 405
    assert client.post("/metrics").status_code == 405


# --- deadlines, reconciliation and dispatch health -------------------------------------------------


def test_metrics_count_overdue_unreconciled_unclaimed_and_dispatch_failing_jobs(
    client, backend, settings
):
    from provisioning.models import JobEvent, JobStatus

    now = timezone.now()
    zero = samples(client)
    for name in (
        "provisioning_overdue_jobs",
        "provisioning_unreconciled_jobs",
        "provisioning_unclaimed_jobs",
        "provisioning_dispatch_failing_jobs",
    ):
        assert zero[(name, ())] == 0, name

    # Overdue: claimed past the deadline, still beating (so not silent); also unreconciled.
    overdue, _ = claimed(backend)
    ProvisioningJob.objects.filter(pk=overdue.pk).update(
        claimed_at=now - timedelta(seconds=settings.JOB_DEADLINE_SECONDS + 5),
        last_heartbeat_at=now,
    )
    # Checked against GitHub a moment ago, claimed long ago: reconciled, not overdue.
    checked, _ = claimed(backend)
    ProvisioningJob.objects.filter(pk=checked.pk).update(
        claimed_at=now - timedelta(seconds=3 * settings.RECONCILE_INTERVAL_SECONDS),
        reconciled_at=now - timedelta(seconds=10),
    )
    # Claimed a minute ago, never checked: not yet unreconciled.
    claimed(backend)
    # A previous attempt's old check does not count for a freshly claimed attempt.
    fresh, _ = claimed(backend)
    ProvisioningJob.objects.filter(pk=fresh.pk).update(reconciled_at=now - timedelta(days=1))

    # Unclaimed: dispatched longer ago than the claim window, still queued in the same attempt.
    unclaimed = enqueue(AgentFactory())
    services.job_dispatch_next(backend=backend)
    JobEvent.objects.filter(job=unclaimed, action=JobEvent.Action.DISPATCH).update(
        created_at=now - timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 5)
    )
    # Dispatched a moment ago: waiting for its claim, not unclaimed.
    waiting = enqueue(AgentFactory())
    services.job_dispatch_next(backend=backend)
    # Dispatch failing: the backend refused the latest try.
    backend.fail_next = 1
    failing = enqueue(AgentFactory())
    services.job_dispatch_next(backend=backend)
    # Failed once, then dispatched: not failing any more.
    backend.fail_next = 1
    recovered = enqueue(AgentFactory())
    services.job_dispatch_next(backend=backend)
    ProvisioningJob.objects.filter(pk=recovered.pk).update(next_attempt_at=None)
    assert services.job_dispatch_next(backend=backend).pk == recovered.pk

    m = samples(client)

    assert ProvisioningJob.objects.filter(pk=waiting.pk, status=JobStatus.QUEUED).exists()
    assert ProvisioningJob.objects.filter(pk=failing.pk, dispatched_at=None).exists()
    assert m[("provisioning_overdue_jobs", ())] == 1
    assert m[("provisioning_stale_jobs", ())] == 1  # the overdue one, awaiting the sweep
    assert m[("provisioning_unreconciled_jobs", ())] == 1  # the overdue one only
    assert m[("provisioning_unclaimed_jobs", ())] == 1
    assert m[("provisioning_dispatch_failing_jobs", ())] == 1


def test_metrics_count_failed_provisions_owing_their_cleanup_run(client, backend):
    job, run = claimed(backend, max_retries=0)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE)

    owed = samples(client)[("provisioning_cleanup_due_jobs", ())]
    services.job_send_cleanup(backend=backend)
    after = samples(client)[("provisioning_cleanup_due_jobs", ())]

    assert (owed, after) == (1, 0)


def test_the_lifecycle_metrics_read_only_in_flight_or_queued_rows(client, backend, settings):
    """Finished jobs (the bulk of a big table) never count, whatever their timestamps."""
    from provisioning.models import JobStatus

    old = timezone.now() - timedelta(days=30)
    done, run = claimed(backend)
    services.job_complete(job_id=done.pk, run=run, server_id="1", ipv4="203.0.113.1")
    ProvisioningJob.objects.filter(pk=done.pk).update(claimed_at=old, reconciled_at=None)
    assert ProvisioningJob.objects.get(pk=done.pk).status == JobStatus.RUNNING

    m = samples(client)

    assert m[("provisioning_overdue_jobs", ())] == 0
    assert m[("provisioning_unreconciled_jobs", ())] == 0


# --- timings from the job history ----------------------------------------------------------------


def history(job: ProvisioningJob, start, *events: tuple[float, str, str]) -> None:
    """The job was ordered at `start`; each event (seconds after, action, step) then happened."""
    from provisioning.models import JobEvent
    from tests.factories import JobEventFactory

    ProvisioningJob.objects.filter(pk=job.pk).update(created_at=start)
    for seconds, action, step in events:
        event = JobEventFactory(job=job, action=action, step=step, attempt=1)
        JobEvent.objects.filter(pk=event.pk).update(created_at=start + timedelta(seconds=seconds))


def test_metrics_histograms_of_step_durations_time_to_running_and_waiting_for_capacity(client):
    from provisioning.models import JobStatus
    from tests.factories import JobFactory

    start = timezone.now() - timedelta(hours=1)
    built = JobFactory(status=JobStatus.RUNNING)
    history(
        built,
        start,
        (0, "enqueue", ""),
        (100, "dispatch", ""),  # waited 100 s for a slot
        (130, "claim", "claim"),  # claim: 10 s
        (140, "step", "create-server"),  # 60 s
        (200, "step", "wait-ssh"),  # 60 s
        (230, "note", ""),  # a remark ends no step
        (260, "step", "configure"),  # 300 s
        (560, "step", "health-check"),  # 40 s
        (600, "complete", "complete"),  # running 600 s after the order
    )
    building = JobFactory(status=JobStatus.PROVISIONING)
    history(
        building,
        start,
        (0, "enqueue", ""),
        (1000, "dispatch", ""),  # waited 1000 s
        (1300, "dispatch", ""),  # a re-send: not a wait of its own
        (1310, "claim", "claim"),  # 5 s
        (1315, "step", "create-server"),  # still running: left out
    )
    old = JobFactory(status=JobStatus.RUNNING)
    history(
        old,
        start - timedelta(days=2),
        (0, "enqueue", ""),
        (50, "dispatch", ""),
        (60, "claim", "claim"),
        (70, "complete", "complete"),
    )

    m = samples(client)

    def h(name: str, le: str, **labels: str) -> float:
        return m[(f"{name}_bucket", tuple(sorted({**labels, "le": le}.items())))]

    step = "provisioning_step_duration_seconds"
    assert m[(f"{step}_count", (("step", "claim"),))] == 2
    assert m[(f"{step}_sum", (("step", "claim"),))] == pytest.approx(15)
    assert h(step, "5.0", step="claim") == 1
    assert h(step, "10.0", step="claim") == 2
    assert m[(f"{step}_count", (("step", "create-server"),))] == 1
    assert m[(f"{step}_sum", (("step", "wait-ssh"),))] == pytest.approx(60)
    assert h(step, "120.0", step="configure") == 0
    assert h(step, "300.0", step="configure") == 1
    assert h(step, "+Inf", step="configure") == 1
    assert m[(f"{step}_sum", (("step", "health-check"),))] == pytest.approx(40)

    running = "provisioning_time_to_running_seconds"
    assert m[(f"{running}_count", ())] == 1
    assert m[(f"{running}_sum", ())] == pytest.approx(600)
    assert h(running, "300.0") == 0
    assert h(running, "600.0") == 1

    wait = "provisioning_capacity_wait_seconds"
    assert m[(f"{wait}_count", ())] == 2
    assert m[(f"{wait}_sum", ())] == pytest.approx(1100)
    assert h(wait, "120.0") == 1
    assert h(wait, "600.0") == 1
    assert h(wait, "1800.0") == 2
    assert h(wait, "+Inf") == 2


def test_metrics_timings_are_empty_histograms_without_history(client):
    m = samples(client)

    assert m[("provisioning_time_to_running_seconds_count", ())] == 0
    assert m[("provisioning_capacity_wait_seconds_bucket", (("le", "+Inf"),))] == 0
    assert m[("provisioning_step_duration_seconds_count", (("step", "configure"),))] == 0
