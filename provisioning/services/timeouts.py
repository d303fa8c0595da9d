"""Timeouts: a provisioning job whose run went silent (no heartbeat for JOB_TIMEOUT_SECONDS) or
ran past its attempt's JOB_DEADLINE_SECONDS takes TIMEOUT_REQUEUE while retries are left, else
TIMEOUT. Checked on demand (status reads) and swept by the worker; both take the same path.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from provisioning import selectors
from provisioning.models import Actor, ProvisioningJob, Step
from provisioning.services.common import cancel_run_later, fail_locked
from provisioning.state import TIMEOUT


def _looks_timed_out(job: ProvisioningJob, now: datetime) -> bool:
    return job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS) or (
        job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS)
    )


def _why(job: ProvisioningJob, now: datetime) -> str:
    """Why the job times out now, or "" if it does not."""
    if job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS):
        silent = int((now - job.silent_since()).total_seconds())
        return (
            f"No heartbeat for {silent}s (limit {settings.JOB_TIMEOUT_SECONDS}s) "
            f"during step {job.step or 'unknown'}"
        )
    if job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS):
        return (
            f"Attempt ran past its {settings.JOB_DEADLINE_SECONDS}s deadline "
            f"(step {job.step or 'unknown'}, heartbeats still arriving)"
        )
    return ""


def job_timeout_if_stale(*, job_id: UUID | str, now: datetime | None = None) -> bool:
    """Time out one silent or overdue provisioning job, on demand.

    Silence is measured from the last heartbeat, else the claim, else the last update, against
    JOB_TIMEOUT_SECONDS; an attempt also has an absolute JOB_DEADLINE_SECONDS. A timeout goes
    through the fail path (retry or failed) and cancels the silent run after commit. A queued job
    never times out. Returns True if this call timed the job out.
    """
    now = now or timezone.now()
    # Status reads call this on every poll: decide on a plain read first, lock only a likely timeout.
    seen = ProvisioningJob.objects.filter(pk=job_id, status__in=TIMEOUT.sources).first()
    if seen is None or not _looks_timed_out(seen, now):
        return False
    with transaction.atomic():
        job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or not job.allows(TIMEOUT):
            return False
        why = _why(job, now)
        if not why:
            return False
        run_id = job.workflow_run_id
        fail_locked(
            job,
            timeout=True,
            actor=Actor.SYSTEM,
            error=why,
            failed_step=Step.TIMEOUT,
            run_id=run_id,
        )
        cancel_run_later(run_id)
    return True


def job_timeout_stale(*, now: datetime | None = None, limit: int = 1000) -> int:
    """The sweep: time out every stale provisioning job (the same path as the on-demand check)."""
    now = now or timezone.now()
    ids = list(selectors.job_list_stale(now=now).values_list("pk", flat=True)[:limit])
    return sum(job_timeout_if_stale(job_id=pk, now=now) for pk in ids)
