"""The timeout sweep's batch path (PostgreSQL: one UPDATE per batch) against the one-by-one path
it replaces: the same fixture built twice, timed out both ways, must leave the same rows, events,
alerts and cancelled runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from provisioning import services
from provisioning.models import JobEvent, JobStatus, OperatorAlert, ProvisioningJob, Step
from provisioning.services import timeouts
from tests.factories import JobFactory
from tests.fakes.runner_backend import RecordingBackend

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db]

CLOCK = datetime(2026, 3, 4, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)

# (what the job looks like, relative to CLOCK): every branch of the retry/fail split and _why().
SHAPES: list[dict[str, Any]] = [
    # silent, first retry
    {"last_heartbeat_at": HOUR, "claimed_at": 2 * HOUR, "step": Step.CONFIGURE},
    # silent, later retry (bigger backoff)
    {"last_heartbeat_at": HOUR, "claimed_at": HOUR, "retry_count": 2, "progress": 40},
    # silent, retries spent: failed for good, operators alerted
    {"last_heartbeat_at": HOUR, "claimed_at": HOUR, "retry_count": 3, "step": Step.WAIT_SSH},
    # no retries at all
    {"last_heartbeat_at": HOUR, "claimed_at": HOUR, "max_retries": 0, "retry_count": 0},
    # backoff capped
    {"last_heartbeat_at": HOUR, "claimed_at": HOUR, "max_retries": 12, "retry_count": 11},
    # past the deadline with fresh heartbeats, retries left / spent
    {"last_heartbeat_at": timedelta(seconds=5), "claimed_at": 3 * HOUR, "step": Step.CONFIGURE},
    {"last_heartbeat_at": timedelta(seconds=5), "claimed_at": 3 * HOUR, "retry_count": 3},
    # silent and past the deadline: silence is the reason given
    {"last_heartbeat_at": 2 * HOUR, "claimed_at": 3 * HOUR, "step": ""},
    # never heartbeated: silent since the claim; nor claimed: since the last update
    {"last_heartbeat_at": None, "claimed_at": timedelta(seconds=1000)},
    {"last_heartbeat_at": None, "claimed_at": None, "updated_at": timedelta(seconds=9000)},
    # not stale: left alone
    {"last_heartbeat_at": timedelta(seconds=30), "claimed_at": timedelta(seconds=60)},
    {"status": JobStatus.QUEUED, "updated_at": 3 * HOUR, "run_attempt": None},
]


def build() -> list[ProvisioningJob]:
    jobs = []
    for k, shape in enumerate(SHAPES):
        values: dict[str, Any] = {
            "status": JobStatus.PROVISIONING,
            "workflow_run_id": f"run-{k}",
            "run_attempt": 1,
            "attempt": 1 + shape.get("retry_count", 0),
            "max_retries": 3,
            "step": Step.HEALTH_CHECK,
            "progress": 70,
            "dispatched_at": CLOCK - 3 * HOUR,
            "updated_at": timedelta(seconds=20),
            **shape,
        }
        for field in ("last_heartbeat_at", "claimed_at", "updated_at"):
            if isinstance(values.get(field), timedelta):
                values[field] = CLOCK - values[field]
        job = JobFactory()
        ProvisioningJob.objects.filter(pk=job.pk).update(**values)
        jobs.append(job)
    return jobs


SKIP = {"id", "agent", "user", "stripe_event_id", "created_at"}


def snapshot(jobs: list[ProvisioningJob]) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        job.refresh_from_db()
        row = {f.name: getattr(job, f.attname) for f in job._meta.concrete_fields}
        out.append(
            {
                "job": {k: v for k, v in row.items() if k not in SKIP},
                "events": list(
                    JobEvent.objects.filter(job=job)
                    .order_by("id")
                    .values(
                        "created_at",
                        "actor",
                        "action",
                        "from_status",
                        "to_status",
                        "attempt",
                        "workflow_run_id",
                        "step",
                        "reason",
                    )
                ),
                "alerts": list(
                    OperatorAlert.objects.filter(job=job).values(
                        "attempt", "created_at", "emailed_at", "posted_at", "tries"
                    )
                ),
            }
        )
    return out


def test_the_batch_sweep_leaves_exactly_what_timing_out_one_by_one_does(
    monkeypatch, settings, django_capture_on_commit_callbacks
):
    settings.JOB_TIMEOUT_SECONDS = 900
    settings.JOB_DEADLINE_SECONDS = 7200
    settings.RETRY_BACKOFF_SECONDS = 30
    settings.RETRY_BACKOFF_MAX_SECONDS = 1800
    # Both paths write "now" several times; a still clock makes those writes comparable.
    monkeypatch.setattr(timezone, "now", lambda: CLOCK)
    backend = RecordingBackend()
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)
    monkeypatch.setattr(timeouts, "SWEEP_BATCH", 3)  # several batches, one cut short

    one_by_one = build()
    with django_capture_on_commit_callbacks(execute=True):
        single = [services.job_timeout_if_stale(job_id=j.pk, now=CLOCK) for j in one_by_one]
    single_cancelled = sorted(backend.cancelled)
    backend.cancelled.clear()

    batched = build()
    with django_capture_on_commit_callbacks(execute=True):
        swept = services.job_timeout_stale(now=CLOCK)

    assert sum(single) == swept == 10
    expected, got = snapshot(one_by_one), snapshot(batched)
    for k, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"shape {k}: {SHAPES[k]}"
    assert sorted(backend.cancelled) == single_cancelled == [f"run-{k}" for k in range(10)]
    # The fixture does reach every branch.
    statuses = [s["job"]["status"] for s in got]
    assert statuses.count(JobStatus.QUEUED) == 8 and statuses.count(JobStatus.FAILED) == 3
    reasons = " ".join(e["reason"] for s in got for e in s["events"])
    assert "deadline" in reasons and "during step unknown" in reasons
    assert "(limit 900s)" in reasons and "retry 3 of 3" in reasons and "retry 12 of 12" in reasons


def test_the_sweep_stops_at_its_limit_and_the_next_one_takes_the_rest(monkeypatch, backend):
    monkeypatch.setattr(timeouts, "SWEEP_BATCH", 2)
    jobs = build()

    assert services.job_timeout_stale(now=CLOCK, limit=5) == 5
    assert services.job_timeout_stale(now=CLOCK, limit=5) == 5
    assert services.job_timeout_stale(now=CLOCK) == 0
    assert JobEvent.objects.filter(job__in=jobs, action="timeout").count() == 10


def test_the_stale_ids_are_the_stale_querysets_ids_with_a_limit_and_other_limits():
    from provisioning import selectors

    build()
    stale = set(selectors.job_list_stale(now=CLOCK).values_list("pk", flat=True))

    assert len(stale) == 10
    assert set(selectors.job_ids_stale(now=CLOCK, limit=100)) == stale
    assert set(selectors.job_ids_stale(now=CLOCK, limit=4)) < stale
    assert len(selectors.job_ids_stale(now=CLOCK, limit=4)) == 4
    # The compiled SQL is kept, the times are not: an hour later nothing is left out.
    later = selectors.job_ids_stale(now=CLOCK + HOUR, limit=100, timeout_seconds=1)
    assert set(later) == set(
        selectors.job_list_stale(now=CLOCK + HOUR, timeout_seconds=1).values_list("pk", flat=True)
    )
    assert len(later) > len(stale)
