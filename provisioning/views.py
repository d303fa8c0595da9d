"""The customer dashboard: my agents, one agent (live over htmx), buy an agent, re-provision.

Every view reads through selectors scoped to the signed-in customer (someone else's agent is a
404, never a 403 that would confirm it exists) and writes through services. What a customer reads
about a job is worked out once, in `agent_status()`, and rendered by one partial that both pages
include and the htmx poll re-renders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import stripe
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from billing import services as billing_services
from provisioning import selectors, services
from provisioning.errors import AgentEnded, InvalidTransition, ProvisionInProgress
from provisioning.forms import AgentBuyForm
from provisioning.models import (
    RUNNER_STEPS,
    Agent,
    JobStatus,
    ProvisioningJob,
    Step,
    step_message,
)

logger = logging.getLogger(__name__)


def poll_seconds() -> int:
    """How often the htmx partial is polled while a job is queued or provisioning."""
    return int(getattr(settings, "DASHBOARD_POLL_SECONDS", 3))


CHECKOUT_UNAVAILABLE_MESSAGE = (
    "We could not reach our payment provider just now, so nothing was charged. "
    "Please try again in a minute."
)


# ---------------------------------------------------------------------------------------------
# what the customer reads about an agent


@dataclass(frozen=True)
class StepRow:
    step: str
    label: str
    state: str  # done | current | failed | pending

    @property
    def state_text(self) -> str:
        return STEP_STATE_TEXT[self.state]


STEP_STATE_TEXT = {"done": "done", "current": "in progress", "failed": "failed", "pending": ""}


@dataclass(frozen=True)
class AgentStatus:
    """An agent's state in the dashboard's words. `state` is one of STATES."""

    state: str
    headline: str
    sentence: str = ""
    progress: int | None = None
    queue_position: int | None = None
    attempt: int | None = None
    retry_count: int = 0
    max_retries: int = 0
    ipv4: str | None = None
    ended_at: datetime | None = None
    follow_up: str = ""  # what happens next, for a failed agent
    can_reprovision: bool = False
    steps: list[StepRow] = field(default_factory=list)

    STATES = ("queued", "provisioning", "running", "failed", "ended")

    @property
    def is_active(self) -> bool:
        """Still changing: the page keeps polling."""
        return self.state in ("queued", "provisioning")

    @property
    def is_retrying(self) -> bool:
        return self.retry_count > 0


def _step_rows(job: ProvisioningJob | None) -> list[StepRow]:
    """The runner's six steps, each done, current, failed or pending for this job."""
    steps = [str(s) for s in RUNNER_STEPS]
    labels = {str(s): s.label for s in RUNNER_STEPS}
    marks = dict.fromkeys(steps, "pending")
    if job is not None:
        if job.status == JobStatus.RUNNING:
            marks = dict.fromkeys(steps, "done")
        else:
            at, mark = "", ""
            if job.status == JobStatus.PROVISIONING:
                at, mark = (job.step if job.step in steps else str(Step.CLAIM)), "current"
            elif job.status == JobStatus.FAILED:
                # A runner failure names its step; a timeout or cancel leaves the one it stopped in.
                at, mark = (job.failed_step if job.failed_step in steps else job.step), "failed"
            if at in steps:
                index = steps.index(at)
                marks.update(dict.fromkeys(steps[:index], "done"))
                marks[at] = mark
    return [StepRow(step=s, label=labels[s], state=marks[s]) for s in steps]


def agent_status(agent: Agent, job: ProvisioningJob | None) -> AgentStatus:
    """Everything the dashboard says about one agent, from the agent and its latest job."""
    steps = _step_rows(job)
    retries = {
        "attempt": job.attempt if job else None,
        "retry_count": job.retry_count if job else 0,
        "max_retries": job.max_retries if job else 0,
    }
    if agent.is_ended:
        return AgentStatus(
            state="ended",
            headline="Ended",
            sentence=(
                f"This agent has ended: {agent.end_reason.rstrip('.')}."
                if agent.end_reason
                else "This agent has ended."
            ),
            ended_at=agent.ended_at,
            steps=steps,
            **retries,
        )
    if job is None:
        # The purchase is recorded but its job is not (yet): nothing to show but patience.
        return AgentStatus(
            state="queued",
            headline="Queued",
            sentence="Your order is in; your agent will start building shortly.",
            steps=steps,
        )
    if job.status == JobStatus.QUEUED:
        if job.retry_count:
            sentence = (
                f"The last attempt did not finish ({step_message(job.failed_step, failed=True)}) "
                "We are trying again automatically."
            )
        else:
            sentence = "Waiting for a build machine."
        return AgentStatus(
            state="queued",
            headline="Queued",
            sentence=sentence,
            queue_position=selectors.job_queue_position(job=job),
            steps=steps,
            **retries,
        )
    if job.status == JobStatus.PROVISIONING:
        return AgentStatus(
            state="provisioning",
            headline="Provisioning",
            sentence=step_message(job.step or Step.CLAIM, failed=False),
            progress=job.progress or 0,
            steps=steps,
            **retries,
        )
    if job.status == JobStatus.RUNNING:
        return AgentStatus(
            state="running",
            headline="Running",
            sentence="Your agent is up and running.",
            progress=100,
            ipv4=agent.ipv4,
            steps=steps,
            **retries,
        )
    # FAILED: the plain-language reason for the step that failed; the raw error is for operators.
    return AgentStatus(
        state="failed",
        headline="Failed",
        sentence=step_message(job.failed_step, failed=True),
        follow_up=(
            "If you did not expect this, you can start the build again below."
            if job.failed_step == Step.CANCELLED
            else "Our team has been notified and we are on it. You can also try again now."
        ),
        can_reprovision=True,
        steps=steps,
        **retries,
    )


def _latest_job_checked(agent: Agent, job: ProvisioningJob | None) -> ProvisioningJob | None:
    """The seed's on-demand timeout check, run when a customer reads a provisioning job.

    The cheap in-memory test comes first so an ordinary poll takes no row lock; the service
    re-checks under its lock and only then fails the job (retry or failed).
    """
    if job is None or job.status != JobStatus.PROVISIONING:
        return job
    now = timezone.now()
    suspect = job.is_stale(
        now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS
    ) or job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS)
    if suspect and services.job_timeout_if_stale(job_id=job.pk, now=now):
        return selectors.job_get_latest_for_agent(agent_id=agent.pk)
    return job


def _own_agent(request: HttpRequest, agent_id: UUID) -> Agent:
    agent = selectors.agent_get_for_user(user=request.user, agent_id=agent_id)
    if agent is None:
        raise Http404("No such agent.")
    return agent


def _agent_context(agent: Agent) -> dict[str, object]:
    job = selectors.job_get_latest_for_agent(agent_id=agent.pk)
    job = _latest_job_checked(agent, job)
    return {"agent": agent, "job": job, "status": agent_status(agent, job)}


# ---------------------------------------------------------------------------------------------
# pages


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return redirect("dashboard:agent-list")


@login_required
@require_GET
def agent_list(request: HttpRequest) -> HttpResponse:
    rows = []
    for agent in selectors.agent_list_for_user(user=request.user):
        jobs = list(agent.jobs.all())  # prefetched, newest first
        job = _latest_job_checked(agent, jobs[0] if jobs else None)
        rows.append({"agent": agent, "job": job, "status": agent_status(agent, job)})
    return render(
        request,
        "provisioning/agent_list.html",
        {"rows": rows, "poll_seconds": poll_seconds()},
    )


@login_required
@require_GET
def agent_detail(request: HttpRequest, agent_id: UUID) -> HttpResponse:
    agent = _own_agent(request, agent_id)
    context = _agent_context(agent) | {"poll_seconds": poll_seconds(), "compact": False}
    return render(request, "provisioning/agent_detail.html", context)


@login_required
@require_GET
def agent_status_partial(request: HttpRequest, agent_id: UUID) -> HttpResponse:
    """The htmx poll target: the status block alone. Stops polling once the state is final
    (the returned block carries no trigger)."""
    agent = _own_agent(request, agent_id)
    compact = request.GET.get("compact") == "1"
    context = _agent_context(agent) | {"poll_seconds": poll_seconds(), "compact": compact}
    return render(request, "provisioning/_agent_status.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def agent_buy(request: HttpRequest) -> HttpResponse:
    """Name and region, then off to Checkout (Stripe's, or the local stand-in under make run)."""
    form = AgentBuyForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        try:
            checkout_url = billing_services.checkout_session_create(
                user=request.user,
                agent_name=form.cleaned_data["name"],
                region=form.cleaned_data["region"],
                success_url=request.build_absolute_uri(reverse("dashboard:agent-list")),
                cancel_url=request.build_absolute_uri(reverse("dashboard:agent-buy")),
            )
        except billing_services.PurchaseInvalid as exc:
            # The form and billing disagree about a name or region: the customer can fix it.
            form.add_error(None, str(exc))
            status = 400
        except stripe.StripeError:
            # Stripe unreachable or refusing: say so plainly and keep what they typed.
            logger.exception("checkout session for user %s could not be created", request.user.pk)
            form.add_error(None, CHECKOUT_UNAVAILABLE_MESSAGE)
            status = 503
        else:
            return HttpResponseRedirect(checkout_url)
    return render(request, "provisioning/agent_buy.html", {"form": form}, status=status)


@login_required
@require_POST
def agent_reprovision(request: HttpRequest, agent_id: UUID) -> HttpResponse:
    agent = _own_agent(request, agent_id)
    try:
        services.job_reprovision(agent=agent)
    except (ProvisionInProgress, AgentEnded) as exc:
        messages.error(request, exc.message)
    except InvalidTransition:
        messages.info(request, "Only an agent whose build failed can be re-provisioned.")
    else:
        messages.success(request, "We are building your agent again. Follow its progress here.")
    return redirect("dashboard:agent-detail", agent_id=agent.pk)
