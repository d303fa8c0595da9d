"""The reaper's verdicts: given the VMs the scheduled workflow found labelled as ours, which may go.

The workflow lists every Hetzner server labelled `managed-by=agent-provisioning` and sends each
one's id, name, `job-id` and `agent-id` labels and creation time; `reaper_verdicts` judges each
against the database with one function per rule below (`RULES`, in this order), and
`reaper_judge` also records the deletions on the related jobs. The workflow deletes exactly the
servers answered under `delete`.

Rules, in the order they are applied (the first that matches decides):

Never deleted (checked first, whatever else is true):
  1. the current VM of a non-ended agent (some agent's `server_id` equals the server id,
     whatever the server's labels say);
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from provisioning.models import Agent, JobEvent, JobKind, ProvisioningJob


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
    return timedelta(seconds=settings.REAPER_GRACE_SECONDS)


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


@dataclass(frozen=True)
class Facts:
    """What the database knows about one server, as its rules read it."""

    server: ManagedServer
    job: ProvisioningJob | None  # the job its `job-id` label names
    labelled_agent: Agent | None  # the agent its `agent-id` label names
    agent: Agent | None  # the labelled agent, else its job's agent
    related: ProvisioningJob | None  # its job, else the agent's latest job (for the audit note)
    latest: ProvisioningJob | None  # the agent's latest provision job
    # The non-ended agent whose current server this is, found by the server id alone: labels
    # are whatever the run reported and may be missing or wrong.
    serving: Agent | None = None


@dataclass(frozen=True)
class Decision:
    """What a rule says: delete (after the grace period) or keep, and why."""

    delete: bool
    reason: str


def _keep(reason: str) -> Decision:
    return Decision(False, reason)


def _delete(reason: str) -> Decision:
    return Decision(True, reason)


def _agent_alive(facts: Facts) -> Agent | None:
    agent = facts.agent
    return agent if agent is not None and not agent.is_ended else None


# --- never deleted ---------------------------------------------------------------------------


def rule_current_vm(facts: Facts) -> Decision | None:
    """1. The current VM of a non-ended agent, whatever its labels say."""
    if facts.serving is not None:
        return _keep(f"current VM of agent {facts.serving.pk}")
    return None


def rule_job_active(facts: Facts) -> Decision | None:
    """2. A VM whose job is queued or provisioning."""
    job = facts.job
    if job is not None and job.is_active:
        return _keep(f"its job {job.pk} is {job.status}")
    return None


def rule_rebuild_under_way(facts: Facts) -> Decision | None:
    """3. A VM of an agent whose latest provision job is queued or provisioning."""
    agent, latest = _agent_alive(facts), facts.latest
    if agent is not None and latest is not None and latest.is_active:
        return _keep(f"agent {agent.pk} has provision job {latest.pk} {latest.status}")
    return None


def rule_labels_disagree(facts: Facts) -> Decision | None:
    """4. A VM whose job belongs to another agent than its label says."""
    job, labelled = facts.job, facts.labelled_agent
    if job is not None and labelled is not None and job.agent_id != labelled.pk:
        return _keep(
            f"labels disagree: job {job.pk} belongs to agent {job.agent_id}, "
            f"not {labelled.pk}; left for an operator"
        )
    return None


# --- deleted, once older than the grace period -----------------------------------------------


def rule_unknown(facts: Facts) -> Decision | None:
    """5. No job and no agent in the database knows it."""
    if facts.job is None and facts.agent is None:
        return _delete("no job or agent in the database knows it")
    return None


def rule_agent_ended(facts: Facts) -> Decision | None:
    """6. Its agent has ended."""
    agent = facts.agent
    if agent is not None and agent.is_ended:
        return _delete(f"agent {agent.pk} ended ({agent.end_reason or 'no reason recorded'})")
    return None


def rule_failed_provision(facts: Facts) -> Decision | None:
    """7. Its job is a failed provision."""
    job = facts.job
    if job is not None and not job.is_deprovision and job.is_failed:
        return _delete(f"its job {job.pk} is a failed provision")
    return None


def rule_orphan_duplicate(facts: Facts) -> Decision | None:
    """8. The agent's latest provision is running and its current VM is another server (an agent
    running with no recorded server is left for an operator)."""
    agent, latest = facts.agent, facts.latest
    if latest is None or agent is None or not latest.is_running:
        return None
    if not agent.server_id:
        return _keep(
            f"agent {agent.pk} is running but has no recorded server; left for an operator"
        )
    return _delete(
        f"orphan duplicate: agent {agent.pk} runs on server {agent.server_id} "
        f"(provision job {latest.pk})"
    )


# The rules in the order they are applied: the first that says something decides.
RULES: tuple[Callable[[Facts], Decision | None], ...] = (
    rule_current_vm,
    rule_job_active,
    rule_rebuild_under_way,
    rule_labels_disagree,
    rule_unknown,
    rule_agent_ended,
    rule_failed_provision,
    rule_orphan_duplicate,
)


def decide(facts: Facts) -> Decision:
    """The first rule's decision; kept when no rule says anything."""
    for rule in RULES:
        decision = rule(facts)
        if decision is not None:
            return decision
    return _keep("nothing says it is orphaned")


def _verdict(facts: Facts, *, now: datetime, grace: timedelta) -> Verdict:
    """A delete decision stands only for a VM known to be older than the grace period."""
    server_id, related = facts.server.server_id, facts.related
    decision = decide(facts)
    if not decision.delete:
        return Verdict(server_id, False, decision.reason, related)
    why = decision.reason
    age = _age(facts.server, now)
    if age is None:
        return Verdict(
            server_id, False, f"would delete ({why}) but its creation time is unknown", related
        )
    if age < grace:
        return Verdict(
            server_id,
            False,
            f"would delete ({why}) but it is {int(age.total_seconds())}s old, "
            f"inside the {int(grace.total_seconds())}s grace period",
            related,
        )
    return Verdict(server_id, True, why, related)


def _distinct(servers: Sequence[ManagedServer]) -> list[ManagedServer]:
    """A server sent twice is judged once, by its first description."""
    unique: list[ManagedServer] = []
    seen: set[str] = set()
    for server in servers:
        if server.server_id not in seen:
            seen.add(server.server_id)
            unique.append(server)
    return unique


def _facts(servers: list[ManagedServer]) -> list[Facts]:
    """Each server's facts, in a fixed handful of queries whatever the number of servers."""
    job_ids = {u for s in servers if (u := _uuid(s.job_id))}
    jobs = {j.pk: j for j in ProvisioningJob.objects.filter(pk__in=job_ids)}
    agent_ids = {u for s in servers if (u := _uuid(s.agent_id))} | {
        j.agent_id for j in jobs.values()
    }
    agents = {a.pk: a for a in Agent.objects.filter(pk__in=agent_ids)}
    latest_provision = _latest_provisions(agents)
    latest_any = _latest_any(agents)
    serving = {
        a.server_id: a
        for a in Agent.objects.filter(
            server_id__in={s.server_id for s in servers if s.server_id}, ended_at__isnull=True
        )
    }
    facts = []
    for server in servers:
        job = _by_label(jobs, server.job_id)
        labelled_agent = _by_label(agents, server.agent_id)
        agent = labelled_agent or (agents.get(job.agent_id) if job else None)
        facts.append(
            Facts(
                server=server,
                job=job,
                labelled_agent=labelled_agent,
                agent=agent,
                related=job or (latest_any.get(agent.pk) if agent else None),
                latest=latest_provision.get(agent.pk) if agent else None,
                serving=serving.get(server.server_id),
            )
        )
    return facts


def reaper_verdicts(
    *, servers: Sequence[ManagedServer], now: datetime | None = None
) -> list[Verdict]:
    """One verdict per distinct server id, in the order first given. Reads only."""
    now = now or timezone.now()
    grace = grace_period()
    return [_verdict(f, now=now, grace=grace) for f in _facts(_distinct(servers))]


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
                # The server id and name are as the run reported them: quoted, and said so.
                reason=(
                    f"reaper deleting VM {verdict.server_id!r} "
                    f"(name reported by the run: {name[:64]!r}): {verdict.reason}"
                ),
            )
    return verdicts
