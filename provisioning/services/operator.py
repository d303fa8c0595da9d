"""Operator actions (the admin console, and RETRY for the customer's "try again"): CANCEL, RETRY,
REDISPATCH and an immediate TIMEOUT. Each locks the job's row, checks that its move applies
(InvalidTransition otherwise, so a repeat changes nothing) and leaves a JobEvent naming who.
"""

from __future__ import annotations

from uuid import UUID

from django.db import IntegrityError, transaction
from django.utils import timezone

from provisioning.errors import AgentEnded, JobNotFound, ProvisionInProgress
from provisioning.models import Agent, JobKind, ProvisioningJob, Step
from provisioning.services.common import cancel_run_later, check_allows, fail_locked, record_move
from provisioning.services.dispatch import dispatch_soon
from provisioning.state import CANCEL, REDISPATCH, RETRY, TIMEOUT


def _locked(job_id: UUID | str) -> ProvisioningJob:
    job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
    if job is None:
        raise JobNotFound(job_id)
    return job


@transaction.atomic
def job_cancel(*, job_id: UUID | str, actor: str, reason: str = "") -> ProvisioningJob:
    """CANCEL: QUEUED | PROVISIONING -> FAILED (step `cancelled`); cancels the workflow run after
    commit."""
    job = _locked(job_id)
    check_allows(job, CANCEL)
    was, run_id, now = job.status, job.workflow_run_id, timezone.now()
    job.status = CANCEL.target
    job.failed_step = Step.CANCELLED
    job.error = reason or f"Cancelled by {actor}"
    job.completed_at = now
    job.updated_at = now
    job.save(update_fields=["status", "failed_step", "error", "completed_at", "updated_at"])
    record_move(
        job,
        CANCEL,
        actor=actor,
        was=was,
        run_id=run_id,
        step=Step.CANCELLED,
        reason=job.error,
    )
    cancel_run_later(run_id, job_id=job.pk)
    return job


@transaction.atomic
def job_retry(*, job_id: UUID | str, actor: str, reason: str = "") -> ProvisioningJob:
    """RETRY: FAILED -> QUEUED with a fresh set of retries (retry_count 0), attempt+1,
    completed_at cleared.

    The failed attempt's error stays in the JobEvent history; the job's own fields are cleared
    so the customer sees the new attempt, not the old failure.
    """
    job = _locked(job_id)
    check_allows(job, RETRY)
    if (
        job.kind == JobKind.PROVISION
        and Agent.objects.filter(pk=job.agent_id, ended_at__isnull=False).exists()
    ):
        raise AgentEnded()  # an ended agent is never built again (its deprovision may be retried)
    was, old_attempt = job.status, job.attempt
    job.status = RETRY.target
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
    record_move(
        job,
        RETRY,
        actor=actor,
        was=was,
        attempt=old_attempt,
        reason=reason or f"Retried by {actor}",
    )
    dispatch_soon()
    return job


@transaction.atomic
def job_redispatch(*, job_id: UUID | str, actor: str) -> ProvisioningJob:
    """REDISPATCH: QUEUED -> QUEUED, forgetting the unclaimed dispatch and any backoff, so the
    next tick sends it."""
    job = _locked(job_id)
    check_allows(job, REDISPATCH)
    old_run = job.workflow_run_id
    job.dispatched_at, job.next_attempt_at, job.workflow_run_id = None, None, None
    job.updated_at = timezone.now()
    job.save(update_fields=["dispatched_at", "next_attempt_at", "workflow_run_id", "updated_at"])
    record_move(
        job,
        REDISPATCH,
        actor=actor,
        run_id=old_run,
        reason="Re-dispatch requested" + (f"; run {old_run} cancelled" if old_run else ""),
    )
    cancel_run_later(old_run, job_id=job.pk)
    dispatch_soon()
    return job


def job_force_timeout(*, job_id: UUID | str, actor: str, reason: str = "") -> ProvisioningJob:
    """TIMEOUT_REQUEUE or TIMEOUT: an operator's "time out now" for a provisioning job.

    The same fail path as job_timeout_if_stale, without waiting for the job to go silent (the
    operator knows the run is lost); spends a retry like any timeout and cancels the run after
    commit. InvalidTransition unless the job is provisioning, so a repeat changes nothing.
    """
    with transaction.atomic():
        job = _locked(job_id)
        check_allows(job, TIMEOUT)
        silent = int((timezone.now() - job.silent_since()).total_seconds())
        run_id = job.workflow_run_id
        fail_locked(
            job,
            timeout=True,
            actor=actor,
            error=reason
            or f"Timed out by {actor} (silent for {silent}s, step {job.step or 'unknown'})",
            failed_step=Step.TIMEOUT,
            run_id=run_id,
        )
        cancel_run_later(run_id, job_id=job.pk)
    return job
