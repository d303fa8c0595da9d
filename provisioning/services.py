"""Every write to jobs goes through here: one function per operation, each owning its transaction
and leaving a JobEvent saying who did it and why.

The seed's operations and where they live now:
  enqueueProvisioningJob  -> job_enqueue            checkConcurrentProvision -> job_check_concurrent_provision
  updateJobStatus         -> job_claim / job_complete / job_fail / job_cancel / job_retry (one per move)
  recordHeartbeat         -> job_heartbeat          checkJobTimeout          -> job_timeout_if_stale
  getJobByStripeEventId / getJobByAgentId -> selectors.py

Transitions are conditional UPDATEs (`WHERE status = … AND <fence>`), so with concurrent callers
exactly one wins and the rest change nothing. Nothing here calls another system while holding a
row lock: dispatches and cancellations happen after commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from provisioning import selectors
from provisioning.errors import (
    AgentEnded,
    DispatchPending,
    FencedOut,
    IncompleteReport,
    InvalidTransition,
    JobNotFound,
    ProvisioningError,
    ProvisionInProgress,
    TokenReplayed,
    UserBusy,
    WrongRun,
)
from provisioning.models import (
    ACTIVE_STATUSES,
    Actor,
    Agent,
    JobEvent,
    JobKind,
    JobStatus,
    ProvisioningJob,
    Step,
    UsedTokenId,
    can_transition,
)

if TYPE_CHECKING:
    from provisioning.backends.base import RunnerBackend, RunStatus

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


class RunRef(Protocol):
    """What services need to know about the workflow run making a call (oidc.RunIdentity fits)."""

    @property
    def run_id(self) -> str: ...
    @property
    def run_attempt(self) -> int: ...


@dataclass(frozen=True)
class Run:
    """A plain RunRef, for callers that are not the HTTP API (tests, tools)."""

    run_id: str
    run_attempt: int = 1
    jti: str | None = None
    expires_at: datetime | None = None


# ---------------------------------------------------------------------------------------------
# helpers


def _event(
    job: ProvisioningJob,
    *,
    actor: str,
    action: str,
    from_status: str = "",
    to_status: str = "",
    attempt: int | None = None,
    run_id: str | None = None,
    step: str = "",
    reason: str = "",
) -> JobEvent:
    if from_status and to_status and from_status != to_status:
        # The transition table is the law; a service that breaks it is a bug, caught here.
        assert can_transition(from_status, to_status), (
            f"{from_status} -> {to_status} is not allowed"
        )
    return JobEvent.objects.create(
        job=job,
        actor=actor[:150],
        action=action,
        from_status=from_status,
        to_status=to_status,
        attempt=attempt if attempt is not None else job.attempt,
        workflow_run_id=run_id,
        step=step,
        reason=reason[:MAX_ERROR_CHARS],
    )


def _backoff(retry_count: int) -> timedelta:
    """Exponential: base, 2x base, 4x base … capped."""
    seconds = settings.RETRY_BACKOFF_SECONDS * (2 ** max(retry_count - 1, 0))
    return timedelta(seconds=min(seconds, settings.RETRY_BACKOFF_MAX_SECONDS))


def _spend_token(run: RunRef, *, job_id: UUID | str) -> None:
    """Single-use `jti` (claim, complete, fail). Kept until the token expires, then pruned."""
    jti = getattr(run, "jti", None)
    if not jti:
        return
    expires_at = getattr(run, "expires_at", None) or timezone.now() + timedelta(minutes=10)
    try:
        with transaction.atomic():
            UsedTokenId.objects.create(jti=jti, job_id=job_id, expires_at=expires_at)
    except IntegrityError as exc:
        raise TokenReplayed() from exc


def _fenced(job_id: UUID | str, run: RunRef) -> Q:
    """The fence every callback after claim must pass: in flight, bound to this very run."""
    return Q(
        pk=job_id,
        status=JobStatus.PROVISIONING,
        workflow_run_id=run.run_id,
        run_attempt=run.run_attempt,
    )


def _refusal(job_id: UUID | str, run: RunRef, *, wanted: str) -> Exception:
    """Why a fenced call matched no row: 404, 403 (never this job's run) or 409."""
    job = selectors.job_get(job_id=job_id)
    if job is None:
        return JobNotFound(job_id)
    if job.workflow_run_id != run.run_id:
        if selectors.job_was_dispatched_to_run(job_id=job_id, run_id=run.run_id):
            return FencedOut(job_id=job_id, run_id=run.run_id, why="a newer dispatch owns it")
        return WrongRun(job_id=job_id, run_id=run.run_id)
    if job.run_attempt is not None and job.run_attempt != run.run_attempt:
        return FencedOut(job_id=job_id, run_id=run.run_id, why="another run attempt claimed it")
    if job.status != JobStatus.PROVISIONING:
        return InvalidTransition(job_id=job_id, current=job.status, wanted=wanted)
    return FencedOut(job_id=job_id, run_id=run.run_id, why="it moved on")  # pragma: no cover


def _after_commit(fn: Callable[[], Any]) -> None:
    """Run a side effect after commit; never let it break the caller (it is retried by the worker)."""

    def guarded() -> None:
        try:
            fn()
        except Exception:
            logger.exception("after-commit side effect failed: %r", fn)

    transaction.on_commit(guarded)


def _cancel_run_later(run_id: str | None) -> None:
    if not run_id:
        return

    def cancel() -> None:
        from provisioning import backends

        backends.get_backend().cancel_run(run_id=run_id)

    _after_commit(cancel)


def _dispatch_soon() -> None:
    """After an enqueue commits, hand due work to a runner now instead of at the next tick."""
    if getattr(settings, "DISPATCH_ON_COMMIT", True):
        _after_commit(partial(job_dispatch_due, limit=5))


# ---------------------------------------------------------------------------------------------
# enqueue and the customer's own requests


def job_enqueue(
    *,
    agent: Agent,
    stripe_event_id: str | None = None,
    kind: str = JobKind.PROVISION,
    actor: str = Actor.STRIPE,
    reason: str = "",
) -> ProvisioningJob:
    """(nothing) -> QUEUED. Idempotent per Stripe event: a second call returns the existing job.

    A payment is never refused: if the customer already has work in flight, this job waits in
    `queued` until dispatch reaches it. Dispatch happens after commit.
    """
    # No look-up first: the unique stripe_event_id decides, and a redelivery lands in the except.
    try:
        with transaction.atomic():
            job = ProvisioningJob.objects.create(
                agent=agent,
                user_id=agent.owner_id,
                region=agent.region,
                stripe_event_id=stripe_event_id or None,
                kind=kind,
            )
            _event(
                job,
                actor=actor,
                action=JobEvent.Action.ENQUEUE,
                to_status=JobStatus.QUEUED,
                reason=reason or (f"Stripe event {stripe_event_id}" if stripe_event_id else kind),
            )
    except IntegrityError:
        # Lost a race on the unique stripe_event_id: the winner's job is the answer.
        if stripe_event_id:
            existing = selectors.job_get_by_stripe_event_id(stripe_event_id=stripe_event_id)
            if existing is not None:
                return existing
        # one_active_job_per_agent: this agent is already being worked on.
        raise ProvisionInProgress() from None
    _dispatch_soon()
    return job


def job_check_concurrent_provision(*, user: Any) -> None:
    """The seed's checkConcurrentProvision: refuse while the customer has a job queued or in flight."""
    if ProvisioningJob.objects.filter(user=user, status__in=ACTIVE_STATUSES).exists():
        raise ProvisionInProgress()


@transaction.atomic
def job_reprovision(*, agent: Agent, actor: str = Actor.CUSTOMER) -> ProvisioningJob:
    """The customer's "try again" for a failed agent: FAILED -> QUEUED on its latest job.

    Refused with the seed's message while the customer has any job queued or provisioning. The
    customer's row is locked so two clicks (or two tabs) cannot both pass the check.
    """
    if agent.is_ended:
        raise AgentEnded()
    type(agent.owner).objects.select_for_update().filter(pk=agent.owner_id).first()
    job_check_concurrent_provision(user=agent.owner)
    latest = selectors.job_get_latest_for_agent(agent_id=agent.pk)
    if latest is None:
        return job_enqueue(agent=agent, actor=actor, reason="re-provision requested")
    return job_retry(job_id=latest.pk, actor=actor, reason="re-provision requested by the customer")


# ---------------------------------------------------------------------------------------------
# dispatch (server side: picks due jobs and starts runs)


def job_dispatch_next(
    *, backend: RunnerBackend | None = None, now: datetime | None = None
) -> ProvisioningJob | None:
    """Take the next due job (SKIP LOCKED), mark it dispatched, start a run, record its id.

    Returns the job, or None when no due job could be taken. An empty answer does not prove the
    queue is empty (a due job locked by another dispatcher is skipped). Several dispatchers at
    once never take the same job: the row lock plus `dispatched_at` keep it theirs.
    A backend failure leaves the job queued with a short backoff and a DISPATCH_FAILED event;
    it never spends a retry.
    """
    from provisioning import backends as backends_module

    backend = backend or backends_module.get_backend()
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        job = (
            selectors.job_list_due(now=now)
            .select_for_update(skip_locked=True, of=("self",))
            .first()
        )
        if job is None:
            return None
        # Set only when this is a re-send of an unclaimed dispatch of the same attempt.
        previous_run = job.workflow_run_id if job.dispatched_at else None
        ProvisioningJob.objects.filter(pk=job.pk).update(
            dispatched_at=now, workflow_run_id=None, run_attempt=None, updated_at=now
        )
    # Outside any lock: talk to GitHub (or start the local runner).
    mode = "deprovision" if job.kind == JobKind.DEPROVISION else "provision"
    try:
        result = backend.dispatch(job_id=job.pk, attempt=job.attempt, mode=mode)
    except Exception as exc:
        _dispatch_failed(job=job, dispatched_at=now, error=exc)
        return job
    with transaction.atomic():
        recorded = ProvisioningJob.objects.filter(
            pk=job.pk, status=JobStatus.QUEUED, attempt=job.attempt, dispatched_at=now
        ).update(workflow_run_id=result.run_id, updated_at=timezone.now())
        if recorded:
            _event(
                job,
                actor=Actor.SYSTEM,
                action=JobEvent.Action.DISPATCH,
                run_id=result.run_id,
                step=Step.DISPATCH,
                reason=(
                    f"Run {result.run_id} started via {backend.name}"
                    + (f" (replaces unclaimed run {previous_run})" if previous_run else "")
                    if result.run_id
                    else f"Run requested via {backend.name}; its id will be looked up at claim"
                ),
            )
    # Runs nobody should wait for: the unclaimed one this dispatch replaces, and the new one if the
    # job was cancelled or moved on while we talked to the backend. Best effort: both are fenced.
    orphans = [previous_run] if previous_run and recorded else []
    if not recorded and result.run_id:
        orphans.append(result.run_id)
    for orphan in orphans:
        try:
            backend.cancel_run(run_id=orphan)
        except Exception:
            logger.exception("could not cancel superseded run %s", orphan)
    if recorded:  # we know what the row holds now; no read back
        job.dispatched_at, job.workflow_run_id, job.run_attempt = now, result.run_id, None
    else:
        job.refresh_from_db()
    return job


def _dispatch_failed(*, job: ProvisioningJob, dispatched_at: datetime, error: Exception) -> None:
    now = timezone.now()
    with transaction.atomic():
        released = ProvisioningJob.objects.filter(
            pk=job.pk, status=JobStatus.QUEUED, attempt=job.attempt, dispatched_at=dispatched_at
        ).update(
            dispatched_at=None,
            next_attempt_at=now + timedelta(seconds=settings.RETRY_BACKOFF_SECONDS),
            updated_at=now,
        )
        if released:
            _event(
                job,
                actor=Actor.SYSTEM,
                action=JobEvent.Action.DISPATCH_FAILED,
                step=Step.DISPATCH,
                reason=f"{type(error).__name__}: {error}; retrying in "
                f"{settings.RETRY_BACKOFF_SECONDS}s (no retry spent)",
            )
    logger.warning("dispatch of job %s failed: %s", job.pk, error)


def job_dispatch_due(
    *, backend: RunnerBackend | None = None, limit: int = 50, now: datetime | None = None
) -> int:
    """Dispatch up to `limit` due jobs; returns how many were taken."""
    taken = 0
    for _ in range(limit):
        if job_dispatch_next(backend=backend, now=now) is None:
            break
        taken += 1
    return taken


def job_send_cleanup(*, backend: RunnerBackend | None = None, limit: int = 20) -> int:
    """For failed provisions that were ever claimed: send one `mode: cleanup` run each.

    The run deletes every VM labelled with the job id, so nothing a dead attempt made keeps billing.
    """
    from provisioning import backends as backends_module

    backend = backend or backends_module.get_backend()
    sent = 0
    for _ in range(limit):
        now = timezone.now()
        with transaction.atomic(durable=True):
            job = (
                selectors.job_list_cleanup_due()
                .select_for_update(skip_locked=True, of=("self",))
                .first()
            )
            if job is None:
                break
            ProvisioningJob.objects.filter(pk=job.pk).update(cleanup_dispatched_at=now)
        try:
            result = backend.dispatch(job_id=job.pk, attempt=job.attempt, mode="cleanup")
        except Exception as exc:
            ProvisioningJob.objects.filter(pk=job.pk, cleanup_dispatched_at=now).update(
                cleanup_dispatched_at=None
            )
            logger.warning("cleanup dispatch for job %s failed: %s", job.pk, exc)
            break
        _event(
            job,
            actor=Actor.SYSTEM,
            action=JobEvent.Action.CLEANUP,
            run_id=result.run_id,
            reason="Cleanup run sent: deletes every VM labelled with this job",
        )
        sent += 1
    return sent


# ---------------------------------------------------------------------------------------------
# the run's callbacks (claim, heartbeat, complete, fail)


def _resolve_untracked_run(job: ProvisioningJob, run: RunRef) -> None:
    """A dispatch that returned no run id (older GitHub Enterprise): look the run up by title."""
    dispatched_without_id = JobEvent.objects.filter(
        job=job,
        action=JobEvent.Action.DISPATCH,
        attempt=job.attempt,
        workflow_run_id__isnull=True,
        created_at__gte=job.dispatched_at,
    ).exists()
    if not dispatched_without_id:
        raise DispatchPending(job_id=job.pk)
    from provisioning import backends

    found = backends.get_backend().find_run(job_id=job.pk, attempt=job.attempt)
    if found != run.run_id:
        raise WrongRun(job_id=job.pk, run_id=run.run_id)
    ProvisioningJob.objects.filter(
        pk=job.pk, status=JobStatus.QUEUED, attempt=job.attempt, workflow_run_id__isnull=True
    ).update(workflow_run_id=found)


def job_claim(*, job_id: UUID | str, attempt: int, run: RunRef) -> ProvisioningJob:
    """QUEUED -> PROVISIONING, only for the job's current attempt and only by the dispatched run.

    Sets claimed_at and the first heartbeat, stores the run's run_attempt. Refusals: 404 no job;
    403 a run never dispatched for it; 409 an earlier run, another attempt, not queued, the
    customer already has a job in flight, or a replayed token.
    """
    job = selectors.job_get(job_id=job_id)
    if job is None:
        raise JobNotFound(job_id)
    if (
        job.status == JobStatus.QUEUED
        and job.workflow_run_id is None
        and job.dispatched_at is not None
        and job.attempt == attempt
        and not selectors.job_was_dispatched_to_run(job_id=job_id, run_id=run.run_id)
    ):
        _resolve_untracked_run(job, run)  # raises unless the run is this dispatch's
    now = timezone.now()
    with transaction.atomic():
        _spend_token(run, job_id=job_id)
        try:
            with transaction.atomic():
                claimed = ProvisioningJob.objects.filter(
                    pk=job_id,
                    status=JobStatus.QUEUED,
                    attempt=attempt,
                    workflow_run_id=run.run_id,
                ).update(
                    status=JobStatus.PROVISIONING,
                    claimed_at=now,
                    last_heartbeat_at=now,
                    run_attempt=run.run_attempt,
                    step=Step.CLAIM,
                    progress=0,
                    next_attempt_at=None,
                    updated_at=now,
                )
        except IntegrityError:
            raise UserBusy(job_id=job_id) from None
        if not claimed:
            raise _claim_refusal(job_id=job_id, attempt=attempt, run=run)
        job = ProvisioningJob.objects.get(pk=job_id)
        _event(
            job,
            actor=Actor.workflow(run.run_id),
            action=JobEvent.Action.CLAIM,
            from_status=JobStatus.QUEUED,
            to_status=JobStatus.PROVISIONING,
            run_id=run.run_id,
            step=Step.CLAIM,
            reason=f"Claimed by run {run.run_id} (run attempt {run.run_attempt})",
        )
    return job


def _claim_refusal(*, job_id: UUID | str, attempt: int, run: RunRef) -> Exception:
    job = selectors.job_get(job_id=job_id)
    if job is None:
        return JobNotFound(job_id)
    if job.workflow_run_id != run.run_id:
        if selectors.job_was_dispatched_to_run(job_id=job_id, run_id=run.run_id):
            return FencedOut(job_id=job_id, run_id=run.run_id, why="a newer dispatch owns it")
        return WrongRun(job_id=job_id, run_id=run.run_id)
    if attempt != job.attempt:
        return FencedOut(
            job_id=job_id, run_id=run.run_id, why=f"attempt {attempt} is over (now {job.attempt})"
        )
    return InvalidTransition(job_id=job_id, current=job.status, wanted=JobStatus.PROVISIONING)


def job_heartbeat(
    *, job_id: UUID | str, run: RunRef, step: str | None = None, progress: int | None = None
) -> ProvisioningJob | None:
    """PROVISIONING -> PROVISIONING: refresh the heartbeat, optionally step and progress.

    One UPDATE in the common case (same step). A new step also writes a STEP event, so the
    timeline shows when each step began. Fenced: a call from any other run or attempt, or for a
    job no longer provisioning, raises and changes nothing. Returns None on the fast path.
    """
    now = timezone.now()
    changes: dict[str, Any] = {"last_heartbeat_at": now, "updated_at": now}
    if progress is not None:
        changes["progress"] = progress
    fence = _fenced(job_id, run)
    if step is None:
        if ProvisioningJob.objects.filter(fence).update(**changes):
            return None
    else:
        if ProvisioningJob.objects.filter(fence, step=step).update(**changes):
            return None
        with transaction.atomic():
            # Only the call that actually changes the step writes the STEP event: two heartbeats
            # announcing the same new step at once make one event, not two.
            if (
                ProvisioningJob.objects.filter(fence)
                .exclude(step=step)
                .update(step=step, **changes)
            ):
                job = ProvisioningJob.objects.get(pk=job_id)
                _event(
                    job,
                    actor=Actor.workflow(run.run_id),
                    action=JobEvent.Action.STEP,
                    run_id=run.run_id,
                    step=step,
                    reason=f"Step {step} started",
                )
                return job
        if ProvisioningJob.objects.filter(fence).update(**changes):
            return None  # a concurrent heartbeat set the same step first
    raise _refusal(job_id, run, wanted=JobStatus.PROVISIONING)


def job_complete(
    *, job_id: UUID | str, run: RunRef, server_id: str, ipv4: str, server_name: str = ""
) -> ProvisioningJob:
    """PROVISIONING -> RUNNING (terminal), recording the server on the agent.

    Repeated by the same run (its answer was lost, fresh token): returns the job, no change.
    """
    now = timezone.now()
    with transaction.atomic():
        _spend_token(run, job_id=job_id)
        if (
            not (server_id and ipv4)
            and ProvisioningJob.objects.filter(pk=job_id, kind=JobKind.PROVISION).exists()
        ):
            raise IncompleteReport("A provision completes with its server_id and ipv4.")
        done = ProvisioningJob.objects.filter(_fenced(job_id, run)).update(
            status=JobStatus.RUNNING,
            completed_at=now,
            last_heartbeat_at=now,
            step=Step.COMPLETE,
            progress=100,
            updated_at=now,
        )
        job = selectors.job_get(job_id=job_id)
        if not done:
            if (
                job is not None
                and job.status == JobStatus.RUNNING
                and job.workflow_run_id == run.run_id
                and job.run_attempt == run.run_attempt
            ):
                return job  # a repeat of the call that already won
            raise _refusal(job_id, run, wanted=JobStatus.RUNNING)
        assert job is not None
        if job.kind == JobKind.PROVISION:
            Agent.objects.filter(pk=job.agent_id).update(
                server_id=server_id,
                ipv4=ipv4 or None,
                server_name=server_name,
                updated_at=now,
            )
        else:
            Agent.objects.filter(pk=job.agent_id).update(
                server_id="", ipv4=None, server_name="", updated_at=now
            )
        _event(
            job,
            actor=Actor.workflow(run.run_id),
            action=JobEvent.Action.COMPLETE,
            from_status=JobStatus.PROVISIONING,
            to_status=JobStatus.RUNNING,
            run_id=run.run_id,
            step=Step.COMPLETE,
            reason=(
                f"Server {server_id} at {ipv4}" if job.kind == JobKind.PROVISION else "VM deleted"
            ),
        )
    return job


def job_fail(*, job_id: UUID | str, run: RunRef, error: str, failed_step: str) -> ProvisioningJob:
    """The run reports failure. PROVISIONING -> QUEUED (retry, with backoff) or -> FAILED.

    Repeated by the same run: returns the job, no change. From any other run: refused.
    """
    with transaction.atomic():
        _spend_token(run, job_id=job_id)
        job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise JobNotFound(job_id)
        owns = (
            job.status == JobStatus.PROVISIONING
            and job.workflow_run_id == run.run_id
            and job.run_attempt == run.run_attempt
        )
        if not owns:
            already_reported = JobEvent.objects.filter(
                job=job,
                workflow_run_id=run.run_id,
                action=JobEvent.Action.FAIL,
            ).exists()
            if already_reported and job.status != JobStatus.PROVISIONING:
                return job
            raise _refusal(job_id, run, wanted=JobStatus.FAILED)
        return _fail_locked(
            job,
            actor=Actor.workflow(run.run_id),
            action=JobEvent.Action.FAIL,
            error=error,
            failed_step=failed_step,
            run_id=run.run_id,
        )


def _fail_locked(
    job: ProvisioningJob,
    *,
    actor: str,
    action: str,
    error: str,
    failed_step: str,
    run_id: str | None = None,
) -> ProvisioningJob:
    """The one fail path (run's report, timeout, deadline, reconciliation); caller holds the lock.

    Retries left: -> QUEUED with retry_count+1, attempt+1 (fences the old run out) and backoff.
    Otherwise: -> FAILED with completed_at; an operator's turn.
    """
    now = timezone.now()
    was, old_attempt = job.status, job.attempt
    job.error = error[:MAX_ERROR_CHARS]
    job.failed_step = failed_step
    job.updated_at = now
    fields = ["status", "error", "failed_step", "updated_at"]
    if job.retry_count < job.max_retries:
        job.status = JobStatus.QUEUED
        job.retry_count += 1
        job.attempt += 1
        job.next_attempt_at = now + _backoff(job.retry_count)
        job.dispatched_at = None
        job.step, job.progress = "", None
        fields += ["retry_count", "attempt", "next_attempt_at", "dispatched_at", "step", "progress"]
        outcome = f"retry {job.retry_count} of {job.max_retries} at {job.next_attempt_at:%H:%M:%S}"
    else:
        job.status = JobStatus.FAILED
        job.completed_at = now
        fields += ["completed_at"]
        outcome = "no retries left"
    job.save(update_fields=fields)
    _event(
        job,
        actor=actor,
        action=action,
        from_status=was,
        to_status=job.status,
        attempt=old_attempt,
        run_id=run_id,
        step=failed_step,
        reason=f"{error[: MAX_ERROR_CHARS - 200]} ({outcome})",
    )
    return job


# ---------------------------------------------------------------------------------------------
# timeouts


def job_timeout_if_stale(*, job_id: UUID | str, now: datetime | None = None) -> bool:
    """The seed's checkJobTimeout, on demand: time out one silent or overdue provisioning job.

    Silence is measured from the last heartbeat, else the claim, else the last update, against
    JOB_TIMEOUT_SECONDS; an attempt also has an absolute JOB_DEADLINE_SECONDS. A timeout goes
    through the fail path (retry or failed) and cancels the silent run after commit. A queued job
    never times out. Returns True if this call timed the job out.
    """
    now = now or timezone.now()
    # Status reads call this on every poll: decide on a plain read first, lock only a likely timeout.
    seen = ProvisioningJob.objects.filter(pk=job_id, status=JobStatus.PROVISIONING).first()
    if seen is None or not (
        seen.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS)
        or seen.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS)
    ):
        return False
    with transaction.atomic():
        job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status != JobStatus.PROVISIONING:
            return False
        if job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS):
            silent = int((now - job.silent_since()).total_seconds())
            why = (
                f"No heartbeat for {silent}s (limit {settings.JOB_TIMEOUT_SECONDS}s) "
                f"during step {job.step or 'unknown'}"
            )
        elif job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS):
            why = (
                f"Attempt ran past its {settings.JOB_DEADLINE_SECONDS}s deadline "
                f"(step {job.step or 'unknown'}, heartbeats still arriving)"
            )
        else:
            return False
        run_id = job.workflow_run_id
        _fail_locked(
            job,
            actor=Actor.SYSTEM,
            action=JobEvent.Action.TIMEOUT,
            error=why,
            failed_step=Step.TIMEOUT,
            run_id=run_id,
        )
        _cancel_run_later(run_id)
    return True


def job_timeout_stale(*, now: datetime | None = None, limit: int = 1000) -> int:
    """The sweep: time out every stale provisioning job (the same path as the on-demand check)."""
    now = now or timezone.now()
    ids = list(selectors.job_list_stale(now=now).values_list("pk", flat=True)[:limit])
    return sum(job_timeout_if_stale(job_id=pk, now=now) for pk in ids)


# ---------------------------------------------------------------------------------------------
# operator actions


@transaction.atomic
def job_cancel(*, job_id: UUID | str, actor: str, reason: str = "") -> ProvisioningJob:
    """QUEUED | PROVISIONING -> FAILED (step `cancelled`); cancels the workflow run after commit."""
    job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
    if job is None:
        raise JobNotFound(job_id)
    if job.status not in ACTIVE_STATUSES:
        raise InvalidTransition(job_id=job.pk, current=job.status, wanted=JobStatus.FAILED)
    was, run_id, now = job.status, job.workflow_run_id, timezone.now()
    job.status = JobStatus.FAILED
    job.failed_step = Step.CANCELLED
    job.error = reason or f"Cancelled by {actor}"
    job.completed_at = now
    job.updated_at = now
    job.save(update_fields=["status", "failed_step", "error", "completed_at", "updated_at"])
    _event(
        job,
        actor=actor,
        action=JobEvent.Action.CANCEL,
        from_status=was,
        to_status=JobStatus.FAILED,
        run_id=run_id,
        step=Step.CANCELLED,
        reason=job.error,
    )
    _cancel_run_later(run_id)
    return job


@transaction.atomic
def job_retry(*, job_id: UUID | str, actor: str, reason: str = "") -> ProvisioningJob:
    """FAILED -> QUEUED: a fresh set of retries (retry_count 0), attempt+1, completed_at cleared.

    The failed attempt's error stays in the JobEvent history; the job's own fields are cleared
    so the customer sees the new attempt, not the old failure.
    """
    job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
    if job is None:
        raise JobNotFound(job_id)
    if not job.can_become(JobStatus.QUEUED) or job.status != JobStatus.FAILED:
        raise InvalidTransition(job_id=job.pk, current=job.status, wanted=JobStatus.QUEUED)
    if (
        job.kind == JobKind.PROVISION
        and Agent.objects.filter(pk=job.agent_id, ended_at__isnull=False).exists()
    ):
        raise AgentEnded()  # an ended agent is never built again (its deprovision may be retried)
    old_attempt = job.attempt
    job.status = JobStatus.QUEUED
    job.attempt += 1
    job.retry_count = 0
    job.completed_at = None
    job.next_attempt_at = None
    job.dispatched_at = None
    job.error, job.failed_step, job.step, job.progress = "", "", "", None
    job.updated_at = timezone.now()
    try:
        with transaction.atomic():
            job.save(
                update_fields=[
                    "status",
                    "attempt",
                    "retry_count",
                    "completed_at",
                    "next_attempt_at",
                    "dispatched_at",
                    "error",
                    "failed_step",
                    "step",
                    "progress",
                    "updated_at",
                ]
            )
    except IntegrityError:
        raise ProvisionInProgress() from None  # the agent already has an active job
    _event(
        job,
        actor=actor,
        action=JobEvent.Action.RETRY,
        from_status=JobStatus.FAILED,
        to_status=JobStatus.QUEUED,
        attempt=old_attempt,
        reason=reason or f"Retried by {actor}",
    )
    _dispatch_soon()
    return job


@transaction.atomic
def job_redispatch(*, job_id: UUID | str, actor: str) -> ProvisioningJob:
    """QUEUED -> QUEUED: forget the unclaimed dispatch and any backoff, so the next tick sends it."""
    job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
    if job is None:
        raise JobNotFound(job_id)
    if job.status != JobStatus.QUEUED:
        raise InvalidTransition(job_id=job.pk, current=job.status, wanted=JobStatus.QUEUED)
    old_run = job.workflow_run_id
    job.dispatched_at, job.next_attempt_at, job.workflow_run_id = None, None, None
    job.updated_at = timezone.now()
    job.save(update_fields=["dispatched_at", "next_attempt_at", "workflow_run_id", "updated_at"])
    _event(
        job,
        actor=actor,
        action=JobEvent.Action.REDISPATCH,
        run_id=old_run,
        reason="Re-dispatch requested" + (f"; run {old_run} cancelled" if old_run else ""),
    )
    _cancel_run_later(old_run)
    _dispatch_soon()
    return job


def job_force_timeout(*, job_id: UUID | str, actor: str, reason: str = "") -> ProvisioningJob:
    """PROVISIONING -> QUEUED (retries left) or FAILED: an operator's "time out now".

    The same fail path as job_timeout_if_stale, without waiting for the job to go silent (the
    operator knows the run is lost); spends a retry like any timeout and cancels the run after
    commit. InvalidTransition unless the job is provisioning, so a repeat changes nothing.
    """
    with transaction.atomic():
        job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise JobNotFound(job_id)
        if job.status != JobStatus.PROVISIONING:
            raise InvalidTransition(job_id=job.pk, current=job.status, wanted=JobStatus.FAILED)
        silent = int((timezone.now() - job.silent_since()).total_seconds())
        run_id = job.workflow_run_id
        _fail_locked(
            job,
            actor=actor,
            action=JobEvent.Action.TIMEOUT,
            error=reason
            or f"Timed out by {actor} (silent for {silent}s, step {job.step or 'unknown'})",
            failed_step=Step.TIMEOUT,
            run_id=run_id,
        )
        _cancel_run_later(run_id)
    return job


# ---------------------------------------------------------------------------------------------
# the end of an agent's life


def agent_end(
    *,
    agent_id: UUID | str,
    actor: str,
    reason: str,
    stripe_event_id: str | None = None,
) -> ProvisioningJob:
    """End an agent: cancel any build in flight, mark it ended, queue a deprovision job.

    Deprovisioning is a job kind in the same queue (same dispatch, fencing and audit): the run
    deletes every VM labelled with the agent and reports back; `complete` clears the server.
    Idempotent: a redelivered or second ending event returns the agent's deprovision job; two at
    once serialise on the agent's row lock.
    """
    with transaction.atomic():
        agent = Agent.objects.select_for_update().filter(pk=agent_id).first()
        if agent is None:
            raise ProvisioningError(f"No agent {agent_id}.")
        if stripe_event_id:
            same_event = selectors.job_get_by_stripe_event_id(stripe_event_id=stripe_event_id)
            if same_event is not None:
                return same_event
        existing = (
            ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION)
            .order_by("-created_at")
            .first()
        )
        if agent.is_ended and existing is not None:
            return existing
        for active in ProvisioningJob.objects.filter(
            agent=agent, kind=JobKind.PROVISION, status__in=ACTIVE_STATUSES
        ).values_list("pk", flat=True):
            job_cancel(job_id=active, actor=actor, reason=f"Agent ended: {reason}")
        now = timezone.now()
        agent.ended_at, agent.end_reason, agent.updated_at = now, reason[:255], now
        agent.save(update_fields=["ended_at", "end_reason", "updated_at"])
        job = ProvisioningJob.objects.create(
            agent=agent,
            user_id=agent.owner_id,
            region=agent.region,
            stripe_event_id=stripe_event_id or None,
            kind=JobKind.DEPROVISION,
        )
        _event(
            job,
            actor=actor,
            action=JobEvent.Action.ENQUEUE,
            to_status=JobStatus.QUEUED,
            reason=f"Deprovision: {reason}",
        )
    _dispatch_soon()
    return job


# ---------------------------------------------------------------------------------------------
# reconciliation: what the database says against what the runner backend (GitHub) says

# A round stops after this many backend errors in a row (GitHub down: don't hammer it).
RECONCILE_MAX_CONSECUTIVE_ERRORS = 3


def job_reconcile_runs(
    *, backend: RunnerBackend | None = None, limit: int = 50, now: datetime | None = None
) -> int:
    """Ask the backend about in-flight runs not checked for RECONCILE_INTERVAL_SECONDS; fail the
    jobs whose run has finished while they are still provisioning. Returns how many were failed.

    A run can end without telling us (the runner was killed after its last heartbeat, a workflow
    step outside the runner failed, the `fail` call never got through): the heartbeat timeout
    would notice only after JOB_TIMEOUT_SECONDS of silence, and not at all while a stray
    heartbeat thread keeps beating. GitHub knowing the run is over settles it sooner.

    Each job is leased first (`reconciled_at` moved to now by a conditional UPDATE, so several
    workers never ask about the same run in one interval), then the backend is asked outside any
    lock or transaction. A finished run fails its job through the fail path, after re-checking
    under the row lock that the job is still provisioning on that very run (the run's own
    `complete`/`fail` may have landed meanwhile). An unknown run (None: the local backend sees
    only the runs its own process started; GitHub answers 404) changes nothing, and neither does
    a backend error: the lease is given back so the job counts as unreconciled in /metrics.
    """
    from provisioning import backends as backends_module

    backend = backend or backends_module.get_backend()
    now = now or timezone.now()
    due = list(
        selectors.job_list_reconcile_due(now=now).values_list(
            "pk", "workflow_run_id", "run_attempt", "attempt", "reconciled_at"
        )[:limit]
    )
    failed = errors = 0
    for job_id, run_id, run_attempt, attempt, previous_check in due:
        leased = ProvisioningJob.objects.filter(
            pk=job_id,
            status=JobStatus.PROVISIONING,
            attempt=attempt,
            workflow_run_id=run_id,
            reconciled_at=previous_check,
        ).update(reconciled_at=now)
        if not leased:
            continue  # moved on, or another worker is checking it
        try:
            status = backend.get_run(run_id=run_id)
        except Exception as exc:
            errors += 1
            logger.warning("reconcile: could not read run %s of job %s: %s", run_id, job_id, exc)
            ProvisioningJob.objects.filter(pk=job_id, reconciled_at=now).update(
                reconciled_at=previous_check
            )
            if errors >= RECONCILE_MAX_CONSECUTIVE_ERRORS:
                logger.warning("reconcile: %d errors in a row; stopping this round", errors)
                break
            continue
        errors = 0
        if status is None:
            ProvisioningJob.objects.filter(pk=job_id, reconciled_at=now).update(
                reconciled_at=previous_check
            )
            continue
        if status.is_finished and _fail_finished_run(
            job_id=job_id,
            run_id=run_id,
            run_attempt=run_attempt,
            attempt=attempt,
            status=status,
            seen_by="GitHub" if backend.name == "github" else f"The {backend.name} backend",
        ):
            failed += 1
    return failed


def _fail_finished_run(
    *,
    job_id: UUID | str,
    run_id: str,
    run_attempt: int | None,
    attempt: int,
    status: RunStatus,
    seen_by: str,
) -> bool:
    with transaction.atomic():
        job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
        if (
            job is None
            or job.status != JobStatus.PROVISIONING
            or job.attempt != attempt
            or job.workflow_run_id != run_id
            or job.run_attempt != run_attempt
        ):
            return False  # the run's own report (or a timeout, an operator) got there first
        _fail_locked(
            job,
            actor=Actor.SYSTEM,
            action=JobEvent.Action.FAIL,
            error=(
                f"{seen_by} reports run {run_id} {status.status} "
                f"({status.conclusion or 'no conclusion'}) while the job was still provisioning "
                f"(step {job.step or 'unknown'})"
            ),
            failed_step=job.step or Step.TIMEOUT,
            run_id=run_id,
        )
    return True
