"""The workflow run's calls: CLAIM, HEARTBEAT, COMPLETE, and its failure report (FAIL_REQUEUE or
FAIL).

Every call after claim is fenced: it only matches a job in a state its move starts from, bound to
this very run and run attempt. A call that matches nothing is refused with the reason (404 no
job, 403 a run never dispatched for it, 409 an earlier run or a state the move cannot start from)
and changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import IntegrityError, transaction
from django.utils import timezone

from provisioning import backends, selectors
from provisioning.errors import (
    CleanupNotAllowed,
    DispatchPending,
    FencedOut,
    IncompleteReport,
    InvalidTransition,
    JobNotFound,
    UserBusy,
    WrongRun,
)
from provisioning.models import Actor, Agent, JobEvent, JobKind, ProvisioningJob, Step
from provisioning.services.capacity import capacity_hold_lift, capacity_requeue_locked
from provisioning.services.common import (
    RunRef,
    fail_locked,
    fence_refusal,
    fenced,
    fenced_touch,
    finishing_runs_record,
    job_or_run_refusal,
    note,
    record_move,
    spend_token,
)
from provisioning.services.dispatch import dispatch_soon
from provisioning.state import (
    CAPACITY_REQUEUE,
    CLAIM,
    CLEANUP,
    COMPLETE,
    DISPATCH,
    FAIL,
    HEARTBEAT,
)

# --- claim -----------------------------------------------------------------------------------


def _resolve_untracked_run(job: ProvisioningJob, run: RunRef) -> None:
    """A dispatch that returned no run id (older GitHub Enterprise): look the run up by title."""
    dispatched_without_id = JobEvent.objects.filter(
        job=job,
        action=DISPATCH.action,
        attempt=job.attempt,
        workflow_run_id__isnull=True,
        created_at__gte=job.dispatched_at,
    ).exists()
    if not dispatched_without_id:
        raise DispatchPending(job_id=job.pk)
    mode = "deprovision" if job.is_deprovision else "provision"
    found = backends.get_backend().find_run(job_id=job.pk, attempt=job.attempt, mode=mode)
    if found != run.run_id:
        raise WrongRun(job_id=job.pk, run_id=run.run_id)
    ProvisioningJob.objects.filter(
        pk=job.pk, status__in=CLAIM.sources, attempt=job.attempt, workflow_run_id__isnull=True
    ).update(workflow_run_id=found)


def job_claim(*, job_id: UUID | str, attempt: int, run: RunRef) -> ProvisioningJob:
    """CLAIM: QUEUED -> PROVISIONING, only for the job's current attempt and only by the
    dispatched run.

    Sets claimed_at and the first heartbeat, stores the run's run_attempt. Refusals: 404 no job;
    403 a run never dispatched for it; 409 an earlier run, another attempt, not queued, the
    customer already has a job in flight, or a replayed token.
    """
    job = selectors.job_get(job_id=job_id)
    if job is None:
        raise JobNotFound(job_id)
    if (
        job.allows(CLAIM)
        and job.workflow_run_id is None
        and job.dispatched_at is not None
        and job.attempt == attempt
        and not selectors.job_was_dispatched_to_run(job_id=job_id, run_id=run.run_id)
    ):
        _resolve_untracked_run(job, run)  # raises unless the run is this dispatch's
    now = timezone.now()
    with transaction.atomic():
        spend_token(run, job_id=job_id)
        try:
            with transaction.atomic():
                claimed = ProvisioningJob.objects.filter(
                    pk=job_id,
                    status__in=CLAIM.sources,
                    attempt=attempt,
                    workflow_run_id=run.run_id,
                ).update(
                    status=CLAIM.target,
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
        record_move(
            job,
            CLAIM,
            actor=Actor.workflow(run.run_id),
            run_id=run.run_id,
            step=Step.CLAIM,
            reason=f"Claimed by run {run.run_id} (run attempt {run.run_attempt})",
        )
    return job


def _claim_refusal(*, job_id: UUID | str, attempt: int, run: RunRef) -> Exception:
    job = job_or_run_refusal(job_id, run)
    if isinstance(job, Exception):
        return job
    if attempt != job.attempt:
        return FencedOut(
            job_id=job_id, run_id=run.run_id, why=f"attempt {attempt} is over (now {job.attempt})"
        )
    return InvalidTransition(job_id=job_id, current=job.status, wanted=CLAIM.target)


# --- heartbeat -------------------------------------------------------------------------------


def job_heartbeat(
    *, job_id: UUID | str, run: RunRef, step: str | None = None, progress: int | None = None
) -> ProvisioningJob | None:
    """HEARTBEAT: PROVISIONING -> PROVISIONING, refreshing the heartbeat, optionally step and
    progress.

    One UPDATE in the common case (same step). A new step also writes a STEP event, so the
    timeline shows when each step began. Fenced: a call from any other run or attempt, or for a
    job no longer provisioning, raises and changes nothing. Returns None on the fast path.
    """
    now = timezone.now()
    if fenced_touch(job_id, run, now=now, progress=progress, step=step):
        return None
    changes: dict[str, Any] = {"last_heartbeat_at": now, "updated_at": now}
    if progress is not None:
        changes["progress"] = progress
    fence = fenced(job_id, run, HEARTBEAT)
    if step is not None:
        with transaction.atomic():
            # Only the call that actually changes the step writes the STEP event: two heartbeats
            # announcing the same new step at once make one event, not two.
            if (
                ProvisioningJob.objects.filter(fence)
                .exclude(step=step)
                .update(step=step, **changes)
            ):
                job = ProvisioningJob.objects.get(pk=job_id)
                record_move(
                    job,
                    HEARTBEAT,
                    actor=Actor.workflow(run.run_id),
                    run_id=run.run_id,
                    step=step,
                    reason=f"Step {step} started",
                )
                return job
        if ProvisioningJob.objects.filter(fence).update(**changes):
            return None  # a concurrent heartbeat set the same step first
    raise fence_refusal(job_id, run, HEARTBEAT)


# --- complete --------------------------------------------------------------------------------


def _record_server(
    job: ProvisioningJob, *, server_id: str, ipv4: str, server_name: str, now: datetime
) -> None:
    """A provision leaves its server on the agent; a deprovision clears it."""
    if job.is_deprovision:
        Agent.objects.filter(pk=job.agent_id).update(
            server_id="", ipv4=None, server_name="", updated_at=now
        )
    else:
        Agent.objects.filter(pk=job.agent_id).update(
            server_id=server_id, ipv4=ipv4 or None, server_name=server_name, updated_at=now
        )


def job_complete(
    *,
    job_id: UUID | str,
    run: RunRef,
    server_id: str,
    ipv4: str,
    server_name: str = "",
    hetzner_calls: int | None = None,
) -> ProvisioningJob:
    """COMPLETE: PROVISIONING -> RUNNING (terminal), recording the server on the agent.

    Repeated by the same run (its answer was lost, fresh token): returns the job, no change.
    `hetzner_calls`, when the run reports it, is stored on the job (limits.py reads it).
    """
    now = timezone.now()
    reported = {} if hetzner_calls is None else {"hetzner_calls": hetzner_calls}
    with transaction.atomic():
        spend_token(run, job_id=job_id)
        if (
            not (server_id and ipv4)
            and ProvisioningJob.objects.filter(pk=job_id, kind=JobKind.PROVISION).exists()
        ):
            raise IncompleteReport("A provision completes with its server_id and ipv4.")
        done = ProvisioningJob.objects.filter(fenced(job_id, run, COMPLETE)).update(
            status=COMPLETE.target,
            completed_at=now,
            last_heartbeat_at=now,
            step=Step.COMPLETE,
            progress=100,
            updated_at=now,
            **reported,
        )
        job = selectors.job_get(job_id=job_id)
        if not done:
            if (
                job is not None
                and job.status == COMPLETE.target
                and job.workflow_run_id == run.run_id
                and job.run_attempt == run.run_attempt
            ):
                return job  # a repeat of the call that already won
            raise fence_refusal(job_id, run, COMPLETE)
        if job is None:  # pragma: no cover (the row was just updated inside this transaction)
            raise JobNotFound(job_id)
        _record_server(job, server_id=server_id, ipv4=ipv4, server_name=server_name, now=now)
        record_move(
            job,
            COMPLETE,
            actor=Actor.workflow(run.run_id),
            run_id=run.run_id,
            step=Step.COMPLETE,
            reason="VM deleted" if job.is_deprovision else f"Server {server_id} at {ipv4}",
        )
        if job.is_deprovision:
            capacity_hold_lift(actor=Actor.workflow(run.run_id), now=now)  # a server was freed
        _slot_after_report(job_id, run, now=now)
    return job


def _slot_after_report(job_id: UUID | str, run: RunRef, *, now: datetime) -> None:
    """The reporting run's runner slot: on GitHub the run goes on after its report (its last
    steps), so the slot stays taken until GitHub says the run ended (services/finishing.py);
    a run that ends with its report frees it now, and the next job is dispatched at commit."""
    if not finishing_runs_record([(run.run_id, job_id)], now=now):
        dispatch_soon(limit=1)


# --- the run's failure report ----------------------------------------------------------------


def job_fail(
    *,
    job_id: UUID | str,
    run: RunRef,
    error: str,
    failed_step: str,
    capacity: bool = False,
    hetzner_calls: int | None = None,
) -> ProvisioningJob:
    """The run reports failure: FAIL_REQUEUE (PROVISIONING -> QUEUED, with backoff) while retries
    are left, else FAIL (-> FAILED). `capacity` (a provision met Hetzner's server limit):
    CAPACITY_REQUEUE, no retry spent, and builds are held back (services.capacity).

    Repeated by the same run: returns the job, no change. From any other run: refused.
    """
    with transaction.atomic():
        spend_token(run, job_id=job_id)
        job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise JobNotFound(job_id)
        owns = (
            job.allows(FAIL)
            and job.workflow_run_id == run.run_id
            and job.run_attempt == run.run_attempt
        )
        if not owns:
            already_reported = JobEvent.objects.filter(
                job=job,
                workflow_run_id=run.run_id,
                action__in=[FAIL.action, CAPACITY_REQUEUE.action],
            ).exists()
            if already_reported and not job.allows(FAIL):
                return job
            raise fence_refusal(job_id, run, FAIL)
        if hetzner_calls is not None:  # what this run spent, for limits.py
            job.hetzner_calls = hetzner_calls
            job.save(update_fields=["hetzner_calls"])
        _slot_after_report(job_id, run, now=timezone.now())
        if capacity and not job.is_deprovision:
            return capacity_requeue_locked(
                job,
                actor=Actor.workflow(run.run_id),
                error=error,
                failed_step=failed_step,
                run_id=run.run_id,
            )
        return fail_locked(
            job,
            timeout=False,
            actor=Actor.workflow(run.run_id),
            error=error,
            failed_step=failed_step,
            run_id=run.run_id,
        )


# --- cleanup -----------------------------------------------------------------------------------


def job_authorize_cleanup(*, job_id: UUID | str, run: RunRef) -> ProvisioningJob:
    """May this run delete every VM labelled with the job? Only the job's own cleanup run may.

    Approved only for a failed provision that was claimed at least once (else no VM can exist)
    whose recorded cleanup run is this run. Anything else is refused (404 no job, 409 not a failed
    provision, 403 any other run) and the run deletes nothing. Changes no state; an approval is
    recorded in the job's history, since it lets a run destroy servers.
    """
    job = selectors.job_get(job_id=job_id)
    if job is None:
        raise JobNotFound(job_id)
    if job.is_deprovision or not job.allows(CLEANUP) or job.claimed_at is None:
        raise CleanupNotAllowed(job_id=job.pk, why=_cleanup_refusal(job))
    if not job.cleanup_run_id or job.cleanup_run_id != run.run_id:
        raise WrongRun(job_id=job.pk, run_id=run.run_id)
    with transaction.atomic():
        spend_token(run, job_id=job.pk)
        note(
            job,
            actor=Actor.workflow(run.run_id),
            run_id=run.run_id,
            reason="Cleanup run authorized to delete every VM labelled with this job",
        )
    return job


def _cleanup_refusal(job: ProvisioningJob) -> str:
    if job.is_deprovision:
        return "a deprovision job deletes its VMs in its own claimed run"
    if not job.allows(CLEANUP):
        return f"it is {job.status}, and only a failed job is cleaned up"
    return "it was never claimed, so no VM of it can exist"
