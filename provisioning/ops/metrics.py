"""The Prometheus collector behind /metrics, and the worker's liveness that /healthz reports too.

Every figure is computed from the database at scrape time (no per-process counters), so every
web process answers alike: SQL aggregates over the job table, each served by an index or bounded
to a small set of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Max, Min, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from provisioning import limits, selectors
from provisioning.models import (
    ACTIVE_STATUSES,
    JobKind,
    JobStatus,
    ProvisioningJob,
    WorkerBeat,
    status_label,
)
from provisioning.ops import timings
from provisioning.services.budget import GITHUB, api_budget_wait, budget_shape

# Provisioning takes minutes; buckets from 30 s to 2 h (seconds).
DURATION_BUCKETS = (30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200)
OUTCOME_WINDOW = timedelta(hours=24)
# Bounds the 24 h outcome queries by created_at so they use the (-created_at) index instead of
# scanning every finished job; a job finished today but created over a week ago is not counted.
OUTCOME_CREATED_LOOKBACK = timedelta(days=7)


# Figures other apps add (their AppConfig.ready() calls collector_register): provisioning imports
# no app above it. Each is called at scrape time with the scrape's `now` and yields metric families.
EXTRA_COLLECTORS: dict[str, Callable[[datetime], Iterable[Any]]] = {}


def collector_register(name: str, collect: Callable[[datetime], Iterable[Any]]) -> None:
    EXTRA_COLLECTORS[name] = collect


def _buckets(histogram: timings.Histogram) -> list[tuple[str, float]]:
    """Prometheus' cumulative buckets: each bound's count, then +Inf with them all."""
    buckets: list[tuple[str, float]] = [(str(b), n) for b, n in histogram.buckets]
    buckets.append(("+Inf", histogram.count))
    return buckets


def worker_stale_after() -> float:
    return max(3 * float(settings.WORKER_INTERVAL_SECONDS), 60.0)


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else max((now - then).total_seconds(), 0.0)


def worker_state(now: datetime) -> tuple[str, float | None]:
    last = WorkerBeat.objects.aggregate(last=Max("last_tick_at"))["last"]
    age = _age(now, last)
    if age is None:
        return "absent", None
    return ("ok" if age <= worker_stale_after() else "stale"), age


class JobCollector(Collector):
    """Prometheus figures read from the database at scrape time."""

    def collect(self) -> Iterator[Any]:
        now = timezone.now()
        yield from self._by_status(now)
        yield from self._ages(now)
        yield from self._lifecycle(now)
        yield from self._outcomes(now)
        yield from self._worker(now)
        yield from self._capacity(now)
        yield from self._launch(now)
        yield from self._timings(now)
        for collect in EXTRA_COLLECTORS.values():
            yield from collect(now)

    def _by_status(self, now: datetime) -> Iterator[Any]:
        # Exact counts that stay cheap at any table size: queued and provisioning rows are few
        # (partial indexes); failed ones are counted from the (status, created_at) index alone.
        # `running` is every agent ever built, a scan of most of the table at each scrape, so
        # outcomes are reported per 24 h below instead.
        jobs = GaugeMetricFamily(
            "provisioning_jobs",
            "Jobs waiting or in flight, by status and kind.",
            labels=["status", "kind"],
        )
        counts = {
            (state, kind): n
            for state, kind, n in ProvisioningJob.objects.filter(status__in=ACTIVE_STATUSES)
            .values_list("status", "kind")
            .annotate(n=Count("pk"))
            .values_list("status", "kind", "n")
        }
        for state in ACTIVE_STATUSES:
            for kind in JobKind.values:
                jobs.add_metric([state, kind], counts.get((state, kind), 0))
        yield jobs
        yield GaugeMetricFamily(
            "provisioning_failed_jobs",
            "Jobs in status failed (retries spent or cancelled), all kinds, all time.",
            value=ProvisioningJob.objects.filter(status=JobStatus.FAILED).count(),
        )

    def _ages(self, now: datetime) -> Iterator[Any]:
        # Served by job_queued_fifo (queued rows only) and job_in_flight_newest (provisioning rows only).
        oldest_queued = ProvisioningJob.objects.filter(status=JobStatus.QUEUED).aggregate(
            t=Min("created_at")
        )["t"]
        oldest_silence = ProvisioningJob.objects.filter(status=JobStatus.PROVISIONING).aggregate(
            t=Min(Coalesce("last_heartbeat_at", "claimed_at", "updated_at"))
        )["t"]
        yield GaugeMetricFamily(
            "provisioning_oldest_queued_job_age_seconds",
            "Age of the oldest queued job (0 when none is queued).",
            value=_age(now, oldest_queued) or 0.0,
        )
        yield GaugeMetricFamily(
            "provisioning_oldest_heartbeat_age_seconds",
            "Longest silence among provisioning jobs: since the last heartbeat, else the claim "
            "(0 when none is provisioning).",
            value=_age(now, oldest_silence) or 0.0,
        )
        yield GaugeMetricFamily(
            "provisioning_stale_jobs",
            "Provisioning jobs past their timeout or deadline, awaiting the sweep.",
            value=selectors.job_list_stale(now=now).count(),
        )

    def _lifecycle(self, now: datetime) -> Iterator[Any]:
        # Each reads provisioning rows (job_in_flight_newest) or queued rows (job_queued_fifo) only, the
        # queued ones with a short probe of their own events (jobevent_job_time); the cleanup
        # count reads failed rows still owing a cleanup run (job_failed_cleanup_due).
        yield GaugeMetricFamily(
            "provisioning_overdue_jobs",
            "Provisioning jobs whose attempt is older than JOB_DEADLINE_SECONDS, heartbeats or not.",
            value=selectors.job_list_overdue(now=now).count(),
        )
        yield GaugeMetricFamily(
            "provisioning_unreconciled_jobs",
            "Provisioning jobs whose run was not confirmed with the runner backend (GitHub) "
            "within 2 x RECONCILE_INTERVAL_SECONDS.",
            value=selectors.job_list_unreconciled(now=now).count(),
        )
        yield GaugeMetricFamily(
            "provisioning_unclaimed_jobs",
            "Queued jobs dispatched over DISPATCH_CLAIM_TIMEOUT_SECONDS ago in this attempt that "
            "no run has claimed.",
            value=selectors.job_list_unclaimed(now=now).count(),
        )
        yield GaugeMetricFamily(
            "provisioning_dispatch_failing_jobs",
            "Queued jobs whose latest dispatch failed (JobEvent dispatch_failed).",
            value=selectors.job_list_dispatch_failing().count(),
        )
        yield GaugeMetricFamily(
            "provisioning_cleanup_due_jobs",
            "Failed provisions that were claimed and still owe their cleanup run (mode: cleanup).",
            value=selectors.job_list_cleanup_due().count(),
        )

    def _outcomes(self, now: datetime) -> Iterator[Any]:
        since = now - OUTCOME_WINDOW
        finished = ProvisioningJob.objects.filter(
            created_at__gte=now - OUTCOME_CREATED_LOOKBACK,
            completed_at__gte=since,
            status__in=[JobStatus.RUNNING, JobStatus.FAILED],
        )
        by_status = {
            (status, kind): n
            for status, kind, n in finished.values_list("status", "kind")
            .annotate(n=Count("pk"))
            .values_list("status", "kind", "n")
        }
        outcomes = GaugeMetricFamily(
            "provisioning_jobs_finished_24h",
            "Jobs that ended in the last 24 hours, by outcome and kind: running (a provision "
            "built its agent), deleted (a deprovision deleted its VM) or failed.",
            labels=["outcome", "kind"],
        )
        for status in (JobStatus.RUNNING, JobStatus.FAILED):
            for kind in JobKind.values:
                outcome = status_label(status, kind).key  # a deprovision's `running` is "deleted"
                outcomes.add_metric([outcome, kind], by_status.get((status, kind), 0))
        yield outcomes

        # claimed_at -> completed_at of the attempt that succeeded, bucketed in SQL.
        duration = ExpressionWrapper(
            F("completed_at") - F("claimed_at"), output_field=DurationField()
        )
        succeeded = finished.filter(
            status=JobStatus.RUNNING, kind=JobKind.PROVISION, claimed_at__isnull=False
        ).annotate(duration=duration)
        aggregates: dict[str, Any] = {
            f"le_{b}": Count("pk", filter=Q(duration__lte=timedelta(seconds=b)))
            for b in DURATION_BUCKETS
        }
        row = succeeded.aggregate(total=Count("pk"), sum=Sum("duration"), **aggregates)
        total_seconds = row["sum"].total_seconds() if row["sum"] is not None else 0.0
        buckets = [(str(float(b)), row[f"le_{b}"]) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", row["total"]))
        yield HistogramMetricFamily(
            "provisioning_job_duration_seconds",
            "Claim to completion of provisions that succeeded in the last 24 hours.",
            buckets=buckets,
            sum_value=total_seconds,
        )

    def _timings(self, now: datetime) -> Iterator[Any]:
        # From the job history of the last 24 hours (provisioning/ops/timings.py).
        steps = HistogramMetricFamily(
            "provisioning_step_duration_seconds",
            "How long each runner step took, for steps started in the last 24 hours and ended "
            "(by the next step, complete, fail, timeout, capacity or cancel).",
            labels=["step"],
        )
        for step, histogram in timings.step_durations(now=now).items():
            steps.add_metric([step], _buckets(histogram), histogram.sum_seconds)
        yield steps
        to_running = timings.time_to_running(now=now)
        yield HistogramMetricFamily(
            "provisioning_time_to_running_seconds",
            "From the order (the job's enqueue) to running, for provisions that reached running "
            "in the last 24 hours (jobs retried by hand left out).",
            buckets=_buckets(to_running),
            sum_value=to_running.sum_seconds,
        )
        waits = timings.capacity_wait(now=now)
        yield HistogramMetricFamily(
            "provisioning_capacity_wait_seconds",
            "From the order to its first dispatch (waiting for a build slot, or behind the "
            "customer's earlier order), for first dispatches in the last 24 hours.",
            buckets=_buckets(waits),
            sum_value=waits.sum_seconds,
        )

    def _capacity(self, now: datetime) -> Iterator[Any]:
        hold = selectors.capacity_hold_in_force(now=now)
        yield GaugeMetricFamily(
            "provisioning_capacity_hold",
            "1 while provision builds are held back because the Hetzner project is at its "
            "server limit (deprovisions still run), else 0.",
            value=0 if hold is None else 1,
        )
        yield GaugeMetricFamily(
            "provisioning_capacity_hold_seconds_left",
            "Seconds until a held-back build is tried again (0 when no hold is in force).",
            value=0.0 if hold is None else max((hold.until - now).total_seconds(), 0.0),
        )

    def _worker(self, now: datetime) -> Iterator[Any]:
        _state, age = worker_state(now)
        yield GaugeMetricFamily(
            "provisioning_worker_last_tick_age_seconds",
            "Seconds since any worker last ticked (+Inf when no worker ever ran).",
            value=math.inf if age is None else age,
        )
        alive = WorkerBeat.objects.filter(
            last_tick_at__gte=now - timedelta(seconds=worker_stale_after())
        ).count()
        yield GaugeMetricFamily(
            "provisioning_workers_alive", "Workers that ticked recently.", value=alive
        )

    def _launch(self, now: datetime) -> Iterator[Any]:
        """Runs in flight against the limit, jobs waiting for capacity, runs GitHub holds, and
        the shared GitHub API budget (services/budget.py)."""
        yield GaugeMetricFamily(
            "provisioning_runs_in_flight",
            "Runs dispatched and not finished (provision, deprovision, cleanup), all workers.",
            value=selectors.job_count_in_flight(now=now),
        )
        yield GaugeMetricFamily(
            "provisioning_max_in_flight",
            "The in-flight limit in force: PROVISIONING_MAX_IN_FLIGHT or the Hetzner bound.",
            value=limits.effective_max_in_flight(now=now),
        )
        yield GaugeMetricFamily(
            "provisioning_jobs_waiting_for_capacity",
            "Queued jobs not dispatched yet and out of backoff: waiting for a free slot.",
            value=selectors.job_list_waiting(now=now).count(),
        )
        yield GaugeMetricFamily(
            "provisioning_runs_finishing",
            "Runs that have reported and that GitHub has not said ended yet: each keeps its slot "
            "(part of provisioning_runs_in_flight).",
            value=selectors.run_count_finishing(now=now),
        )
        yield GaugeMetricFamily(
            "provisioning_runs_waiting_for_machine",
            "Dispatched runs GitHub (or the local backend) still holds unclaimed: waiting for "
            "a build machine, not re-sent.",
            value=selectors.job_list_held_by_runner().count(),
        )
        row = selectors.api_budget_get(name=GITHUB)
        shape = budget_shape(GITHUB)
        remaining = shape.capacity
        if row is not None:
            elapsed = max((now - row.refilled_at).total_seconds(), 0.0)
            remaining = min(shape.capacity, row.tokens + elapsed * shape.per_second)
        yield GaugeMetricFamily(
            "provisioning_github_api_budget_remaining",
            "GitHub requests that may be made right now from the shared budget.",
            value=math.floor(remaining),
        )
        blocked = 0.0
        if row is not None and row.blocked_until is not None:
            blocked = max((row.blocked_until - now).total_seconds(), 0.0)
        yield GaugeMetricFamily(
            "provisioning_github_api_blocked_seconds",
            "Seconds every process still waits because GitHub answered with a rate limit.",
            value=blocked,
        )
        yield GaugeMetricFamily(
            "provisioning_github_api_wait_seconds",
            "Seconds until the next GitHub request may be made (0: now).",
            value=api_budget_wait(now=now),
        )
        calls = CounterMetricFamily(
            "provisioning_github_api_calls",
            "GitHub requests made, by purpose (token, dispatch, get_run, cancel, list_runs, "
            "find_run).",
            labels=["purpose"],
        )
        refused = CounterMetricFamily(
            "provisioning_github_api_calls_refused",
            "GitHub requests not made because the shared budget was spent, by purpose.",
            labels=["purpose"],
        )
        for count in selectors.api_call_counts(name=GITHUB):
            calls.add_metric([count.purpose], count.calls)
            refused.add_metric([count.purpose], count.refused)
        yield calls
        yield refused
