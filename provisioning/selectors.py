"""Named reads. Each returns a QuerySet or an object and never writes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connections
from django.db.models import Exists, OuterRef, Prefetch, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from provisioning.models import (
    Actor,
    Agent,
    ApiBudget,
    ApiCallCount,
    CapacityHold,
    FinishingRun,
    JobEvent,
    JobKind,
    JobStatus,
    ProvisioningJob,
)


def job_get(*, job_id: UUID | str) -> ProvisioningJob | None:
    return ProvisioningJob.objects.filter(pk=job_id).first()


def job_get_by_stripe_event_id(*, stripe_event_id: str) -> ProvisioningJob | None:
    """The job a Stripe event made, if any (the unique stripe_event_id)."""
    return ProvisioningJob.objects.filter(stripe_event_id=stripe_event_id).first()


def job_get_latest_for_agent(*, agent_id: UUID | str) -> ProvisioningJob | None:
    """The agent's most recent job (index job_agent_latest)."""
    return ProvisioningJob.objects.filter(agent_id=agent_id).order_by("-created_at").first()


def job_list_stale(
    *,
    now: datetime,
    timeout_seconds: int | None = None,
    deadline_seconds: int | None = None,
) -> QuerySet[ProvisioningJob]:
    """Provisioning jobs silent for longer than the timeout, or past their attempt's deadline.

    Silence is measured from the last heartbeat, else the claim, else the last update. Served by the
    partial index job_in_flight_newest (only provisioning rows are scanned, however big the table).
    """
    timeout = timeout_seconds if timeout_seconds is not None else settings.JOB_TIMEOUT_SECONDS
    deadline = deadline_seconds if deadline_seconds is not None else settings.JOB_DEADLINE_SECONDS
    return (
        ProvisioningJob.objects.filter(status=JobStatus.PROVISIONING)
        .alias(silent_from=Coalesce("last_heartbeat_at", "claimed_at", "updated_at"))
        .filter(
            Q(silent_from__lt=now - timedelta(seconds=timeout))
            | Q(claimed_at__lt=now - timedelta(seconds=deadline))
        )
    )


# The stale-id query's SQL per (database, limit): compiled once per process (job_ids_stale).
_stale_ids_sql: dict[tuple[str, int], str] = {}


def job_ids_stale(
    *,
    now: datetime,
    limit: int,
    timeout_seconds: int | None = None,
    deadline_seconds: int | None = None,
) -> list[UUID]:
    """The ids of up to `limit` jobs job_list_stale would return, for callers that need only ids.

    The same query, but its SQL is compiled once per process (Django's compilation cost more
    than PostgreSQL's execution on the partial index) and the ids are read in one fetch. Where
    the compiled parameters are not the plain values (a backend that adapts them when compiling,
    such as SQLite), the QuerySet is run as it is.
    """
    timeout = timeout_seconds if timeout_seconds is not None else settings.JOB_TIMEOUT_SECONDS
    deadline = deadline_seconds if deadline_seconds is not None else settings.JOB_DEADLINE_SECONDS
    params = (
        JobStatus.PROVISIONING.value,
        now - timedelta(seconds=timeout),
        now - timedelta(seconds=deadline),
    )
    alias = ProvisioningJob.objects.db
    sql = _stale_ids_sql.get((alias, limit))
    if sql is None:
        query = job_list_stale(now=now, timeout_seconds=timeout, deadline_seconds=deadline)
        ids = query.values_list("pk", flat=True)[:limit]
        sql, compiled = ids.query.sql_with_params()
        if connections[alias].vendor != "postgresql" or tuple(compiled) != params:
            return list(ids)
        _stale_ids_sql[(alias, limit)] = sql
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def _fifo_blocked() -> tuple[Exists, Exists]:
    """Per-customer FIFO: the customer has a provisioning job, or an older queued one."""
    in_flight = ProvisioningJob.objects.filter(
        user_id=OuterRef("user_id"), status=JobStatus.PROVISIONING
    )
    older_queued = ProvisioningJob.objects.filter(
        user_id=OuterRef("user_id"),
        status=JobStatus.QUEUED,
        created_at__lt=OuterRef("created_at"),
    )
    return Exists(in_flight), Exists(older_queued)


def job_list_due(*, now: datetime, builds_held: bool = False) -> QuerySet[ProvisioningJob]:
    """Jobs waiting for capacity that a dispatcher may hand to a runner now, in dispatch order
    (deprovisions first, then oldest paid): queued, never dispatched in this attempt, out of
    backoff, the oldest queued job of its customer, and that customer has no provisioning job.
    Per-customer FIFO keeps a customer's orders in the order they paid.

    Dispatched rows are not in the partial index this walks (job_waiting_by_kind), so its cost
    does not grow with the runs in flight or waiting in GitHub's queue. Whether there is room for
    one more run is the dispatcher's question (job_count_in_flight), not this query's.

    `builds_held` (a capacity hold, Hetzner's server limit): provisions are not due, and a
    customer's waiting provision does not keep their deprovision back (it frees a server).
    """
    in_flight, older_queued = _fifo_blocked()
    waiting = _waiting(now=now)
    if builds_held:
        waiting = waiting.filter(kind=JobKind.DEPROVISION)
        older_queued = Exists(
            ProvisioningJob.objects.filter(
                user_id=OuterRef("user_id"),
                status=JobStatus.QUEUED,
                kind=JobKind.DEPROVISION,
                created_at__lt=OuterRef("created_at"),
            )
        )
    return waiting.filter(~in_flight, ~older_queued).order_by(*DISPATCH_ORDER)


def job_list_resend_due(*, now: datetime, builds_held: bool = False) -> QuerySet[ProvisioningJob]:
    """Queued jobs dispatched longer than DISPATCH_CLAIM_TIMEOUT_SECONDS ago and not claimed: their
    run is asked about, and re-sent only if it finished or is unknown. Oldest dispatch first
    (index job_dispatched_unclaimed). They are in flight already: a re-send takes no new room."""
    claim_window = now - timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS)
    due = ProvisioningJob.objects.filter(status=JobStatus.QUEUED, dispatched_at__lte=claim_window)
    if builds_held:
        due = due.filter(kind=JobKind.DEPROVISION)
    return due.order_by("dispatched_at", "id")


def _cleanup_window(now: datetime) -> datetime:
    """Cleanup runs sent after this still count as in flight."""
    return now - timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS)


def job_list_in_flight(*, now: datetime) -> QuerySet[ProvisioningJob]:
    """Jobs whose run is in flight: dispatched and not finished. What PROVISIONING_MAX_IN_FLIGHT
    counts (provisioning/limits.py), each over a partial index:

    - dispatched, not claimed yet (queued with `dispatched_at`): the run is starting or waits in
      GitHub's queue for a runner (a run GitHub still holds is never re-sent, so it stays here);
    - provisioning: claimed, its run is building (or deleting, for a deprovision);
    - a cleanup run (failed provision, `mode: cleanup`): until GitHub says it ended
      (`cleanup_finished_at`, services/finishing.py), and no longer than
      DISPATCH_CLAIM_TIMEOUT_SECONDS after it was sent (the bound for backends that never say,
      and for GitHub unheard: the time any run is given to start is ample for one that then only
      deletes VMs).
    """
    return ProvisioningJob.objects.filter(
        Q(status=JobStatus.QUEUED, dispatched_at__isnull=False)
        | Q(status=JobStatus.PROVISIONING)
        | _cleanup_running(now)
    )


def job_list_cleanup_running(*, now: datetime) -> QuerySet[ProvisioningJob]:
    """Failed provisions whose cleanup run counts as in flight: sent within the cleanup window and
    not known to have ended (index job_cleanup_running)."""
    return ProvisioningJob.objects.filter(_cleanup_running(now))


def _cleanup_running(now: datetime) -> Q:
    return Q(
        status=JobStatus.FAILED,
        cleanup_dispatched_at__isnull=False,
        cleanup_finished_at__isnull=True,
        cleanup_dispatched_at__gt=_cleanup_window(now),
    )


def job_count_in_flight(*, now: datetime) -> int:
    """How many runs are in flight: job_list_in_flight's three index-served counts, plus the runs
    that have reported and are still finishing at GitHub (run_count_finishing), in one query."""
    parts: list[QuerySet[Any]] = [
        ProvisioningJob.objects.filter(status=JobStatus.QUEUED, dispatched_at__isnull=False),
        ProvisioningJob.objects.filter(status=JobStatus.PROVISIONING),
        job_list_cleanup_running(now=now),
        _finishing(now),
    ]
    # One round trip (each count keeps its own partial index): the dispatcher asks this twice
    # per take, once of them holding the dispatch lock.
    counts: list[str] = []
    params: list[Any] = []
    for part in parts:
        sql, part_params = part.order_by().values("pk").query.sql_with_params()
        counts.append(f"(SELECT COUNT(*) FROM ({sql}) AS part)")  # noqa: S608 (ORM-compiled SQL)
        params.extend(part_params)
    with connections[ProvisioningJob.objects.db].cursor() as cursor:
        cursor.execute("SELECT " + " + ".join(counts), params)
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def run_count_finishing(*, now: datetime) -> int:
    """Runs that have reported but that GitHub may still be running (services/finishing.py): each
    keeps its runner slot until GitHub says it ended, or RUN_FINISH_GRACE_SECONDS at most."""
    return _finishing(now).count()


def run_finishing_since(*, now: datetime) -> datetime:
    """Runs reported after this still hold a slot; earlier ones are past RUN_FINISH_GRACE_SECONDS."""
    return now - timedelta(seconds=settings.RUN_FINISH_GRACE_SECONDS)


def _finishing(now: datetime) -> QuerySet[FinishingRun]:
    return FinishingRun.objects.filter(reported_at__gt=run_finishing_since(now=now))


def job_list_held_by_runner() -> QuerySet[ProvisioningJob]:
    """Dispatched jobs whose run the backend still holds unclaimed ("waiting for a build
    machine"): the dispatcher's last word on this attempt is its NOTE that the run was found
    queued, waiting, pending, requested or in progress and not re-sent (a later re-send would be
    a DISPATCH event). Over the dispatched rows only (index job_dispatched_unclaimed)."""
    last_word = (
        JobEvent.objects.filter(job_id=OuterRef("pk"), attempt=OuterRef("attempt"), step="dispatch")
        .filter(Q(action=JobEvent.Action.DISPATCH) | Q(action=JobEvent.Action.NOTE))
        .order_by("-id")
        .values("action")[:1]
    )
    return (
        ProvisioningJob.objects.filter(status=JobStatus.QUEUED, dispatched_at__isnull=False)
        .alias(last_word=Subquery(last_word))
        .filter(last_word=JobEvent.Action.NOTE)
    )


def api_budget_get(*, name: str) -> ApiBudget | None:
    """The shared API budget's row (None before its first draw)."""
    return ApiBudget.objects.filter(name=name).first()


def api_call_counts(*, name: str) -> QuerySet[ApiCallCount]:
    """Requests made and refused per purpose, since the service started counting."""
    return ApiCallCount.objects.filter(budget=name).order_by("purpose")


def capacity_hold_in_force(*, now: datetime) -> CapacityHold | None:
    """The hold keeping provision builds back (Hetzner's server limit), if one is in force."""
    return (
        CapacityHold.objects.filter(lifted_at__isnull=True, until__gt=now)
        .order_by("-started_at")
        .first()
    )


def job_list_cleanup_due() -> QuerySet[ProvisioningJob]:
    """Failed provisions that were claimed at least once and still owe their cleanup run."""
    return ProvisioningJob.objects.filter(
        status=JobStatus.FAILED,
        kind=JobKind.PROVISION,
        cleanup_dispatched_at__isnull=True,
        claimed_at__isnull=False,
    ).order_by("completed_at")


# Dispatch order: deprovisions first (they stop billing for a VM), then oldest paid first. The
# kind sorts deprovisions first as text ("deprovision" < "provision"), so the partial index
# job_waiting_by_kind (kind, created_at) serves the order itself: no sort over the waiting rows.
DISPATCH_ORDER = ("kind", "created_at", "id")


def _waiting(*, now: datetime) -> QuerySet[ProvisioningJob]:
    """Queued, never dispatched in this attempt, out of retry backoff (index job_waiting_by_kind)."""
    return ProvisioningJob.objects.filter(
        status=JobStatus.QUEUED, dispatched_at__isnull=True
    ).filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))


def job_list_waiting(*, now: datetime) -> QuerySet[ProvisioningJob]:
    """Queued jobs waiting for capacity, in the order dispatch takes them: deprovisions first, then
    oldest paid (created_at) first; a customer's orders stay in the order they paid.

    Left out: jobs already dispatched (their run is in flight, or waits in GitHub's queue) and
    jobs in a retry's backoff (they rejoin at their place, by payment time, once it ends).
    A customer's later order is listed at its place although it goes only after their earlier
    one finished (per-customer FIFO), so a position is a lower bound for such an order.
    """
    return _waiting(now=now).order_by(*DISPATCH_ORDER)


def job_queue_position(*, job: ProvisioningJob, now: datetime | None = None) -> int | None:
    """1-based place among job_list_waiting; None when not queued, in backoff or dispatched."""
    now = now or timezone.now()
    if not job.is_queued or job.dispatched_at is not None:
        return None
    if job.next_attempt_at is not None and job.next_attempt_at > now:
        return None
    ahead = _waiting(now=now).filter(
        Q(kind__lt=job.kind)
        | Q(kind=job.kind, created_at__lt=job.created_at)
        | Q(kind=job.kind, created_at=job.created_at, id__lt=job.pk)
    )
    return ahead.count() + 1


def job_count_customer_retries(*, agent_id: UUID | str, since: datetime) -> int:
    """How often the customer asked to build this agent again since `since` (their RETRY events)."""
    return JobEvent.objects.filter(
        job__agent_id=UUID(str(agent_id)),
        action=JobEvent.Action.RETRY,
        actor=Actor.CUSTOMER,
        created_at__gte=since,
    ).count()


def job_was_dispatched_to_run(*, job_id: UUID | str, run_id: str) -> bool:
    """Did this job ever dispatch (or hear from) this run? Tells 409 fenced-out from 403."""
    return JobEvent.objects.filter(job_id=UUID(str(job_id)), workflow_run_id=run_id).exists()


def agent_list_for_user(*, user: Any) -> QuerySet[Agent]:
    """The customer's agents, newest first, each with `jobs` prefetched newest first."""
    return (
        Agent.objects.filter(owner=user)
        .order_by("-created_at")
        .prefetch_related(
            Prefetch("jobs", queryset=ProvisioningJob.objects.order_by("-created_at"))
        )
    )


def agent_get_for_user(*, user: Any, agent_id: UUID | str) -> Agent | None:
    """One of the customer's own agents; None for anyone else's (callers answer 404)."""
    return agent_list_for_user(user=user).filter(pk=agent_id).first()


# --- deadlines and reconciliation (each over provisioning or queued rows only: partial indexes) ---


def job_list_overdue(
    *, now: datetime, deadline_seconds: int | None = None
) -> QuerySet[ProvisioningJob]:
    """Provisioning jobs whose attempt was claimed longer ago than JOB_DEADLINE_SECONDS."""
    deadline = deadline_seconds if deadline_seconds is not None else settings.JOB_DEADLINE_SECONDS
    return ProvisioningJob.objects.filter(
        status=JobStatus.PROVISIONING, claimed_at__lt=now - timedelta(seconds=deadline)
    )


def _checked_since() -> Any:
    """When this attempt's run was last checked against the backend: the later of the last check
    and the claim (a check made during an earlier attempt says nothing about this one)."""
    claimed = Coalesce("claimed_at", "updated_at")
    return Greatest(Coalesce("reconciled_at", claimed), claimed)


def job_list_reconcile_due(
    *, now: datetime, interval_seconds: int | None = None
) -> QuerySet[ProvisioningJob]:
    """Provisioning jobs with a run whose status was not checked within the interval, least
    recently checked first."""
    interval = (
        interval_seconds if interval_seconds is not None else settings.RECONCILE_INTERVAL_SECONDS
    )
    return (
        ProvisioningJob.objects.filter(status=JobStatus.PROVISIONING, workflow_run_id__isnull=False)
        .alias(checked_since=_checked_since())
        .filter(checked_since__lt=now - timedelta(seconds=interval))
        .order_by("checked_since")
    )


def job_list_unreconciled(*, now: datetime) -> QuerySet[ProvisioningJob]:
    """Provisioning jobs nobody confirmed with the backend for 2 x RECONCILE_INTERVAL_SECONDS:
    the reconciliation duty is not running, the backend keeps erroring, or does not know the run
    (a run id GitHub answers 404 for)."""
    return job_list_reconcile_due(now=now, interval_seconds=2 * settings.RECONCILE_INTERVAL_SECONDS)


def job_list_unclaimed(*, now: datetime) -> QuerySet[ProvisioningJob]:
    """Queued jobs whose first dispatch of this attempt went out over DISPATCH_CLAIM_TIMEOUT_SECONDS
    ago and no run has claimed them since: runs start (or are re-sent) but never claim.

    A claim moves the job to provisioning and every requeue bumps `attempt`, so a DISPATCH event
    of the current attempt on a queued job means "sent, not claimed". Jobs waiting their turn
    behind the customer's other order were never dispatched and are not counted.
    """
    window = now - timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS)
    sent_long_ago = JobEvent.objects.filter(
        job_id=OuterRef("pk"),
        action=JobEvent.Action.DISPATCH,
        attempt=OuterRef("attempt"),
        created_at__lt=window,
    )
    return ProvisioningJob.objects.filter(status=JobStatus.QUEUED).filter(Exists(sent_long_ago))


def job_list_dispatch_failing() -> QuerySet[ProvisioningJob]:
    """Queued jobs whose latest dispatch try (this attempt) failed: the backend refused or was
    unreachable (JobEvent dispatch_failed); they retry after a short backoff."""
    latest_try = (
        JobEvent.objects.filter(
            job_id=OuterRef("pk"),
            attempt=OuterRef("attempt"),
            action__in=[JobEvent.Action.DISPATCH, JobEvent.Action.DISPATCH_FAILED],
        )
        .order_by("-created_at", "-id")
        .values("action")[:1]
    )
    return (
        ProvisioningJob.objects.filter(status=JobStatus.QUEUED)
        .alias(latest_try=Subquery(latest_try))
        .filter(latest_try=JobEvent.Action.DISPATCH_FAILED)
    )
