"""How long things take, read from the job history (JobEvent): the histograms `/metrics` serves
and the figures the admin overview's chart draws.

Every figure is one SQL aggregate over the events of a recent window (index jobevent_action_time
finds them by action and time); no event is loaded into Python:

- a step's duration: from the event that started it (CLAIM for `claim`, STEP for the others) to
  the job's next event that ends it (the next STEP, or COMPLETE, FAIL, TIMEOUT, CAPACITY_WAIT,
  CANCEL), found by a correlated subquery on index jobevent_job_time; steps still running are
  left out;
- time to running: from the order (the job's enqueue, its `created_at`) to its COMPLETE, for
  provisions no operator or customer retried by hand (that wait includes the failed time);
- waiting for capacity: from the order to the first DISPATCH of its first attempt (waiting for a
  build slot, and behind the customer's own earlier order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import (
    Count,
    DateTimeField,
    DurationField,
    Exists,
    ExpressionWrapper,
    F,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import TruncHour

from provisioning.models import JobEvent, JobKind, Step

Action = JobEvent.Action

WINDOW = timedelta(hours=24)

# Seconds. Steps take seconds to minutes; an order's wait, on a busy day, hours.
STEP_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 1800)
TO_RUNNING_BUCKETS = (60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 14400, 28800)
CAPACITY_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)

# The events that start a step, and those that end the step running before them.
STEP_STARTS = (Action.CLAIM, Action.STEP)
STEP_ENDS = (
    Action.STEP,
    Action.COMPLETE,
    Action.FAIL,
    Action.TIMEOUT,
    Action.CAPACITY_WAIT,
    Action.CANCEL,
)
MEASURED_STEPS = (Step.CLAIM, Step.CREATE_SERVER, Step.WAIT_SSH, Step.CONFIGURE, Step.HEALTH_CHECK)


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets (upper bound in seconds, observations at or below it), count, sum."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum_seconds: float


def _seconds(value: Any) -> float:
    """A Sum over a duration: a timedelta (PostgreSQL) or microseconds (SQLite); None if empty."""
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value) / 1_000_000


def _aggregates(buckets: tuple[int, ...]) -> dict[str, Any]:
    counts: dict[str, Any] = {
        f"le_{b}": Count("pk", filter=Q(duration__lte=timedelta(seconds=b))) for b in buckets
    }
    return {"total": Count("pk"), "sum": Sum("duration"), **counts}


def _histogram(row: dict[str, Any], buckets: tuple[int, ...]) -> Histogram:
    return Histogram(
        buckets=tuple((float(b), int(row[f"le_{b}"] or 0)) for b in buckets),
        count=int(row["total"] or 0),
        sum_seconds=_seconds(row["sum"]),
    )


def _duration(start: str, end: str) -> ExpressionWrapper[CombinedExpression]:
    return ExpressionWrapper(F(end) - F(start), output_field=DurationField())


def _recent(*actions: str, now: datetime) -> QuerySet[JobEvent]:
    return JobEvent.objects.filter(
        action__in=actions, created_at__gt=now - WINDOW, created_at__lte=now
    )


# --- the three measures -------------------------------------------------------------------------


def _steps(now: datetime) -> QuerySet[JobEvent]:
    """Step starts of the window, each with its `duration` (steps still running left out)."""
    ended_at = (
        JobEvent.objects.filter(job_id=OuterRef("job_id"), action__in=STEP_ENDS)
        .filter(
            Q(created_at__gt=OuterRef("created_at"))
            | Q(created_at=OuterRef("created_at"), id__gt=OuterRef("id"))
        )
        .order_by("created_at", "id")
        .values("created_at")[:1]
    )
    return (
        _recent(*STEP_STARTS, now=now)
        .filter(step__in=MEASURED_STEPS)
        .annotate(ended_at=Subquery(ended_at, output_field=DateTimeField()))
        .filter(ended_at__isnull=False)
        .annotate(duration=_duration("created_at", "ended_at"))
    )


def _to_running(now: datetime) -> QuerySet[JobEvent]:
    """Provisions that reached running in the window, each with its order-to-running `duration`."""
    retried = JobEvent.objects.filter(job_id=OuterRef("job_id"), action=Action.RETRY)
    return (
        _recent(Action.COMPLETE, now=now)
        .filter(job__kind=JobKind.PROVISION)
        .filter(~Exists(retried))
        .annotate(duration=_duration("job__created_at", "created_at"))
    )


def _capacity_waits(now: datetime) -> QuerySet[JobEvent]:
    """First dispatches of first attempts in the window, each with its wait since the order."""
    earlier = JobEvent.objects.filter(
        job_id=OuterRef("job_id"),
        action=Action.DISPATCH,
        attempt=1,
        created_at__lt=OuterRef("created_at"),
    )
    return (
        _recent(Action.DISPATCH, now=now)
        .filter(attempt=1)
        .filter(~Exists(earlier))
        .annotate(duration=_duration("job__created_at", "created_at"))
    )


def step_durations(*, now: datetime) -> dict[str, Histogram]:
    """Each runner step's duration over the last 24 hours (every measured step, maybe empty)."""
    rows = {
        row["step"]: row
        for row in _steps(now).order_by().values("step").annotate(**_aggregates(STEP_BUCKETS))
    }
    empty = {"total": 0, "sum": None} | {f"le_{b}": 0 for b in STEP_BUCKETS}
    return {str(step): _histogram(rows.get(step, empty), STEP_BUCKETS) for step in MEASURED_STEPS}


def time_to_running(*, now: datetime) -> Histogram:
    row = _to_running(now).aggregate(**_aggregates(TO_RUNNING_BUCKETS))
    return _histogram(row, TO_RUNNING_BUCKETS)


def capacity_wait(*, now: datetime) -> Histogram:
    row = _capacity_waits(now).aggregate(**_aggregates(CAPACITY_WAIT_BUCKETS))
    return _histogram(row, CAPACITY_WAIT_BUCKETS)


# --- the overview's chart -----------------------------------------------------------------------


def time_to_running_percentile(*, now: datetime, fraction: float, count: int) -> float | None:
    """The nearest-rank percentile of order-to-running in the last 24 hours (`count`: how many
    there are, from `time_to_running`): the database sorts and returns that one row."""
    if count <= 0:
        return None
    rank = max(math.ceil(fraction * count), 1)
    duration = F("duration")
    value = _to_running(now).order_by(duration, "id").values_list(duration, flat=True)[rank - 1]
    return _seconds(value)


@dataclass(frozen=True)
class HourOutcomes:
    hour: datetime  # the hour's start
    succeeded: int  # builds that reached running
    failed: int  # attempts that failed or timed out (retried or not)


def builds_per_hour(*, now: datetime, hours: int = 24) -> list[HourOutcomes]:
    """Provision attempts that ended in each of the last `hours` hours, oldest first, by outcome."""
    current = now.replace(minute=0, second=0, microsecond=0)
    first = current - timedelta(hours=hours - 1)
    rows = (
        JobEvent.objects.filter(
            action__in=(Action.COMPLETE, Action.FAIL, Action.TIMEOUT),
            created_at__gte=first,
            created_at__lte=now,
            job__kind=JobKind.PROVISION,
        )
        .annotate(hour=TruncHour("created_at"))
        .order_by()
        .values("hour")
        .annotate(
            succeeded=Count("pk", filter=Q(action=Action.COMPLETE)),
            failed=Count("pk", filter=~Q(action=Action.COMPLETE)),
        )
    )
    by_hour = {row["hour"]: row for row in rows}
    result = []
    for index in range(hours):
        hour = first + timedelta(hours=index)
        row = by_hour.get(hour, {})
        result.append(
            HourOutcomes(
                hour=hour,
                succeeded=int(row.get("succeeded") or 0),
                failed=int(row.get("failed") or 0),
            )
        )
    return result
