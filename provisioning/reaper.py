"""The reaper's verdicts: given the VMs the scheduled workflow found labelled as ours, which may go.

The workflow lists every Hetzner server labelled `managed-by=agent-provisioning` and sends each
one's id, name, `job-id` and `agent-id` labels and creation time; `reaper_verdicts` judges each
against the database and `reaper_judge` also records the deletions on the related jobs. The
workflow deletes exactly the servers answered under `delete`.

Rules, in the order they are applied (the first that matches decides):

Never deleted (checked first, whatever else is true):
  1. the current VM of a non-ended agent (`agent.server_id` equals the server id);
  2. a VM whose job is `queued` or `provisioning` (a run may be building or adopting it);
  3. a VM of an agent whose latest provision job is `queued` or `provisioning` (a rebuild is
     under way; the previous VM is still the customer's until it completes);
  4. a VM whose labels disagree with the database (its job belongs to another agent): an
     operator should look, not a cron job.
Deleted, once older than the grace period (`REAPER_GRACE_SECONDS`, default 1800):
  5. no job and no agent in the database knows it (unknown, missing or malformed labels);
  6. its agent has ended (deprovisioned, refunded, disputed);
  7. its job is a failed provision (out of retries or cancelled; its cleanup run may be lost);
  8. an orphan duplicate: the agent's latest provision job is `running` and the agent's
     current VM is another server.
Otherwise kept, with the reason.

A VM younger than the grace period, or whose age is unknown, is kept even if a delete rule
matches: a run may have just created it and not reported back yet.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from provisioning.models import (
    ACTIVE_STATUSES,
    Agent,
    JobEvent,
    JobKind,
    JobStatus,
    ProvisioningJob,
)

DEFAULT_GRACE_SECONDS = 1800


@dataclass(frozen=True)
class ManagedServer:
    """One VM as the workflow saw it in Hetzner."""

    server_id: str
    name: str = ""
    job_id: str = ""
    agent_id: str = ""
    created: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    server_id: str
    delete: bool
    reason: str
    # The job the verdict concerns (the VM's own job, else the agent's latest), for the audit note.
    job: ProvisioningJob | None = None


def grace_period() -> timedelta:
    return timedelta(seconds=int(getattr(settings, "REAPER_GRACE_SECONDS", DEFAULT_GRACE_SECONDS)))


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except (ValueError, AttributeError, TypeError):
        return None


T = TypeVar("T")


def _by_label(rows: dict[uuid.UUID, T], label: str) -> T | None:
    key = _uuid(label)
    return rows.get(key) if key is not None else None


def _latest_provisions(agent_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, ProvisioningJob]:
    """Each agent's latest provision job (served by the `job_agent_latest` index)."""
    latest: dict[uuid.UUID, ProvisioningJob] = {}
    rows = ProvisioningJob.objects.filter(
        agent_id__in=set(agent_ids), kind=JobKind.PROVISION
    ).order_by("agent_id", "-created_at")
    for job in rows:
        latest.setdefault(job.agent_id, job)
    return latest


def _latest_any(agent_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, ProvisioningJob]:
    latest: dict[uuid.UUID, ProvisioningJob] = {}
    for job in ProvisioningJob.objects.filter(agent_id__in=set(agent_ids)).order_by(
        "agent_id", "-created_at"
    ):
        latest.setdefault(job.agent_id, job)
    return latest


def _age(server: ManagedServer, now: datetime) -> timedelta | None:
    if server.created is None:
        return None
    created = server.created
    if timezone.is_naive(created):
        created = created.replace(tzinfo=UTC)
    return now - created


def reaper_verdicts(
    *, servers: Sequence[ManagedServer], now: datetime | None = None
) -> list[Verdict]:
    """One verdict per distinct server id, in the order first given. Reads only."""
    now = now or timezone.now()
    grace = grace_period()
    unique: list[ManagedServer] = []
    seen: set[str] = set()
    for server in servers:  # a server sent twice is judged once, by its first description
        if server.server_id not in seen:
            seen.add(server.server_id)
            unique.append(server)

    job_ids = {u for s in unique if (u := _uuid(s.job_id))}
    jobs = {j.pk: j for j in ProvisioningJob.objects.filter(pk__in=job_ids)}
    agent_ids = {u for s in unique if (u := _uuid(s.agent_id))} | {
        j.agent_id for j in jobs.values()
    }
    agents = {a.pk: a for a in Agent.objects.filter(pk__in=agent_ids)}
    latest_provision = _latest_provisions(agents)
    latest_any = _latest_any(agents)

    verdicts: list[Verdict] = []
    for server in unique:
        job = _by_label(jobs, server.job_id)
        labelled_agent = _by_label(agents, server.agent_id)
        agent = labelled_agent or (agents.get(job.agent_id) if job else None)
        related = job or (latest_any.get(agent.pk) if agent else None)
        latest = latest_provision.get(agent.pk) if agent else None

        def keep(
            reason: str,
            *,
            server: ManagedServer = server,
            related: ProvisioningJob | None = related,
        ) -> Verdict:
            return Verdict(server.server_id, False, reason, related)

        # -- never ---------------------------------------------------------------------------
        if agent is not None and not agent.is_ended and agent.server_id == server.server_id:
            verdicts.append(keep(f"current VM of agent {agent.pk}"))
            continue
        if job is not None and job.status in ACTIVE_STATUSES:
            verdicts.append(keep(f"its job {job.pk} is {job.status}"))
            continue
        if (
            agent is not None
            and not agent.is_ended
            and latest is not None
            and latest.status in ACTIVE_STATUSES
        ):
            verdicts.append(keep(f"agent {agent.pk} has provision job {latest.pk} {latest.status}"))
            continue
        if job is not None and labelled_agent is not None and job.agent_id != labelled_agent.pk:
            verdicts.append(
                keep(
                    f"labels disagree: job {job.pk} belongs to agent {job.agent_id}, "
                    f"not {labelled_agent.pk}; left for an operator"
                )
            )
            continue

        # -- delete, after the grace period --------------------------------------------------
        why = ""
        if job is None and agent is None:
            why = "no job or agent in the database knows it"
        elif agent is not None and agent.is_ended:
            why = f"agent {agent.pk} ended ({agent.end_reason or 'no reason recorded'})"
        elif job is not None and job.kind == JobKind.PROVISION and job.status == JobStatus.FAILED:
            why = f"its job {job.pk} is a failed provision"
        elif latest is not None and latest.status == JobStatus.RUNNING and agent is not None:
            if agent.server_id:
                why = (
                    f"orphan duplicate: agent {agent.pk} runs on server {agent.server_id} "
                    f"(provision job {latest.pk})"
                )
            else:
                verdicts.append(
                    keep(
                        f"agent {agent.pk} is running but has no recorded server; "
                        "left for an operator"
                    )
                )
                continue
        if not why:
            verdicts.append(keep("nothing says it is orphaned"))
            continue
        age = _age(server, now)
        if age is None:
            verdicts.append(keep(f"would delete ({why}) but its creation time is unknown"))
            continue
        if age < grace:
            verdicts.append(
                keep(
                    f"would delete ({why}) but it is {int(age.total_seconds())}s old, "
                    f"inside the {int(grace.total_seconds())}s grace period"
                )
            )
            continue
        verdicts.append(Verdict(server.server_id, True, why, related))
    return verdicts


def reaper_judge(
    *, servers: Sequence[ManagedServer], actor: str, now: datetime | None = None
) -> list[Verdict]:
    """`reaper_verdicts`, plus one `note` JobEvent on the related job per delete verdict."""
    verdicts = reaper_verdicts(servers=servers, now=now)
    names = {s.server_id: s.name for s in servers}
    with transaction.atomic():
        for verdict in verdicts:
            if not verdict.delete or verdict.job is None:
                continue
            job = verdict.job
            name = names.get(verdict.server_id) or "?"
            JobEvent.objects.create(
                job=job,
                actor=actor[:150],
                action=JobEvent.Action.NOTE,
                attempt=job.attempt,
                reason=f"reaper deleting VM {verdict.server_id} ({name}): {verdict.reason}",
            )
    return verdicts
