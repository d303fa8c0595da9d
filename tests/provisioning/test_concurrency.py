"""Races on real PostgreSQL: threads with their own connections, the database checked afterwards."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, connections
from django.utils import timezone

from provisioning import services
from provisioning.errors import ProvisioningError
from provisioning.models import JobEvent, JobStatus, ProvisioningJob
from provisioning.services import Run
from tests.factories import AgentFactory, UserFactory
from tests.fakes.runner_backend import RecordingBackend
from tests.provisioning.helpers import claimed, dispatch, enqueue

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db(transaction=True)]


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(i) in n threads released together; returns results or the exceptions raised."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_twenty_concurrent_enqueues_of_one_stripe_event_make_one_job():
    agent = AgentFactory()

    results = race(20, lambda _i: services.job_enqueue(agent=agent, stripe_event_id="evt_race"))

    assert all(isinstance(r, ProvisioningJob) for r in results), results
    assert len({r.pk for r in results}) == 1
    assert ProvisioningJob.objects.filter(stripe_event_id="evt_race").count() == 1
    assert JobEvent.objects.filter(action="enqueue").count() == 1


def test_twenty_concurrent_claims_of_one_job_have_exactly_one_winner():
    backend = RecordingBackend()
    job = enqueue()
    run = dispatch(job, backend)

    results = race(20, lambda _i: services.job_claim(job_id=job.pk, attempt=1, run=run))

    winners = [r for r in results if isinstance(r, ProvisioningJob)]
    assert len(winners) == 1
    assert all(isinstance(r, ProvisioningError) for r in results if r not in winners)
    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.PROVISIONING
    assert JobEvent.objects.filter(job=job, action="claim").count() == 1


def test_four_dispatchers_over_200_due_jobs_dispatch_each_exactly_once(settings):
    settings.PROVISIONING_MAX_IN_FLIGHT = 1000  # room for all (the limit has its own tests)
    settings.HETZNER_CALLS_PER_BUILD = 0  # no Hetzner bound either
    backend = RecordingBackend()
    jobs = [enqueue() for _ in range(200)]  # 200 customers, one job each: all due

    race(4, lambda _i: services.job_dispatch_due(backend=backend, limit=1000))

    dispatched = Counter(job_id for job_id, _a, _m, _r in backend.dispatched)
    assert set(dispatched) == {str(j.pk) for j in jobs}
    assert max(dispatched.values()) == 1
    assert JobEvent.objects.filter(action="dispatch").count() == 200
    assert ProvisioningJob.objects.filter(workflow_run_id__isnull=True).count() == 0


def test_concurrent_claims_of_two_jobs_of_one_user_never_make_two_provisioning():
    backend = RecordingBackend()
    user = UserFactory()
    first, second = enqueue(AgentFactory(owner=user)), enqueue(AgentFactory(owner=user))
    run1 = dispatch(first, backend)
    # A buggy or duplicated dispatch could hand the second job to a run too; the database holds.
    ProvisioningJob.objects.filter(pk=second.pk).update(
        workflow_run_id="424242", dispatched_at=timezone.now()
    )
    runs = {0: (first, run1), 1: (second, Run(run_id="424242"))}

    results = race(2, lambda i: services.job_claim(job_id=runs[i][0].pk, attempt=1, run=runs[i][1]))

    assert sum(isinstance(r, ProvisioningJob) for r in results) == 1
    assert ProvisioningJob.objects.filter(user=user, status=JobStatus.PROVISIONING).count() == 1


@pytest.mark.parametrize("round_", range(5))
def test_a_heartbeat_racing_the_timeout_sweep_has_one_coherent_outcome(round_):
    backend = RecordingBackend()
    job, run = claimed(backend)
    ProvisioningJob.objects.filter(pk=job.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(hours=1)
    )

    def act(i: int) -> Any:
        if i == 0:
            return services.job_heartbeat(job_id=job.pk, run=run, progress=55)
        return services.job_timeout_stale()

    heartbeat, swept = race(2, act)

    job.refresh_from_db()
    timeouts = JobEvent.objects.filter(job=job, action="timeout").count()
    if isinstance(heartbeat, ProvisioningError):
        # The sweep won: the job was requeued and the late heartbeat changed nothing.
        assert swept == 1 and timeouts == 1
        assert (job.status, job.attempt, job.progress) == ("queued", 2, None)
    else:
        # The heartbeat won: the sweep saw a fresh heartbeat and left the job alone.
        assert swept == 0 and timeouts == 0
        assert (job.status, job.attempt, job.progress) == ("provisioning", 1, 55)


def test_a_row_locked_by_one_dispatcher_is_skipped_by_another():
    backend = RecordingBackend()
    first, second = enqueue(), enqueue()
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        from django.db import transaction

        with transaction.atomic():
            ProvisioningJob.objects.select_for_update().get(pk=first.pk)
            locked.set()
            release.wait(10)
        connections.close_all()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait(10)
    try:
        taken = services.job_dispatch_next(backend=backend)
    finally:
        release.set()
        holder.join()

    assert taken is not None and taken.pk == second.pk
    assert connection.vendor == "postgresql"
