"""provisioning/eta.py: when a queued job's agent should be ready, from the slots in force, the
runs in flight, the queue ahead and recent build times per region."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from provisioning import eta, limits
from provisioning.models import JobKind, JobStatus, ProvisioningJob
from tests.factories import AgentFactory, JobFactory, UserFactory

pytestmark = pytest.mark.django_db

BUILD = timedelta(seconds=limits.DEFAULT_BUILD_SECONDS)  # no build has finished yet


def queued(*, ago: float, user=None, region: str = "us-east", **fields) -> ProvisioningJob:
    """A queued job paid `ago` seconds before now (the order dispatch takes them)."""
    agent = AgentFactory(owner=user or UserFactory(), region=region)
    job = JobFactory(agent=agent, status=JobStatus.QUEUED, **fields)
    created = timezone.now() - timedelta(seconds=ago)
    ProvisioningJob.objects.filter(pk=job.pk).update(created_at=created)
    job.refresh_from_db()
    return job


def building(*, claimed: datetime, region: str = "us-east") -> ProvisioningJob:
    agent = AgentFactory(region=region)
    return JobFactory(agent=agent, status=JobStatus.PROVISIONING, claimed_at=claimed)


def finished_builds(*, region: str, seconds: float, count: int = 5) -> None:
    now = timezone.now()
    for _ in range(count):
        JobFactory(
            agent=AgentFactory(region=region),
            status=JobStatus.RUNNING,
            kind=JobKind.PROVISION,
            claimed_at=now - timedelta(seconds=seconds),
            completed_at=now,
        )


def test_a_job_alone_in_an_idle_service_is_ready_one_build_from_now():
    job = queued(ago=10)
    now = timezone.now()

    assert eta.estimated_ready_at(job=job, now=now) == now + BUILD


@override_settings(PROVISIONING_MAX_IN_FLIGHT=2)
def test_the_queue_takes_the_slots_as_the_builds_in_flight_free_them():
    now = timezone.now()
    building(claimed=now - timedelta(seconds=300))  # frees its slot in 300 s
    building(claimed=now - timedelta(seconds=100))  # in 500 s
    first, second, third = (queued(ago=a) for a in (30, 20, 10))

    ready = [eta.estimated_ready_at(job=j, now=now) for j in (first, second, third)]

    assert ready == [
        now + timedelta(seconds=300) + BUILD,
        now + timedelta(seconds=500) + BUILD,
        # the third takes the slot the first frees again: not position / slots x build
        now + timedelta(seconds=300) + 2 * BUILD,
    ]


@override_settings(PROVISIONING_MAX_IN_FLIGHT=1)
def test_an_overdue_build_is_expected_to_free_its_slot_now():
    now = timezone.now()
    building(claimed=now - 3 * BUILD)
    job = queued(ago=5)

    assert eta.estimated_ready_at(job=job, now=now) == now + BUILD


@override_settings(PROVISIONING_MAX_IN_FLIGHT=1)
def test_more_runs_in_flight_than_slots_hold_the_slot_until_the_count_is_below_the_limit():
    now = timezone.now()
    building(claimed=now - timedelta(seconds=500))  # frees in 100 s, but one is still running
    building(claimed=now - timedelta(seconds=200))  # frees in 400 s: then there is room
    job = queued(ago=5)

    assert eta.estimated_ready_at(job=job, now=now) == now + timedelta(seconds=400) + BUILD


def test_the_build_time_is_the_regions_own_when_it_has_history():
    finished_builds(region="eu-central", seconds=300)
    now = timezone.now()
    job = queued(ago=5, region="eu-central")

    assert eta.estimated_ready_at(job=job, now=now) == now + timedelta(seconds=300)


@override_settings(PROVISIONING_MAX_IN_FLIGHT=5)
def test_a_customers_later_order_is_ready_only_after_their_earlier_one():
    now = timezone.now()
    customer = UserFactory()
    earlier = queued(ago=30, user=customer)
    later = queued(ago=20, user=customer)

    first = eta.estimated_ready_at(job=earlier, now=now)

    assert first == now + BUILD
    assert eta.estimated_ready_at(job=later, now=now) == first + BUILD


@override_settings(PROVISIONING_MAX_IN_FLIGHT=1)
def test_a_deprovision_goes_first_and_holds_its_slot_only_briefly():
    now = timezone.now()
    build = queued(ago=60)
    deprovision = queued(ago=5, kind=JobKind.DEPROVISION)
    deletion = timedelta(seconds=eta.DEPROVISION_SECONDS)

    assert eta.estimated_ready_at(job=deprovision, now=now) == now + deletion
    assert eta.estimated_ready_at(job=build, now=now) == now + deletion + BUILD


def test_a_job_in_a_retrys_backoff_starts_no_earlier_than_its_backoff_ends():
    now = timezone.now()
    retry_at = now + timedelta(seconds=90)
    job = queued(ago=100, retry_count=1, next_attempt_at=retry_at)

    assert eta.estimated_ready_at(job=job, now=now) == retry_at + BUILD


@override_settings(PROVISIONING_MAX_IN_FLIGHT=1)
def test_a_dispatched_run_holds_a_slot_and_starts_as_soon_as_a_machine_takes_it():
    now = timezone.now()
    dispatched = queued(ago=30, dispatched_at=now - timedelta(seconds=20))
    behind = queued(ago=10)

    assert eta.estimated_ready_at(job=dispatched, now=now) == now + BUILD
    assert eta.estimated_ready_at(job=behind, now=now) == now + 2 * BUILD


def test_only_a_queued_job_has_an_estimate():
    now = timezone.now()

    assert eta.estimated_ready_at(job=building(claimed=now), now=now) is None
    assert eta.estimated_ready_at(job=JobFactory(status=JobStatus.RUNNING), now=now) is None


def claims_after_dispatch(*, seconds: float, count: int = 5) -> None:
    """`count` recent runs that claimed their job `seconds` after its dispatch."""
    from provisioning.models import JobEvent
    from tests.factories import JobEventFactory

    sent = timezone.now() - timedelta(hours=1)
    for _ in range(count):
        job = JobFactory(status=JobStatus.RUNNING)
        for action, at in (("dispatch", sent), ("claim", sent + timedelta(seconds=seconds))):
            event = JobEventFactory(job=job, action=action, attempt=1)
            JobEvent.objects.filter(pk=event.pk).update(created_at=at)


@override_settings(PROVISIONING_MAX_IN_FLIGHT=1)
def test_a_run_holds_its_slot_from_dispatch_through_the_typical_start_and_build():
    claims_after_dispatch(seconds=30)
    start = timedelta(seconds=30)
    now = timezone.now()
    dispatched = queued(ago=30, dispatched_at=now - timedelta(seconds=10))
    behind = queued(ago=10)

    assert eta.typical_start_seconds(now=now) == 30.0
    # dispatched 10 s ago: claims in 20 s, then builds
    assert eta.estimated_ready_at(job=dispatched, now=now) == now + timedelta(seconds=20) + BUILD
    assert eta.estimated_ready_at(job=behind, now=now) == now + timedelta(seconds=20) + BUILD + (
        start + BUILD
    )


def test_the_typical_start_needs_a_few_claims_first():
    claims_after_dispatch(seconds=30, count=4)

    assert eta.typical_start_seconds(now=timezone.now()) == 0.0


@override_settings(PROVISIONING_MAX_IN_FLIGHT=1, DISPATCH_CLAIM_TIMEOUT_SECONDS=600)
def test_a_cleanup_run_holds_its_slot_as_long_as_the_dispatcher_counts_it():
    now = timezone.now()
    JobFactory(status=JobStatus.FAILED, cleanup_dispatched_at=now - timedelta(seconds=100))
    job = queued(ago=5)

    assert eta.estimated_ready_at(job=job, now=now) == now + timedelta(seconds=500) + BUILD
