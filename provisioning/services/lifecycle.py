"""The end of an agent's life: CANCEL whatever is building it, mark it ended, ENQUEUE a
deprovision job.
"""

from __future__ import annotations

from uuid import UUID

from django.db import transaction
from django.utils import timezone

from provisioning import selectors
from provisioning.errors import ProvisioningError
from provisioning.models import Agent, JobKind, ProvisioningJob
from provisioning.services.common import record_move
from provisioning.services.dispatch import dispatch_soon
from provisioning.services.operator import job_cancel
from provisioning.state import CANCEL, ENQUEUE


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
            agent=agent, kind=JobKind.PROVISION, status__in=CANCEL.sources
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
            status=ENQUEUE.target,
        )
        record_move(job, ENQUEUE, actor=actor, reason=f"Deprovision: {reason}")
    dispatch_soon()
    return job
