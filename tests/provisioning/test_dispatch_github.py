"""The dispatcher against the fake GitHub at the wire: rate-limit hints and unclaimed dispatches
whose run is still waiting (an environment's protection rules, a busy runner pool)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from provisioning import services
from provisioning.models import JobEvent, ProvisioningJob
from provisioning.services import Run
from tests.factories import AgentFactory
from tests.fakes.github import RATE_LIMIT_RESET_SECONDS, SECONDARY_RETRY_AFTER_SECONDS
from tests.provisioning.helpers import enqueue

pytestmark = pytest.mark.django_db


def _after_the_claim_window(settings, job: ProvisioningJob) -> None:
    """Move the job's dispatch back past DISPATCH_CLAIM_TIMEOUT_SECONDS."""
    ProvisioningJob.objects.filter(pk=job.pk).update(
        dispatched_at=timezone.now()
        - timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)
    )


@pytest.mark.parametrize("status", ["queued", "waiting", "pending", "requested", "in_progress"])
def test_an_unclaimed_run_that_may_still_claim_is_not_dispatched_again(
    fake_github, settings, status
):
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    [first] = fake_github.dispatches
    fake_github.set_run(first.run_id, status=status)
    _after_the_claim_window(settings, job)

    again = services.job_dispatch_next()

    assert again is not None and again.pk == job.pk
    assert len(fake_github.dispatches) == 1  # no twin queued behind the waiting run
    assert fake_github.cancelled == []
    job.refresh_from_db()
    assert job.workflow_run_id == first.run_id
    assert job.dispatched_at > timezone.now() - timedelta(seconds=5)  # waits another window
    note = JobEvent.objects.get(job=job, action=JobEvent.Action.NOTE)
    assert note.reason.startswith("Waiting for a build machine")
    assert status in note.reason
    assert services.job_dispatch_next() is None  # not due again until the next window
    # The waiting run still claims.
    claimed = services.job_claim(job_id=job.pk, attempt=1, run=Run(run_id=first.run_id))
    assert claimed.status == "provisioning"


@pytest.mark.parametrize(
    "conclusion",
    [
        "success",
        "failure",
        "cancelled",
        "timed_out",
        "skipped",
        "neutral",
        "stale",
        "action_required",
    ],
)
def test_an_unclaimed_run_that_finished_is_replaced(fake_github, settings, conclusion):
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    [first] = fake_github.dispatches
    fake_github.set_run(first.run_id, status="completed", conclusion=conclusion)
    _after_the_claim_window(settings, job)

    services.job_dispatch_next()

    assert len(fake_github.dispatches) == 2
    job.refresh_from_db()
    assert job.workflow_run_id == fake_github.dispatches[1].run_id
    assert not JobEvent.objects.filter(job=job, action=JobEvent.Action.NOTE).exists()


def test_an_unclaimed_run_github_does_not_know_is_replaced_and_its_cancel_tried(
    fake_github, settings
):
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    [first] = fake_github.dispatches
    del fake_github.runs[first.run_id]
    _after_the_claim_window(settings, job)

    services.job_dispatch_next()

    assert len(fake_github.dispatches) == 2
    job.refresh_from_db()
    assert job.workflow_run_id == fake_github.dispatches[1].run_id


def test_a_waiting_run_dispatched_without_an_id_is_found_by_title_and_kept(fake_github, settings):
    fake_github.legacy_ghes = True
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    [first] = fake_github.dispatches
    job.refresh_from_db()
    assert job.workflow_run_id is None
    fake_github.set_run(first.run_id, status="waiting")
    # A cleanup run of the same job and attempt, newer, must not be mistaken for it.
    fake_github.set_run("18000000999", display_title=f"cleanup {job.pk} attempt 1")
    _after_the_claim_window(settings, job)

    services.job_dispatch_next()

    assert len(fake_github.dispatches) == 1
    job.refresh_from_db()
    assert job.workflow_run_id == first.run_id
    claimed = services.job_claim(job_id=job.pk, attempt=1, run=Run(run_id=first.run_id))
    assert claimed.status == "provisioning"


def test_a_github_outage_while_checking_the_old_run_still_re_sends(fake_github, settings):
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    _after_the_claim_window(settings, job)
    fake_github.fail_next(1, status=502)  # the run lookup

    services.job_dispatch_next()

    assert len(fake_github.dispatches) == 2


@pytest.mark.parametrize(
    ("secondary", "wait"),
    [(False, RATE_LIMIT_RESET_SECONDS), (True, SECONDARY_RETRY_AFTER_SECONDS)],
)
@pytest.mark.parametrize("status", [403, 429])
def test_a_rate_limited_dispatch_is_retried_no_earlier_than_github_asks(
    fake_github, settings, secondary, wait, status
):
    settings.RETRY_BACKOFF_SECONDS = 10
    job = enqueue(AgentFactory())
    services.job_dispatch_next()  # the token is cached; the next call is the dispatch itself
    job2 = enqueue(AgentFactory())
    fake_github.rate_limit_next(status=status, secondary=secondary)
    before = timezone.now()

    services.job_dispatch_next()

    job2.refresh_from_db()
    assert job2.dispatched_at is None
    delay = (job2.next_attempt_at - before).total_seconds()
    assert wait - 5 <= delay <= wait + 5
    failed = JobEvent.objects.get(job=job2, action=JobEvent.Action.DISPATCH_FAILED)
    assert "rate limit" in failed.reason
    assert job.pk != job2.pk


def test_a_wild_retry_after_is_capped(fake_github, settings):
    from provisioning.backends import DispatchError
    from provisioning.services.dispatch import MAX_RETRY_AFTER_SECONDS, retry_delay_seconds

    settings.RETRY_BACKOFF_SECONDS = 30
    assert retry_delay_seconds(DispatchError("x", status=429, retry_after=10**9)) == (
        MAX_RETRY_AFTER_SECONDS
    )
    assert retry_delay_seconds(DispatchError("x", status=429, retry_after=1)) == 30
    assert retry_delay_seconds(RuntimeError("x")) == 30
