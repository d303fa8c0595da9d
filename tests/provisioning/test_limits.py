"""provisioning/limits.py: the effective in-flight limit and the figures it comes from; the waiting
list and queue positions in dispatch order."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from provisioning import limits, selectors, services
from provisioning.models import JobKind, JobStatus, ProvisioningJob
from tests.factories import AgentFactory, JobFactory
from tests.provisioning.helpers import enqueue

pytestmark = pytest.mark.django_db


def finished_build(*, seconds: float, region: str = "us-east", calls: int | None = None) -> None:
    now = timezone.now()
    JobFactory(
        agent=AgentFactory(region=region),
        status=JobStatus.RUNNING,
        kind=JobKind.PROVISION,
        claimed_at=now - timedelta(seconds=seconds),
        completed_at=now,
        hetzner_calls=calls,
    )


def test_without_history_the_defaults_apply():
    assert limits.typical_build_seconds() == limits.DEFAULT_BUILD_SECONDS
    assert limits.typical_build_seconds(region="eu-central") == limits.DEFAULT_BUILD_SECONDS
    with override_settings(HETZNER_CALLS_PER_BUILD=7):
        assert limits.hetzner_calls_per_build() == 7.0


def test_build_seconds_is_the_median_per_region_then_overall():
    for seconds in (100, 200, 300, 400, 500):
        finished_build(seconds=seconds, region="eu-central")
    for seconds in (50, 60):  # too few in us-east: the overall median answers
        finished_build(seconds=seconds, region="us-east")

    assert limits.typical_build_seconds(region="eu-central") == pytest.approx(300, abs=1)
    assert limits.typical_build_seconds(region="us-east") == pytest.approx(200, abs=1)
    assert limits.typical_build_seconds() == pytest.approx(200, abs=1)


def test_calls_per_build_is_the_median_reported():
    for calls in (8, 9, 10, 30, 11):
        finished_build(seconds=100, calls=calls)
    assert limits.hetzner_calls_per_build() == 10.0


@override_settings(
    PROVISIONING_MAX_IN_FLIGHT=20,
    HETZNER_API_BUDGET_PER_HOUR=3600,
    API_BUDGET_WINDOW_SECONDS=3600,
    HETZNER_CALLS_PER_BUILD=12,
)
def test_effective_limit_is_the_smaller_of_the_setting_and_the_hetzner_bound():
    # 600 s builds, 12 calls each: one slot makes 6 builds/hour = 72 calls; 3600 / 72 = 50 slots.
    assert limits.effective_max_in_flight() == 20
    # 60 s builds with 60 calls each: one slot makes 3600 calls/hour: one slot.
    for _ in range(5):
        finished_build(seconds=60, calls=60)
    assert limits.effective_max_in_flight() == 1
    with override_settings(HETZNER_API_BUDGET_PER_HOUR=36_000):
        assert limits.effective_max_in_flight() == 10
    with override_settings(HETZNER_API_BUDGET_PER_HOUR=10):
        assert limits.effective_max_in_flight() == 1  # never below one


def test_waiting_list_puts_deprovisions_first_then_oldest_paid(backend):
    older, newer = enqueue(), enqueue()
    ending = JobFactory(kind=JobKind.DEPROVISION)
    in_backoff = JobFactory(next_attempt_at=timezone.now() + timedelta(minutes=5))
    sent = enqueue()
    services.job_dispatch_next(backend=backend)  # takes the deprovision
    ProvisioningJob.objects.filter(pk=sent.pk).update(dispatched_at=timezone.now())

    now = timezone.now()
    assert [j.pk for j in selectors.job_list_waiting(now=now)] == [older.pk, newer.pk]
    assert selectors.job_queue_position(job=older) == 1
    assert selectors.job_queue_position(job=newer) == 2
    ending.refresh_from_db()
    sent.refresh_from_db()
    assert selectors.job_queue_position(job=ending) is None  # dispatched
    assert selectors.job_queue_position(job=sent) is None
    assert selectors.job_queue_position(job=in_backoff) is None  # retrying, not in the line


def test_a_deprovision_is_first_in_line():
    build = enqueue()
    ending = JobFactory(kind=JobKind.DEPROVISION)
    assert JobKind.DEPROVISION < JobKind.PROVISION  # the order the index serves
    assert selectors.job_queue_position(job=ending) == 1
    assert selectors.job_queue_position(job=build) == 2


def test_recent_history_is_read_once_per_refresh_interval(settings, django_assert_num_queries):
    settings.LIMITS_REFRESH_SECONDS = 60
    limits.forget_recent()
    try:
        limits.effective_max_in_flight()  # reads the builds and the Hetzner calls once
        with django_assert_num_queries(0):
            limits.effective_max_in_flight()
            limits.typical_build_seconds()
        with django_assert_num_queries(0):  # the present, given explicitly
            limits.typical_build_seconds(now=timezone.now())
        with django_assert_num_queries(1):  # another moment is always read
            limits.typical_build_seconds(now=timezone.now() - timedelta(hours=1))
        limits.forget_recent()
        with django_assert_num_queries(2):
            limits.effective_max_in_flight()
    finally:
        limits.forget_recent()


def test_without_a_refresh_interval_every_use_reads_the_history(
    settings, django_assert_num_queries
):
    settings.LIMITS_REFRESH_SECONDS = 0
    limits.effective_max_in_flight()
    with django_assert_num_queries(2):
        limits.effective_max_in_flight()
