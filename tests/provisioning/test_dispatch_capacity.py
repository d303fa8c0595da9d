"""Capacity-aware dispatch: at most effective_max_in_flight() runs in flight, across processes;
deprovisions first, then oldest paid; jobs beyond capacity wait without writing anything."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from provisioning import selectors, services
from provisioning.models import JobEvent, JobKind, JobStatus, ProvisioningJob
from provisioning.services import Run
from tests.factories import AgentFactory, JobFactory, UserFactory
from tests.fakes.runner_backend import RecordingBackend
from tests.provisioning.helpers import enqueue

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def capacity(settings):
    settings.PROVISIONING_MAX_IN_FLIGHT = 3
    settings.HETZNER_CALLS_PER_BUILD = 0  # no Hetzner bound: the setting alone decides
    return 3


def dispatched_ids(backend: RecordingBackend) -> list[str]:
    return [job_id for job_id, _a, _m, _r in backend.dispatched]


@pytest.mark.django_db
def test_dispatch_stops_at_capacity_and_writes_nothing_for_waiting_jobs(capacity, backend):
    jobs = [enqueue() for _ in range(5)]
    events_before = JobEvent.objects.count()

    assert services.job_dispatch_due(backend=backend) == capacity
    assert services.job_dispatch_due(backend=backend) == 0  # full: nothing taken, nothing written
    assert services.job_dispatch_due(backend=backend) == 0

    assert dispatched_ids(backend) == [str(j.pk) for j in jobs[:capacity]]
    assert JobEvent.objects.count() == events_before + capacity  # one DISPATCH each, no more
    assert selectors.job_count_in_flight(now=timezone.now()) == capacity
    waiting = [j.pk for j in selectors.job_list_waiting(now=timezone.now())]
    assert waiting == [j.pk for j in jobs[capacity:]]


@pytest.mark.django_db
def test_a_finished_run_frees_its_slot_for_the_oldest_paid_job(capacity, backend):
    jobs = [enqueue() for _ in range(5)]
    services.job_dispatch_due(backend=backend)
    first = jobs[0]
    run = Run(run_id=backend.runs_for(first.pk)[-1] or "", run_attempt=1)
    services.job_claim(job_id=first.pk, attempt=1, run=run)
    assert services.job_dispatch_due(backend=backend) == 0  # claimed: still in flight
    services.job_complete(job_id=first.pk, run=run, server_id="1", ipv4="192.0.2.1")

    assert services.job_dispatch_due(backend=backend) == 1
    assert dispatched_ids(backend)[-1] == str(jobs[3].pk)


@pytest.mark.django_db
def test_deprovisions_go_before_older_builds(capacity, backend):
    builds = [enqueue() for _ in range(4)]
    ending = JobFactory(kind=JobKind.DEPROVISION)  # paid for later, but it stops billing

    services.job_dispatch_due(backend=backend)

    assert dispatched_ids(backend) == [str(ending.pk), str(builds[0].pk), str(builds[1].pk)]


@pytest.mark.django_db
def test_oldest_paid_first_across_customers_and_fifo_within_one(capacity, backend):
    alice = UserFactory()
    a1 = enqueue(AgentFactory(owner=alice))
    b1 = enqueue()
    a2 = enqueue(AgentFactory(owner=alice))
    c1 = enqueue()
    # A retried job keeps its place: it was paid for first.
    ProvisioningJob.objects.filter(pk=c1.pk).update(created_at=timezone.now() - timedelta(hours=1))

    services.job_dispatch_due(backend=backend)

    # alice's second order waits for her first (per-customer FIFO), not for capacity.
    assert dispatched_ids(backend) == [str(c1.pk), str(a1.pk), str(b1.pk)]
    assert selectors.job_queue_position(job=a2) == 1


@pytest.mark.django_db
def test_cleanup_runs_count_against_capacity(capacity, backend):
    for _ in range(capacity):
        JobFactory(
            status=JobStatus.FAILED,
            kind=JobKind.PROVISION,
            claimed_at=timezone.now(),
            completed_at=timezone.now(),
        )
    assert services.job_send_cleanup(backend=backend) == capacity
    enqueue()

    assert services.job_dispatch_due(backend=backend) == 0  # three cleanup runs in flight


@pytest.mark.django_db
def test_a_resend_needs_no_free_slot(capacity, backend, settings):
    jobs = [enqueue() for _ in range(capacity + 1)]
    services.job_dispatch_due(backend=backend)
    later = timezone.now() + timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)

    # The recording backend does not know its runs (None): the unclaimed ones are re-sent.
    assert services.job_dispatch_due(backend=backend, now=later) == capacity
    assert len(backend.dispatched) == 2 * capacity
    assert str(jobs[-1].pk) not in dispatched_ids(backend)  # still waiting for a slot
    assert selectors.job_count_in_flight(now=later) == capacity


# --- several worker processes on PostgreSQL --------------------------------------------------------


def _process_env(limit: int) -> dict[str, str]:
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    return {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_TESTING": "1",
        "PROVISIONING_MAX_IN_FLIGHT": str(limit),
        "HETZNER_CALLS_PER_BUILD": "0",
        "DISPATCH_ON_COMMIT": "0",
    }


def _dispatch_in_processes(n: int, *, limit: int, rounds: int) -> int:
    start_at = time.time() + 4  # every process imports Django first, then they go together
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.provisioning.dispatch_process",
                str(start_at),
                str(rounds),
            ],
            cwd=ROOT,
            env=_process_env(limit),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    taken = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        taken += int(out.strip().splitlines()[-1])
    return taken


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_four_worker_processes_never_exceed_the_in_flight_limit():
    """Nothing completes while the processes race, so the runs in flight only grow: the count
    at the end is the most there ever were. Then five finish, and the next race refills exactly
    five slots."""
    limit = 7
    jobs = [enqueue() for _ in range(60)]  # 60 customers, all due at once

    taken = _dispatch_in_processes(4, limit=limit, rounds=6)

    now = timezone.now()
    assert taken == limit
    assert selectors.job_count_in_flight(now=now) == limit
    assert JobEvent.objects.filter(action=JobEvent.Action.DISPATCH).count() == limit
    sent = ProvisioningJob.objects.filter(dispatched_at__isnull=False).order_by("created_at")
    assert [j.pk for j in sent] == [j.pk for j in jobs[:limit]]  # oldest paid first

    for job in sent[:5]:
        services.job_cancel(job_id=job.pk, actor="operator:test")  # their runs are over

    assert _dispatch_in_processes(4, limit=limit, rounds=6) == 5
    assert selectors.job_count_in_flight(now=timezone.now()) == limit
    assert JobEvent.objects.filter(action=JobEvent.Action.DISPATCH).count() == limit + 5


@pytest.mark.django_db
def test_a_cleanup_run_stops_counting_after_the_claim_window(capacity, backend, settings):
    JobFactory(
        status=JobStatus.FAILED,
        kind=JobKind.PROVISION,
        claimed_at=timezone.now(),
        completed_at=timezone.now(),
    )
    services.job_send_cleanup(backend=backend)
    now = timezone.now()
    later = now + timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)

    assert selectors.job_count_in_flight(now=now) == 1
    assert selectors.job_count_in_flight(now=later) == 0
    assert list(selectors.job_list_in_flight(now=later)) == []
