"""Dispatch, server side: pick due jobs and start their runs (DISPATCH, DISPATCH_FAILED), and send
one cleanup run per failed provision (CLEANUP). None of these moves changes a job's state.

Nothing here talks to the runner backend while holding a row lock: the job is taken and marked
dispatched in one short transaction, the backend is called outside it, and the answer is
recorded by a conditional UPDATE that only matches if the job is still where we left it.

Capacity: at most `limits.effective_max_in_flight()` runs are in flight (dispatched and not
finished: selectors.job_list_in_flight says exactly what counts) across every worker process.
Taking a job for a new run counts the runs in flight and marks the job dispatched in one
transaction that first takes a transaction-level PostgreSQL advisory lock, so two dispatchers
never both see the last free slot (SQLite, one writer at a time, needs no lock). The lock is held
for the count and the take only, never while the backend is called. Jobs beyond capacity stay
queued and unwritten: a full queue costs no events and no rows per tick.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from provisioning import backends, limits, selectors
from provisioning.backends.base import BudgetSpent, DispatchError, DispatchResult, RunnerBackend
from provisioning.models import Actor, ProvisioningJob, Step
from provisioning.services.budget import api_budget_wait
from provisioning.services.common import after_commit, note, record_move
from provisioning.state import CLEANUP, DISPATCH, DISPATCH_FAILED

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_SECONDS = 3600  # GitHub's primary rate limit resets within the hour
# pg_advisory_xact_lock key serializing "count the runs in flight, then take one" (any bigint
# no other code uses; this one spells "dispatch" in hex-ish).
DISPATCH_CAPACITY_LOCK = 0x0D15_9A7C


def _serialize_dispatchers() -> None:
    """Inside the taking transaction: wait for any other dispatcher's count-then-take to commit."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [DISPATCH_CAPACITY_LOCK])


def dispatch_soon(*, limit: int = 5) -> None:
    """After a commit that made work due or freed a slot (an enqueue, a run's `complete` or
    `fail`), hand due work to a runner now instead of at the worker's next tick: with every slot
    busy on launch day, each freed one would otherwise idle for up to WORKER_INTERVAL_SECONDS."""
    if settings.DISPATCH_ON_COMMIT:
        after_commit(partial(job_dispatch_due, limit=limit))


def job_dispatch_next(
    *,
    backend: RunnerBackend | None = None,
    now: datetime | None = None,
    capacity: int | None = None,
) -> ProvisioningJob | None:
    """DISPATCH: take the next due job (SKIP LOCKED), mark it dispatched, start a run, record its id.

    Returns the job, or None when no due job could be taken: none is due, or `capacity` runs
    (default `limits.effective_max_in_flight()`) are in flight already. An empty answer does not
    prove the queue is empty (a due job locked by another dispatcher is skipped). Several
    dispatchers at once never take the same job: the row lock plus `dispatched_at` keep it theirs.
    A re-send (below) replaces a run that is counted in flight already, so it needs no free slot.

    With the shared GitHub API budget spent (services/budget.py) nothing is taken; a draw refused
    between the take and the call gives the job back as it was, with no event, no backoff and no
    retry spent: it waits its turn like any other.
    A backend failure leaves the job queued with a short backoff and a DISPATCH_FAILED event;
    it never spends a retry.

    A dispatch nobody claimed within DISPATCH_CLAIM_TIMEOUT_SECONDS is re-sent only once the
    backend says its run has finished or does not exist: a run still queued or `waiting` (an
    environment's protection rules, a busy runner pool) may yet claim, and a twin dispatched
    behind it would wait just the same. Such a job stays dispatched for another window.
    """
    backend = backend or backends.get_backend()
    now = now or timezone.now()
    if capacity is None:
        capacity = limits.effective_max_in_flight(now=now)
    if getattr(backend, "shared_budget", False) and api_budget_wait() > 0:
        return None  # no request left to start a run with: everything waits, untouched
    taken = _take_due(now=now, capacity=capacity)
    if taken is None:
        return None
    job, unclaimed = taken
    mode = "deprovision" if job.is_deprovision else "provision"
    # Outside any lock: talk to GitHub (or start the local runner).
    previous_run: str | None = None
    if unclaimed is not _NOT_A_RESEND:
        try:
            replaced = _replace_or_wait(job, backend, mode=mode, previous_run=unclaimed, now=now)
        except BudgetSpent:
            _give_back(job, dispatched_at=now, was=job.dispatched_at)  # ask again soon
            return None
        if replaced is _KEEP_WAITING:
            job.refresh_from_db()
            return job
        previous_run = replaced if isinstance(replaced, str) else None
    try:
        result = backend.dispatch(job_id=job.pk, attempt=job.attempt, mode=mode)
    except BudgetSpent:
        _give_back(job, dispatched_at=now, was=None)  # no run: it waits for its turn again
        return None
    except Exception as exc:
        dispatch_failed(job=job, dispatched_at=now, error=exc)
        return job
    recorded = _record_dispatch(job, backend, result, previous_run=previous_run, now=now)
    _cancel_orphans(backend, previous_run=previous_run, result=result, recorded=recorded)
    if recorded:  # we know what the row holds now; no read back
        job.dispatched_at, job.workflow_run_id, job.run_attempt = now, result.run_id, None
    else:
        job.refresh_from_db()
    return job


# Markers for the phases below (a run id is a string or None, so these cannot be mistaken for one).
_NOT_A_RESEND = object()
_KEEP_WAITING = object()


def _take_due(*, now: datetime, capacity: int) -> tuple[ProvisioningJob, object] | None:
    """Lock the next due job (SKIP LOCKED) and mark it dispatched; with the run it re-sends, if any.

    Re-sends first (their run is in flight already), then, if fewer than `capacity` runs are in
    flight, the next job waiting for capacity in dispatch order. The second value is the
    unclaimed run of a re-send (a run id or None), else _NOT_A_RESEND.
    """
    # Hetzner's server limit was hit: builds wait; deprovisions go (they free servers).
    held = selectors.capacity_hold_in_force(now=now) is not None
    with transaction.atomic(durable=True):
        job = (
            selectors.job_list_resend_due(now=now, builds_held=held)
            .select_for_update(skip_locked=True, of=("self",))
            .first()
        )
        if job is None:
            # Full already (most ticks on launch day): say so without queueing for the lock,
            # which the dispatcher freeing a slot needs. A count below capacity is taken again
            # under the lock before anything is taken.
            if selectors.job_count_in_flight(now=now) >= capacity:
                return None
            _serialize_dispatchers()
            if selectors.job_count_in_flight(now=now) >= capacity:
                return None
            job = (
                selectors.job_list_due(now=now, builds_held=held)
                .select_for_update(skip_locked=True, of=("self",))
                .first()
            )
        if job is None:
            return None
        resend = job.dispatched_at is not None
        fields: dict[str, object] = {"dispatched_at": now, "updated_at": now}
        if not resend:
            fields.update(workflow_run_id=None, run_attempt=None)
        ProvisioningJob.objects.filter(pk=job.pk, status__in=DISPATCH.sources).update(**fields)
    return job, (job.workflow_run_id if resend else _NOT_A_RESEND)


def _give_back(job: ProvisioningJob, *, dispatched_at: datetime, was: datetime | None) -> None:
    """Undo this dispatcher's take (the budget refused the call): `dispatched_at` as it was. No
    event: nothing was sent and the job's state is what it was before the take."""
    ProvisioningJob.objects.filter(
        pk=job.pk, status__in=DISPATCH.sources, attempt=job.attempt, dispatched_at=dispatched_at
    ).update(dispatched_at=was)
    logger.info("job %s waits: the GitHub API budget is spent", job.pk)


def _replace_or_wait(
    job: ProvisioningJob,
    backend: RunnerBackend,
    *,
    mode: str,
    previous_run: object,
    now: datetime,
) -> object:
    """A re-send: _KEEP_WAITING while the old run may still claim; else the run id to replace
    (or None) once the row forgets it. _KEEP_WAITING too when the job was claimed meanwhile."""
    known = previous_run if isinstance(previous_run, str) else None
    run_id, waiting = _previous_run_or_wait(job, backend, mode=mode, run_id=known)
    this_dispatch = ProvisioningJob.objects.filter(
        pk=job.pk, status__in=DISPATCH.sources, attempt=job.attempt, dispatched_at=now
    )
    if waiting:
        if run_id and not known:
            # Found by its title: the run's claim now checks against this id, not the title
            # (whose dispatch event is older than the dispatched_at just written).
            this_dispatch.filter(workflow_run_id__isnull=True).update(workflow_run_id=run_id)
        return _KEEP_WAITING
    forgotten = this_dispatch.update(
        workflow_run_id=None, run_attempt=None, updated_at=timezone.now()
    )
    if not forgotten:  # claimed (or cancelled) while we asked the backend: nothing to send
        return _KEEP_WAITING
    return run_id


def _record_dispatch(
    job: ProvisioningJob,
    backend: RunnerBackend,
    result: DispatchResult,
    *,
    previous_run: str | None,
    now: datetime,
) -> bool:
    """Store the new run's id (DISPATCH) unless the job moved on meanwhile; True if stored."""
    with transaction.atomic():
        recorded = ProvisioningJob.objects.filter(
            pk=job.pk, status__in=DISPATCH.sources, attempt=job.attempt, dispatched_at=now
        ).update(workflow_run_id=result.run_id, updated_at=timezone.now())
        if recorded:
            record_move(
                job,
                DISPATCH,
                actor=Actor.SYSTEM,
                run_id=result.run_id,
                step=Step.DISPATCH,
                reason=(
                    f"Run {result.run_id} started via {backend.name}"
                    + (f" (replaces unclaimed run {previous_run})" if previous_run else "")
                    if result.run_id
                    else f"Run requested via {backend.name}; its id will be looked up at claim"
                ),
            )
    return bool(recorded)


def _cancel_orphans(
    backend: RunnerBackend, *, previous_run: str | None, result: DispatchResult, recorded: bool
) -> None:
    """Runs nobody should wait for: the unclaimed one this dispatch replaces, and the new one if
    the job was cancelled or moved on while we talked to the backend. Best effort: both are fenced.
    """
    orphans = [previous_run] if previous_run and recorded else []
    if not recorded and result.run_id:
        orphans.append(result.run_id)
    for orphan in orphans:
        try:
            backend.cancel_run(run_id=orphan)
        except Exception:
            logger.exception("could not cancel superseded run %s", orphan)


def _previous_run_or_wait(
    job: ProvisioningJob, backend: RunnerBackend, *, mode: str, run_id: str | None
) -> tuple[str | None, bool]:
    """Before re-sending an unclaimed dispatch: (the run, True) if it may still claim (a NOTE then
    says so, for the job page and the admin; no status is written), else (the run to replace or
    None, False).

    A backend that cannot answer does not block the re-send: the old behaviour, and the old run
    is fenced out by the new dispatch either way.
    """
    try:
        if run_id is None:  # dispatched without a run id (older GitHub Enterprise): by its title
            run_id = backend.find_run(job_id=job.pk, attempt=job.attempt, mode=mode)
        run = backend.get_run(run_id=run_id) if run_id else None
    except BudgetSpent:
        raise  # not asked: the caller gives the job back and asks when the budget allows
    except Exception:
        logger.exception("could not read run %s of job %s; re-sending its dispatch", run_id, job.pk)
        return run_id, False
    if run is None or not run.may_still_claim:
        return run_id, False
    note(
        job,
        actor=Actor.SYSTEM,
        run_id=run_id,
        step=Step.DISPATCH,
        reason=(
            f"Waiting for a build machine: run {run_id} is {run.status} on {backend.name} "
            f"(not claimed yet, not re-sent; checked again in "
            f"{settings.DISPATCH_CLAIM_TIMEOUT_SECONDS}s)"
        ),
    )
    logger.info("job %s: run %s is %s; waiting instead of re-sending", job.pk, run_id, run.status)
    return run_id, True


def retry_delay_seconds(error: Exception) -> int:
    """RETRY_BACKOFF_SECONDS, or longer when the backend named a wait (a rate limit's hint): a try
    before the limit resets only spends more of it. Capped, so a wild hint cannot park the job."""
    base = int(settings.RETRY_BACKOFF_SECONDS)
    hint = error.retry_after if isinstance(error, DispatchError) else None
    if hint is None:
        return base
    return max(base, min(hint, MAX_RETRY_AFTER_SECONDS))


def dispatch_failed(*, job: ProvisioningJob, dispatched_at: datetime, error: Exception) -> None:
    """DISPATCH_FAILED: give the job back to the queue with a short backoff; no retry spent."""
    now = timezone.now()
    delay = retry_delay_seconds(error)
    with transaction.atomic():
        released = ProvisioningJob.objects.filter(
            pk=job.pk,
            status__in=DISPATCH_FAILED.sources,
            attempt=job.attempt,
            dispatched_at=dispatched_at,
        ).update(
            dispatched_at=None,
            next_attempt_at=now + timedelta(seconds=delay),
            updated_at=now,
        )
        if released:
            record_move(
                job,
                DISPATCH_FAILED,
                actor=Actor.SYSTEM,
                step=Step.DISPATCH,
                reason=f"{type(error).__name__}: {error}; retrying in {delay}s (no retry spent)",
            )
    logger.warning("dispatch of job %s failed: %s", job.pk, error)


def job_dispatch_due(
    *, backend: RunnerBackend | None = None, limit: int = 50, now: datetime | None = None
) -> int:
    """Dispatch up to `limit` due jobs while there is capacity; returns how many were taken."""
    capacity = limits.effective_max_in_flight(now=now)  # once per round: it reads history
    taken = 0
    for _ in range(limit):
        if job_dispatch_next(backend=backend, now=now, capacity=capacity) is None:
            break
        taken += 1
    return taken


def job_send_cleanup(*, backend: RunnerBackend | None = None, limit: int = 20) -> int:
    """CLEANUP: for failed provisions that were ever claimed, send one `mode: cleanup` run each.

    The run deletes every VM labelled with the job id, so nothing a dead attempt made keeps billing.
    Its run id is stored: that run, and no other, is authorized to delete (job_authorize_cleanup).
    A cleanup run counts against the in-flight limit like any other run (taken under the same
    lock and count as dispatch); beyond it, cleanups wait their turn.
    """
    if not selectors.job_list_cleanup_due().exists():
        return 0  # the usual tick: nothing owed, so no lock, no count, no budget read
    backend = backend or backends.get_backend()
    capacity = limits.effective_max_in_flight()
    sent = 0
    if getattr(backend, "shared_budget", False) and api_budget_wait() > 0:
        return 0
    for _ in range(limit):
        now = timezone.now()
        with transaction.atomic(durable=True):
            _serialize_dispatchers()
            if selectors.job_count_in_flight(now=now) >= capacity:
                break
            job = (
                selectors.job_list_cleanup_due()
                .select_for_update(skip_locked=True, of=("self",))
                .first()
            )
            if job is None:
                break
            ProvisioningJob.objects.filter(pk=job.pk, status__in=CLEANUP.sources).update(
                cleanup_dispatched_at=now
            )
        try:
            result = backend.dispatch(job_id=job.pk, attempt=job.attempt, mode="cleanup")
        except Exception as exc:  # BudgetSpent too: the cleanup is simply owed still
            ProvisioningJob.objects.filter(pk=job.pk, cleanup_dispatched_at=now).update(
                cleanup_dispatched_at=None
            )
            logger.warning("cleanup dispatch for job %s failed: %s", job.pk, exc)
            break
        ProvisioningJob.objects.filter(pk=job.pk, cleanup_dispatched_at=now).update(
            cleanup_run_id=result.run_id
        )
        record_move(
            job,
            CLEANUP,
            actor=Actor.SYSTEM,
            run_id=result.run_id,
            reason="Cleanup run sent: deletes every VM labelled with this job",
        )
        sent += 1
    return sent
