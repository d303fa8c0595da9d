"""New work: a job for a payment (ENQUEUE), and the customer's own "try again" (RETRY).

A payment is never refused: if the customer already has work in flight, its job waits in
`queued` until dispatch reaches it. The customer's own request is refused while any of their jobs
is queued or provisioning.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from provisioning import selectors
from provisioning.errors import (
    AgentEnded,
    CancelledByOurTeam,
    ProvisionInProgress,
    ReprovisionLimited,
)
from provisioning.models import ACTIVE_STATUSES, Actor, Agent, JobKind, ProvisioningJob
from provisioning.services.common import insert_new, record_move
from provisioning.services.dispatch import dispatch_soon
from provisioning.services.operator import job_retry
from provisioning.state import ENQUEUE


def job_enqueue(
    *,
    agent: Agent,
    stripe_event_id: str | None = None,
    kind: str = JobKind.PROVISION,
    actor: str = Actor.STRIPE,
    reason: str = "",
) -> ProvisioningJob:
    """ENQUEUE: (nothing) -> QUEUED. Idempotent per Stripe event: a second call returns the
    existing job.

    A payment is never refused: if the customer already has work in flight, this job waits in
    `queued` until dispatch reaches it. Dispatch happens after commit.
    """
    job = ProvisioningJob(
        agent=agent,
        user_id=agent.owner_id,
        region=agent.region,
        stripe_event_id=stripe_event_id or None,
        kind=kind,
        status=ENQUEUE.target,
    )
    event = record_move(
        job,
        ENQUEUE,
        actor=actor,
        reason=reason or (f"Stripe event {stripe_event_id}" if stripe_event_id else kind),
        save=False,
    )
    # No look-up first: the unique stripe_event_id decides, and a redelivery lands in the except.
    # Job and event go in together: on PostgreSQL one statement, atomic on its own; inside a
    # caller's transaction (or on SQLite) a savepoint keeps a lost race from spoiling it.
    try:
        if connection.vendor == "postgresql" and not connection.in_atomic_block:
            insert_new(job, event)
        else:
            with transaction.atomic():
                insert_new(job, event)
    except IntegrityError:
        # Lost a race on the unique stripe_event_id: the winner's job is the answer.
        if stripe_event_id:
            existing = selectors.job_get_by_stripe_event_id(stripe_event_id=stripe_event_id)
            if existing is not None:
                return existing
        # one_active_job_per_agent: this agent is already being worked on.
        raise ProvisionInProgress() from None
    dispatch_soon()
    return job


def job_check_concurrent_provision(*, user: Any) -> None:
    """Refuse (ProvisionInProgress) while the customer has a job queued or in flight."""
    if ProvisioningJob.objects.filter(user=user, status__in=ACTIVE_STATUSES).exists():
        raise ProvisionInProgress()


@transaction.atomic
def job_reprovision(*, agent: Agent, actor: str = Actor.CUSTOMER) -> ProvisioningJob:
    """The customer's "try again" for a failed agent: RETRY (FAILED -> QUEUED) on its latest job,
    or ENQUEUE if it has none.

    Refused with the in-progress message while the customer has any job queued or provisioning;
    for a build our team cancelled (support decides); and past REPROVISION_LIMIT_PER_HOUR tries
    of this agent in the last hour (each try makes a VM). The customer's row is locked so two
    clicks (or two tabs) cannot both pass the checks.
    """
    if agent.is_ended:
        raise AgentEnded()
    type(agent.owner).objects.select_for_update().filter(pk=agent.owner_id).first()
    job_check_concurrent_provision(user=agent.owner)
    latest = selectors.job_get_latest_for_agent(agent_id=agent.pk)
    if latest is None:
        return job_enqueue(agent=agent, actor=actor, reason="re-provision requested")
    if latest.is_cancelled:
        raise CancelledByOurTeam()
    since = timezone.now() - timedelta(hours=1)
    recent = selectors.job_count_customer_retries(agent_id=agent.pk, since=since)
    if recent >= settings.REPROVISION_LIMIT_PER_HOUR:
        raise ReprovisionLimited(limit=settings.REPROVISION_LIMIT_PER_HOUR)
    return job_retry(job_id=latest.pk, actor=actor, reason="re-provision requested by the customer")
