"""How many runs may be in flight at once, and the figures that bound it.

The service never has more than `effective_max_in_flight()` runs dispatched and not finished.
That number is the smaller of two limits that are not ours:

- PROVISIONING_MAX_IN_FLIGHT: GitHub-hosted runners run a fixed number of jobs at once per
  account; runs beyond it wait in GitHub's queue, where a longer wait helps nobody.
- the Hetzner bound: each build makes some Hetzner API calls (`hetzner_calls_per_build`) over its
  duration (`typical_build_seconds`); the project answers HETZNER_API_BUDGET_PER_HOUR requests per
  API_BUDGET_WINDOW_SECONDS. With B builds always running, B x window / duration builds finish per
  window, making B x window / duration x calls requests; that must stay within the budget.

All three read recent finished jobs (a bounded, indexed read) and fall back to configured figures
until enough builds have reported theirs. Nothing here writes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from provisioning.models import JobKind, JobStatus, ProvisioningJob

# A build of a small VM: create, boot, Ansible, health check. Used until builds have finished.
DEFAULT_BUILD_SECONDS = 600.0
# How many recent jobs a median is taken over, and how many it needs before it is trusted.
SAMPLE_SIZE = 50
MIN_SAMPLES = 5


# Recent history, read at most once per LIMITS_REFRESH_SECONDS per process: every dispatch
# round, agent page and webhook-freed slot asks, and a median of the last 50 builds barely moves
# in a few seconds. Keyed by what was asked; a `now` other than the present (a test, a replay)
# bypasses it.
_recent: dict[tuple[str, str | None], tuple[float, float | None]] = {}


def _remembered(key: tuple[str, str | None], read: Callable[[], float | None]) -> float | None:
    ttl = float(settings.LIMITS_REFRESH_SECONDS)
    if ttl <= 0:
        return read()
    now = time.monotonic()
    hit = _recent.get(key)
    if hit is not None and now - hit[0] < ttl:
        return hit[1]
    value = read()
    _recent[key] = (now, value)
    return value


def forget_recent() -> None:
    """Drop what _remembered holds (tests that change the history and the refresh setting)."""
    _recent.clear()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if len(values) >= MIN_SAMPLES else None


def _recent_build_seconds(*, region: str | None, now: datetime) -> float | None:
    """Median claim → complete of the last SAMPLE_SIZE successful provision builds (by payment
    time, index job_status_newest), None when fewer than MIN_SAMPLES."""
    builds = ProvisioningJob.objects.filter(
        status=JobStatus.RUNNING,
        kind=JobKind.PROVISION,
        claimed_at__isnull=False,
        completed_at__isnull=False,
        completed_at__lte=now,
    )
    if region is not None:
        builds = builds.filter(region=region)
    rows = builds.order_by("-created_at").values_list("claimed_at", "completed_at")[:SAMPLE_SIZE]
    return _median(
        [
            max((completed - claimed).total_seconds(), 0.0)
            for claimed, completed in rows
            if claimed is not None and completed is not None
        ]
    )


def typical_build_seconds(*, region: str | None = None, now: datetime | None = None) -> float:
    """Median duration (claim → complete) of recent successful provision builds: in `region` when
    given and enough builds there finished, else over all regions, else DEFAULT_BUILD_SECONDS."""
    current = timezone.now()
    if now is None or abs((current - now).total_seconds()) < 1.0:  # asked about the present

        def recent(where: str | None) -> float | None:
            return _remembered(
                ("build", where), lambda: _recent_build_seconds(region=where, now=current)
            )
    else:

        def recent(where: str | None) -> float | None:
            return _recent_build_seconds(region=where, now=now)

    if region is not None:
        in_region = recent(region)
        if in_region is not None:
            return in_region
    overall = recent(None)
    return overall if overall is not None else DEFAULT_BUILD_SECONDS


def hetzner_calls_per_build() -> float:
    """Median of the Hetzner calls recent provision builds reported (complete or fail), else
    HETZNER_CALLS_PER_BUILD."""
    median = _remembered(("hetzner_calls", None), _recent_hetzner_calls)
    return median if median is not None else float(settings.HETZNER_CALLS_PER_BUILD)


def _recent_hetzner_calls() -> float | None:
    reported = (
        ProvisioningJob.objects.filter(
            kind=JobKind.PROVISION,
            status__in=(JobStatus.RUNNING, JobStatus.FAILED),
            hetzner_calls__isnull=False,
        )
        .order_by("-created_at")
        .values_list("hetzner_calls", flat=True)[:SAMPLE_SIZE]
    )
    return _median([float(calls) for calls in reported if calls is not None])


def hetzner_max_in_flight(*, now: datetime | None = None) -> int | None:
    """How many builds may run at once within the Hetzner budget; None when builds make no calls."""
    calls = hetzner_calls_per_build()
    if calls <= 0:
        return None
    seconds = typical_build_seconds(now=now)
    window = float(settings.API_BUDGET_WINDOW_SECONDS)
    budget = float(settings.HETZNER_API_BUDGET_PER_HOUR)
    return math.floor(budget * seconds / (calls * window))


def effective_max_in_flight(*, now: datetime | None = None) -> int:
    """min(PROVISIONING_MAX_IN_FLIGHT, the Hetzner bound); never below 1."""
    limit = int(settings.PROVISIONING_MAX_IN_FLIGHT)
    hetzner = hetzner_max_in_flight(now=now)
    if hetzner is not None:
        limit = min(limit, hetzner)
    return max(limit, 1)
