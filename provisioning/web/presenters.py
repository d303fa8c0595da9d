"""What a customer reads about an agent, worked out once for the dashboard and the customer API.

`agent_present(agent)` reads the agent's latest job (running the on-demand timeout check on a
silent provisioning job first) and returns it with its `AgentStatus`: the headline, the plain
sentence, the step rows and the flags (`is_active`, `is_final`, `can_reprovision`, ...) that the
templates and the API serializer read. Nothing outside this module compares job statuses; here
the job's own predicates (`job.is_queued`, `job.allows(state.RETRY)`, ...) decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from provisioning import eta, selectors, services, state
from provisioning.models import RUNNER_STEPS, Agent, JobStatus, ProvisioningJob, Step, step_message

ENDED = "ended"  # the state of an ended agent, whatever its last job did

STEP_STATE_TEXT = {"done": "done", "current": "in progress", "failed": "failed", "pending": ""}


@dataclass(frozen=True)
class StepRow:
    step: str
    label: str
    state: str  # done | current | failed | pending

    @property
    def state_text(self) -> str:
        return STEP_STATE_TEXT[self.state]


@dataclass(frozen=True)
class AgentStatus:
    """An agent's state in the dashboard's words.

    `state` names it for styling (`queued`, `provisioning`, `running`, `failed` or `ended`); what
    to show is decided by the flags, never by comparing `state`.
    """

    state: str
    headline: str
    sentence: str = ""
    progress: int | None = None
    queue_position: int | None = None  # while the latest job waits its turn: 1 = next to go
    estimated_ready_at: datetime | None = None  # while queued: when the agent should be ready
    retry_at: datetime | None = None  # in a retry's backoff: when it is tried again
    waiting_for_machine: bool = False  # dispatched: GitHub holds the run until a runner is free
    attempt: int | None = None
    retry_count: int = 0
    max_retries: int = 0
    ipv4: str | None = None  # only while the agent is running
    ended_at: datetime | None = None
    follow_up: str = ""  # what happens next, for a failed agent
    can_reprovision: bool = False
    steps: list[StepRow] = field(default_factory=list)
    is_queued: bool = False
    is_provisioning: bool = False
    is_running: bool = False
    is_failed: bool = False
    is_ended: bool = False

    @property
    def is_active(self) -> bool:
        """Still changing: the page keeps polling."""
        return self.is_queued or self.is_provisioning

    @property
    def is_final(self) -> bool:
        return not self.is_active

    @property
    def is_retrying(self) -> bool:
        return self.retry_count > 0


# ---------------------------------------------------------------------------------------------
# the latest job, checked


def latest_job_checked(agent: Agent) -> ProvisioningJob | None:
    """The agent's latest job (from the prefetched `jobs`, newest first), after the on-demand
    timeout check a read of a provisioning job runs.

    The cheap in-memory test comes first so an ordinary poll takes no row lock; the service
    re-checks under its lock and only then fails the job (retry or failed).
    """
    jobs = list(agent.jobs.all())
    job = jobs[0] if jobs else None
    if job is None or not job.is_provisioning:
        return job
    now = timezone.now()
    suspect = job.is_stale(
        now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS
    ) or job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS)
    if suspect:
        services.job_timeout_if_stale(job_id=job.pk, now=now)
        job = selectors.job_get(job_id=job.pk)
    return job


# ---------------------------------------------------------------------------------------------
# the presenter


def _step_rows(job: ProvisioningJob | None) -> list[StepRow]:
    """The runner's six steps, each done, current, failed or pending for this job."""
    steps = [str(s) for s in RUNNER_STEPS]
    labels = {str(s): s.label for s in RUNNER_STEPS}
    marks = dict.fromkeys(steps, "pending")
    if job is not None and job.is_running:
        marks = dict.fromkeys(steps, "done")
    elif job is not None:
        at, mark = "", ""
        if job.is_provisioning:
            at, mark = (job.step if job.step in steps else str(Step.CLAIM)), "current"
        elif job.is_failed:
            # A runner failure names its step; a timeout or cancel leaves the one it stopped in.
            at, mark = (job.failed_step if job.failed_step in steps else job.step), "failed"
        if at in steps:
            index = steps.index(at)
            marks.update(dict.fromkeys(steps[:index], "done"))
            marks[at] = mark
    return [StepRow(step=s, label=labels[s], state=marks[s]) for s in steps]


def _queued_sentence(job: ProvisioningJob) -> str:
    if job.retry_count:
        return (
            f"{step_message(job.failed_step, failed=True).rstrip('.')}, "
            "so we are trying again automatically."
        )
    if job.dispatched_at is not None:
        return WAITING_FOR_MACHINE
    return "Your order is in the queue: agents are built in the order they were paid for."


WAITING_FOR_MACHINE = "Waiting for a build machine."


def _queued(facts: AgentStatus, job: ProvisioningJob) -> AgentStatus:
    """A queued job's status: its place (waiting its turn), its retry time (in a retry's
    backoff) or waiting for a build machine (dispatched); and when it should be ready."""
    now = timezone.now()
    in_backoff = job.next_attempt_at is not None and job.next_attempt_at > now
    return replace(
        facts,
        state=JobStatus.QUEUED,
        headline="Queued",
        sentence=_queued_sentence(job),
        is_queued=True,
        queue_position=selectors.job_queue_position(job=job, now=now),
        estimated_ready_at=eta.estimated_ready_at(job=job, now=now),
        retry_at=job.next_attempt_at if in_backoff else None,
        waiting_for_machine=job.dispatched_at is not None,
    )


def _failed_follow_up(job: ProvisioningJob) -> str:
    if job.is_cancelled:
        return "Please contact support if you want it started again."
    return "Our team has been notified and we are on it. You can also try again now."


def agent_status(agent: Agent, job: ProvisioningJob | None) -> AgentStatus:
    """Everything the dashboard and the API's `message` say about an agent and its latest job."""
    facts = AgentStatus(
        state="",
        headline="",
        steps=_step_rows(job),
        attempt=job.attempt if job else None,
        retry_count=job.retry_count if job else 0,
        max_retries=job.max_retries if job else 0,
    )
    if agent.is_ended:
        reason = agent.end_reason.rstrip(".")
        return replace(
            facts,
            state=ENDED,
            headline="Ended",
            sentence=f"This agent has ended: {reason}." if reason else "This agent has ended.",
            ended_at=agent.ended_at,
            is_ended=True,
        )
    if job is None:
        # The purchase is recorded but its job is not (yet): nothing to show but patience.
        return replace(
            facts,
            state=JobStatus.QUEUED,
            headline="Queued",
            sentence="Your order is in; your agent will start building shortly.",
            is_queued=True,
        )
    if job.is_queued:
        return _queued(facts, job)
    if job.is_provisioning:
        return replace(
            facts,
            state=JobStatus.PROVISIONING,
            headline="Provisioning",
            sentence=step_message(job.step or Step.CLAIM, failed=False),
            progress=job.progress or 0,
            is_provisioning=True,
        )
    if job.is_running:
        return replace(
            facts,
            state=JobStatus.RUNNING,
            headline="Running",
            sentence="Your agent is up and running.",
            progress=100,
            ipv4=agent.ipv4,
            is_running=True,
        )
    # Failed: the plain-language reason for the step that failed; the raw error is for operators.
    return replace(
        facts,
        state=JobStatus.FAILED,
        headline="Failed",
        sentence=step_message(job.failed_step, failed=True),
        follow_up=_failed_follow_up(job),
        can_reprovision=job.allows(state.RETRY) and not job.is_cancelled,
        is_failed=True,
    )


def agent_present(agent: Agent) -> tuple[ProvisioningJob | None, AgentStatus]:
    """The agent's latest job (checked for a timeout) and what the customer reads about it."""
    job = latest_job_checked(agent)
    return job, agent_status(agent, job)
