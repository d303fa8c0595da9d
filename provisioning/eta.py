"""When a queued job's agent should be ready: the estimate the customer's page and API show.

The service runs at most `limits.effective_max_in_flight()` runs at once (C slots). A run holds
its slot from its dispatch: first while a build machine starts it and it claims the job (the
typical start, the median dispatch-to-claim of recent claims), then for the build (the typical
claim-to-complete for its region). The runs in flight hold their slots until their expected
finish: a claimed build at its claim plus the build time, a dispatched run not yet claimed at
its dispatch plus the start and the build, one already overdue now; a cleanup run for as long as
the dispatcher counts it (`selectors.job_list_in_flight`); a run that has reported and that GitHub
is still finishing (`selectors.run_count_finishing`) now. Slots nobody holds are free
now. The queue then takes the slots in dispatch order (`selectors.job_list_waiting`): each job
ahead takes the slot that frees first and holds it for a start and a typical build (a
deprovision for DEPROVISION_SECONDS); the job gets the slot that frees after theirs and is ready
a start and a build for its region later.

Per-customer FIFO is kept too: a customer's later order starts no earlier than their earlier
one is ready. A job in a retry's backoff rejoins at its place once the backoff ends; a job whose
run GitHub holds (dispatched, not claimed) starts as soon as a machine picks the run up.

Nothing here writes; every read is bounded (the runs in flight are at most about C rows, the
queue ahead is counted, not loaded).
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import DurationField, ExpressionWrapper, F, OuterRef, Q, Subquery
from django.utils import timezone

from provisioning import limits, selectors
from provisioning.models import ACTIVE_STATUSES, JobEvent, JobKind, ProvisioningJob

# Deleting an agent's VMs: a runner starts, lists and deletes. Far shorter than a build.
DEPROVISION_SECONDS = 120.0


def typical_start_seconds(*, now: datetime) -> float:
    """Median dispatch-to-claim (a build machine picks the run up, sets up, claims) of the last
    SAMPLE_SIZE claims; 0 until MIN_SAMPLES claims followed a dispatch."""
    sent = (
        JobEvent.objects.filter(
            job_id=OuterRef("job_id"),
            attempt=OuterRef("attempt"),
            action=JobEvent.Action.DISPATCH,
            created_at__lte=OuterRef("created_at"),
        )
        .order_by("-created_at", "-id")
        .values("created_at")[:1]
    )
    latency = ExpressionWrapper(F("created_at") - Subquery(sent), output_field=DurationField())
    rows = (
        JobEvent.objects.filter(action=JobEvent.Action.CLAIM, created_at__lte=now)
        .order_by("-created_at", "-id")
        .annotate(latency=latency)
        .values_list("latency", flat=True)[: limits.SAMPLE_SIZE]
    )
    values = [max(value.total_seconds(), 0.0) for value in rows if isinstance(value, timedelta)]
    return statistics.median(values) if len(values) >= limits.MIN_SAMPLES else 0.0


@dataclass
class _Queue:
    """The slots and the figures one estimate reads, each fetched at most once."""

    now: datetime
    _durations: dict[str | None, float] = field(default_factory=dict)
    _start: timedelta | None = None
    _slots: list[datetime] | None = None
    _deprovisions_waiting: int | None = None

    def build_seconds(self, region: str | None) -> float:
        if region not in self._durations:
            self._durations[region] = limits.typical_build_seconds(region=region, now=self.now)
        return self._durations[region]

    def start(self) -> timedelta:
        """From a dispatch to its claim, typically."""
        if self._start is None:
            self._start = timedelta(seconds=typical_start_seconds(now=self.now))
        return self._start

    def duration(self, kind: str, region: str | None) -> timedelta:
        """From a claim to done, typically."""
        if kind == JobKind.DEPROVISION:
            return timedelta(seconds=DEPROVISION_SECONDS)
        return timedelta(seconds=self.build_seconds(region))

    def in_flight_finish(self, job: ProvisioningJob) -> datetime:
        """When a run in flight (claimed, dispatched and not claimed, or a cleanup run) should be
        done, or stop counting as in flight."""
        if job.is_failed and job.cleanup_dispatched_at is not None:
            timeout = timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS)
            return max(self.now, job.cleanup_dispatched_at + timeout)
        if job.is_provisioning and job.claimed_at is not None:
            claimed = job.claimed_at
        else:
            claimed = max(self.now, (job.dispatched_at or self.now) + self.start())
        return max(self.now, claimed + self.duration(job.kind, job.region))

    def slots(self) -> list[datetime]:
        """When each of the C slots is next free, soonest first."""
        if self._slots is None:
            capacity = limits.effective_max_in_flight(now=self.now)
            in_flight = selectors.job_list_in_flight(now=self.now).only(
                "status", "kind", "region", "claimed_at", "dispatched_at", "cleanup_dispatched_at"
            )
            finishes = [self.in_flight_finish(job) for job in in_flight]
            # Runs that have reported and that GitHub is finishing: their slots free any moment.
            finishes += [self.now] * selectors.run_count_finishing(now=self.now)
            finishes.sort()
            # More runs in flight than slots (the limit went down): a slot frees only once the
            # count is below C again, so the earliest finishes free none.
            held = finishes[max(len(finishes) - capacity, 0) :]
            self._slots = held + [self.now] * (capacity - len(held))
            heapq.heapify(self._slots)
        return self._slots

    def deprovisions_waiting(self) -> int:
        if self._deprovisions_waiting is None:
            self._deprovisions_waiting = (
                selectors.job_list_waiting(now=self.now).filter(kind=JobKind.DEPROVISION).count()
            )
        return self._deprovisions_waiting

    def start_at(self, ahead: int) -> datetime:
        """When a job with `ahead` waiting jobs before it gets a slot."""
        slots = list(self.slots())
        deprovisions = min(ahead, self.deprovisions_waiting())
        build = self.start() + timedelta(seconds=self.build_seconds(None))
        deprovision = self.start() + timedelta(seconds=DEPROVISION_SECONDS)
        for index in range(ahead):
            free = heapq.heappop(slots)
            heapq.heappush(slots, free + (deprovision if index < deprovisions else build))
        return slots[0]


def _ahead_in_queue(job: ProvisioningJob, *, now: datetime) -> int:
    """Waiting jobs dispatch takes before this one (the order of selectors.job_list_waiting)."""
    return (
        selectors.job_list_waiting(now=now)
        .filter(
            Q(kind__lt=job.kind)
            | Q(kind=job.kind, created_at__lt=job.created_at)
            | Q(kind=job.kind, created_at=job.created_at, id__lt=job.pk)
        )
        .exclude(pk=job.pk)
        .count()
    )


def _ready_at(job: ProvisioningJob, queue: _Queue, *, after: datetime | None) -> datetime:
    """When this active job should be done, given its customer's previous job is done `after`."""
    now = queue.now
    if job.is_provisioning or (job.is_queued and job.dispatched_at is not None):
        return queue.in_flight_finish(job)
    start = queue.start_at(_ahead_in_queue(job, now=now))
    if job.next_attempt_at is not None and job.next_attempt_at > start:
        start = job.next_attempt_at  # in a retry's backoff: not before it ends
    if after is not None and after > start:
        start = after
    return start + queue.start() + queue.duration(job.kind, job.region)


def estimated_ready_at(*, job: ProvisioningJob, now: datetime | None = None) -> datetime | None:
    """When the queued job's agent (or, for a deprovision, its deletion) should be done; None
    unless the job is queued."""
    if not job.is_queued:
        return None
    queue = _Queue(now=now or timezone.now())
    # The customer's earlier active jobs go first (per-customer FIFO): at most a handful.
    earlier = ProvisioningJob.objects.filter(
        user_id=job.user_id, status__in=ACTIVE_STATUSES, created_at__lt=job.created_at
    ).order_by("created_at", "id")
    after: datetime | None = None
    for previous in earlier:
        ready = _ready_at(previous, queue, after=after)
        after = ready if after is None else max(after, ready)
    return _ready_at(job, queue, after=after)
