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
from provisioning.models import JobKind, JobStatus, ProvisioningJob, Step, WorkerBeat
from provisioning.worker import Worker
from tests.factories import AgentFactory, JobFactory, UserFactory
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
    # A deprovision that deleted its VM: stored as `running`, counted as "deleted".
    JobFactory(kind=JobKind.DEPROVISION, status=JobStatus.RUNNING, completed_at=timezone.now())

    m = samples(client)

    finished = "provisioning_jobs_finished_24h"
    assert m[(finished, (("kind", "provision"), ("outcome", "running")))] == 1
    assert m[(finished, (("kind", "provision"), ("outcome", "failed")))] == 1
    assert m[(finished, (("kind", "deprovision"), ("outcome", "deleted")))] == 1
    assert m[(finished, (("kind", "deprovision"), ("outcome", "failed")))] == 0
    assert (finished, (("kind", "deprovision"), ("outcome", "running"))) not in m
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
