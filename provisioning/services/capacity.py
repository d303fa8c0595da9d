"""Capacity: the Hetzner project at its server limit.

A run that meets the limit reports it (`fail` with `capacity: true`); the job goes back to
queued without spending a retry (CAPACITY_REQUEUE) and a CapacityHold stops provision builds
from being dispatched (deprovisions still go: they free servers) until a deprovision completes,
an operator lifts it, or CAPACITY_RETRY_SECONDS pass and a build is tried again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from provisioning.models import CapacityHold, ProvisioningJob
from provisioning.services.common import MAX_ERROR_CHARS, check_allows, record_move
from provisioning.state import CAPACITY_REQUEUE

logger = logging.getLogger(__name__)


def capacity_requeue_locked(
    job: ProvisioningJob, *, actor: str, error: str, failed_step: str, run_id: str | None
) -> ProvisioningJob:
    """CAPACITY_REQUEUE: PROVISIONING -> QUEUED, attempt+1, retry_count unchanged; the caller
    holds the row lock. Places (or renews) the capacity hold in the same transaction."""
    check_allows(job, CAPACITY_REQUEUE)
    now = timezone.now()
    was, old_attempt = job.status, job.attempt
    job.status = CAPACITY_REQUEUE.target
    job.attempt += 1
    job.next_attempt_at = None  # the hold decides when builds go again
    job.dispatched_at = None
    job.step, job.progress = "", None
    job.updated_at = now
    job.save(
        update_fields=[
            "status",
            "attempt",
            "next_attempt_at",
            "dispatched_at",
            "step",
            "progress",
            "updated_at",
        ]
    )
    hold = capacity_hold_place(reason=error, now=now)
    record_move(
        job,
        CAPACITY_REQUEUE,
        actor=actor,
        was=was,
        attempt=old_attempt,
        run_id=run_id,
        step=failed_step,
        reason=f"{error[: MAX_ERROR_CHARS - 200]} (no retry spent; builds wait for server "
        f"capacity until {hold.until:%H:%M:%S} or until a server is freed)",
    )
    return job


def capacity_hold_place(*, reason: str, now: datetime | None = None) -> CapacityHold:
    """Hold provision builds back for CAPACITY_RETRY_SECONDS, renewing an unlifted hold."""
    now = now or timezone.now()
    until = now + timedelta(seconds=settings.CAPACITY_RETRY_SECONDS)
    with transaction.atomic():
        hold = (
            CapacityHold.objects.select_for_update()
            .filter(lifted_at__isnull=True)
            .order_by("-started_at")
            .first()
        )
        if hold is None:
            hold = CapacityHold.objects.create(
                started_at=now, until=until, reason=reason[:MAX_ERROR_CHARS]
            )
            logger.warning("capacity hold placed until %s: %s", until, reason[:200])
        else:
            hold.until, hold.reason = until, reason[:MAX_ERROR_CHARS]
            hold.renewals += 1
            hold.save(update_fields=["until", "reason", "renewals"])
    return hold


def capacity_hold_lift(*, actor: str, now: datetime | None = None) -> int:
    """Lift every unlifted hold (a server was freed, or an operator raised the limit)."""
    now = now or timezone.now()
    lifted = CapacityHold.objects.filter(lifted_at__isnull=True).update(
        lifted_at=now, lifted_by=actor
    )
    if lifted:
        logger.info("capacity hold lifted by %s", actor)
    return lifted
