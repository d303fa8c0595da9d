"""Several workers at once, on PostgreSQL (SQLite ignores row locks): no job dispatched twice."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from provisioning import services
from provisioning.models import JobEvent, JobStatus, ProvisioningJob
from provisioning.services import Run
from provisioning.worker import TickReport, Worker
from tests.factories import AgentFactory, UserFactory

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db(transaction=True)]

WORKERS = 4
JOBS = 60


def race(workers: list[Worker], ticks: int) -> list[TickReport]:
    """Every worker ticks `ticks` times, all starting together, each on its own connection."""
    barrier = threading.Barrier(len(workers))
    reports: list[TickReport] = []
    lock = threading.Lock()

    def run(worker: Worker) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(ticks):
                report = worker.tick()
                with lock:
                    reports.append(report)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return reports


def test_workers_ticking_at_once_dispatch_each_due_job_exactly_once(fake_github, settings):
    settings.PROVISIONING_MAX_IN_FLIGHT = 1000  # room for all (the limit has its own tests)
    settings.HETZNER_CALLS_PER_BUILD = 0  # no Hetzner bound either
    jobs = [services.job_enqueue(agent=AgentFactory()) for _ in range(JOBS)]
    backend = fake_github.backend()
    workers = [Worker(name=f"w{i}", backend=backend, dispatch_limit=10) for i in range(WORKERS)]

    reports = race(workers, ticks=4)

    assert all(r.ok for r in reports), [r.failed for r in reports if not r.ok]
    assert sum(r.done["dispatch"] for r in reports) == JOBS
    sent = Counter(d.inputs["job_id"] for d in fake_github.dispatches)
    assert sent == Counter({str(j.pk): 1 for j in jobs})
    events = Counter(
        JobEvent.objects.filter(action=JobEvent.Action.DISPATCH).values_list("job_id", flat=True)
    )
    assert set(events.values()) == {1} and len(events) == JOBS
    run_ids = {d.run_id for d in fake_github.dispatches}
    stored = set(ProvisioningJob.objects.values_list("workflow_run_id", flat=True))
    assert stored == run_ids


def test_workers_ticking_at_once_respect_one_job_per_customer(fake_github):
    users = [UserFactory() for _ in range(5)]
    for user in users:
        for _ in range(3):
            services.job_enqueue(agent=AgentFactory(owner=user))
    backend = fake_github.backend()
    workers = [Worker(name=f"w{i}", backend=backend) for i in range(WORKERS)]

    race(workers, ticks=2)

    # Per-customer FIFO: only each customer's oldest job is due while the rest wait.
    assert len(fake_github.dispatches) == len(users)
    assert ProvisioningJob.objects.filter(workflow_run_id__isnull=False).count() == len(users)


def test_workers_sweeping_at_once_time_out_a_silent_job_once(fake_github, settings):
    job = services.job_enqueue(agent=AgentFactory())
    services.job_dispatch_next(backend=fake_github.backend())
    job.refresh_from_db()
    run = Run(run_id=job.workflow_run_id)
    services.job_claim(job_id=job.pk, attempt=1, run=run)
    silent = timezone.now() - timedelta(seconds=settings.JOB_TIMEOUT_SECONDS + 5)
    ProvisioningJob.objects.filter(pk=job.pk).update(last_heartbeat_at=silent)
    workers = [Worker(name=f"w{i}", backend=fake_github.backend()) for i in range(WORKERS)]

    reports = race(workers, ticks=1)

    assert sum(r.done["timeout"] for r in reports) == 1
    job.refresh_from_db()
    assert (job.status, job.retry_count, job.attempt) == (JobStatus.QUEUED, 1, 2)
    assert JobEvent.objects.filter(job=job, action=JobEvent.Action.TIMEOUT).count() == 1
    assert fake_github.cancelled == [run.run_id]  # the silent run, once
