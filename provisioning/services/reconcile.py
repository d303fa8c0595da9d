"""Reconciliation: what the database says against what the runner backend (GitHub) says. A job
still provisioning on a run the backend reports finished takes the fail path (FAIL_REQUEUE or
FAIL).

GitHub is asked with list calls: its unfinished runs (one call per status and page of 100, each
conditional on its ETag), matched to the jobs due a check; only a job whose run is not among them
costs one more call (GET the run: finished, or unknown). A round's calls do not grow with the jobs
in flight. When the shared API budget is spent (services/budget.py) the round is skipped and the
jobs stay due for the next one. A backend that cannot list (the local one) is asked per job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from provisioning import backends, selectors
from provisioning.backends.base import BudgetSpent, RunLister, RunnerBackend, RunStatus
from provisioning.models import Actor, JobStatus, ProvisioningJob, Step
from provisioning.services.budget import api_budget_wait
from provisioning.services.common import fail_locked, note
from provisioning.services.dispatch import dispatch_soon
from provisioning.state import FAIL

logger = logging.getLogger(__name__)

# A round stops after this many backend errors in a row (GitHub down: don't hammer it).
RECONCILE_MAX_CONSECUTIVE_ERRORS = 3
# Jobs a listing round checks at most (its calls do not depend on it; its UPDATEs do).
RECONCILE_LIST_MAX_JOBS = 2000


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
    backend = backend or backends.get_backend()
    now = now or timezone.now()
    if isinstance(backend, RunLister):
        return _reconcile_by_listing(backend, lister=backend, now=now)
    due = list(
        selectors.job_list_reconcile_due(now=now).values_list(
            "pk", "workflow_run_id", "run_attempt", "attempt", "reconciled_at"
        )[:limit]
    )
    seen_by = "GitHub" if backend.name == "github" else f"The {backend.name} backend"
    failed = errors = 0
    for job_id, run_id, run_attempt, attempt, previous_check in due:
        if run_id is None:  # the selector asks for a run; a row without one has nothing to check
            continue
        leased = ProvisioningJob.objects.filter(
            pk=job_id,
            status__in=FAIL.sources,
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
            _release(job_id, now=now, previous_check=previous_check)
            if errors >= RECONCILE_MAX_CONSECUTIVE_ERRORS:
                logger.warning("reconcile: %d errors in a row; stopping this round", errors)
                break
            continue
        errors = 0
        row = (job_id, run_id, run_attempt, attempt, previous_check)
        failed += _settle(row, status, now=now, seen_by=seen_by)
    return failed


def _reconcile_by_listing(backend: RunnerBackend, *, lister: RunLister, now: datetime) -> int:
    """One round with list calls (RunLister): lease every due job in one statement, list the
    unfinished runs, and ask about each run missing from the list alone. Returns jobs failed."""
    if getattr(backend, "shared_budget", False) and api_budget_wait(now=now) > 0:
        logger.info("reconcile: the GitHub API budget is spent; skipping this round")
        return 0
    leased = _lease_due(now=now)
    if not leased:
        return 0
    try:
        unfinished = lister.list_unfinished_runs()
    except Exception as exc:
        level = logging.INFO if isinstance(exc, BudgetSpent) else logging.WARNING
        logger.log(level, "reconcile: could not list runs: %s; skipping this round", exc)
        for job_id, _run, _ra, _a, previous_check in leased:
            _release(job_id, now=now, previous_check=previous_check)
        return 0
    seen_by = "GitHub" if backend.name == "github" else f"The {backend.name} backend"
    failed = 0
    for index, (job_id, run_id, run_attempt, attempt, previous_check) in enumerate(leased):
        if run_id in unfinished:
            continue  # still going: the lease stands as this check
        try:
            status = backend.get_run(run_id=run_id)  # gone from the list: finished, or unknown?
        except Exception as exc:
            logger.warning("reconcile: could not read run %s of job %s: %s", run_id, job_id, exc)
            for rest in leased[index:]:
                _release(rest[0], now=now, previous_check=rest[4])
            break
        row = (job_id, run_id, run_attempt, attempt, previous_check)
        failed += _settle(row, status, now=now, seen_by=seen_by)
    return failed


def _settle(
    row: tuple[UUID, str, int | None, int, datetime | None],
    status: RunStatus | None,
    *,
    now: datetime,
    seen_by: str,
) -> int:
    """What the backend said about a leased job's run: unknown → the lease is given back (the job
    counts as unreconciled); finished → the fenced fail path (1 if it failed the job); still
    going → the lease stands as this check."""
    job_id, run_id, run_attempt, attempt, previous_check = row
    if status is None:
        _release(job_id, now=now, previous_check=previous_check)
        return 0
    if status.is_finished and _fail_finished_run(
        job_id=job_id,
        run_id=run_id,
        run_attempt=run_attempt,
        attempt=attempt,
        status=status,
        seen_by=seen_by,
    ):
        return 1
    return 0


def _lease_due(*, now: datetime) -> list[tuple[UUID, str, int | None, int, datetime | None]]:
    """Take the due jobs for this round: lock them (SKIP LOCKED: another worker's are left to it)
    and move `reconciled_at` to now in the same transaction, so no other worker checks them
    within the interval. Returns (id, run id, run attempt, attempt, previous check) each."""
    with transaction.atomic():
        rows = list(
            selectors.job_list_reconcile_due(now=now)
            .select_for_update(skip_locked=True, of=("self",))
            .values_list("pk", "workflow_run_id", "run_attempt", "attempt", "reconciled_at")[
                :RECONCILE_LIST_MAX_JOBS
            ]
        )
        leased = [row for row in rows if row[1] is not None]
        ProvisioningJob.objects.filter(pk__in=[row[0] for row in leased]).update(reconciled_at=now)
    return [(pk, str(run), ra, a, prev) for pk, run, ra, a, prev in leased]


def _release(job_id: UUID | str, *, now: datetime, previous_check: datetime | None) -> None:
    """Give the lease back: the job counts as not reconciled."""
    ProvisioningJob.objects.filter(pk=job_id, reconciled_at=now).update(
        reconciled_at=previous_check
    )


def job_settle_ended_run(
    *, run_id: str, run_attempt: int | None, conclusion: str | None, seen_by: str
) -> str | None:
    """GitHub says run `run_id` (attempt `run_attempt`) has ended (its `workflow_run` webhook).
    The usual case changes nothing: the run reported before it ended. Otherwise its job will
    never hear from it again, and waits no longer than it must:

    - still provisioning on that very run and run attempt (a killed runner: no `fail` call) →
      the fenced fail path now (retry or fail), as reconcile would at its next round; "failed";
    - dispatched to it and never claimed (the run died before its claim step) → its re-send is
      due now instead of after DISPATCH_CLAIM_TIMEOUT_SECONDS (a NOTE says why); the dispatcher
      still asks GitHub for the run before it replaces it, as for any re-send; "resend".

    A payload without a run attempt fails nothing (reconcile asks GitHub itself)."""
    if run_attempt is not None:
        found = (
            ProvisioningJob.objects.filter(workflow_run_id=run_id, status=JobStatus.PROVISIONING)
            .values_list("pk", "attempt")
            .first()
        )
        if found is not None and _fail_finished_run(
            job_id=found[0],
            run_id=run_id,
            run_attempt=run_attempt,
            attempt=found[1],
            status=RunStatus(run_id=run_id, status="completed", conclusion=conclusion),
            seen_by=seen_by,
        ):
            return "failed"
    return "resend" if _resend_now(run_id=run_id, conclusion=conclusion, seen_by=seen_by) else None


def _resend_now(*, run_id: str, conclusion: str | None, seen_by: str) -> bool:
    """Make the unclaimed dispatch to `run_id` due for its re-send now (dispatched_at moved back
    by the claim window), with a NOTE; the next dispatch (asked for after commit) re-sends it."""
    now = timezone.now()
    window = timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS)
    with transaction.atomic():
        job = (
            ProvisioningJob.objects.select_for_update()
            .filter(
                workflow_run_id=run_id,
                status=JobStatus.QUEUED,
                dispatched_at__gt=now - window,
            )
            .first()
        )
        if job is None:
            return False
        job.dispatched_at = now - window
        job.updated_at = now
        job.save(update_fields=["dispatched_at", "updated_at"])
        note(
            job,
            actor=Actor.SYSTEM,
            run_id=run_id,
            step=Step.DISPATCH,
            reason=(
                f"{seen_by} reports run {run_id} completed ({conclusion or 'no conclusion'}) "
                "before it claimed the job: its re-send is due now, not after the claim window"
            ),
        )
    logger.info("job %s: run %s ended unclaimed; re-sending now", job.pk, run_id)
    dispatch_soon(limit=1)
    return True


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
            or not job.allows(FAIL)
            or job.attempt != attempt
            or job.workflow_run_id != run_id
            or job.run_attempt != run_attempt
        ):
            return False  # the run's own report (or a timeout, an operator) got there first
        fail_locked(
            job,
            timeout=False,
            actor=Actor.SYSTEM,
            error=(
                f"{seen_by} reports run {run_id} {status.status} "
                f"({status.conclusion or 'no conclusion'}) while the job was still provisioning "
                f"(step {job.step or 'unknown'})"
            ),
            failed_step=job.step or Step.TIMEOUT,
            run_id=run_id,
        )
    return True
