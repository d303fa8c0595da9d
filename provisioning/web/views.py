"""The customer dashboard: my agents, one agent (live over htmx), re-provision.

Every view reads through selectors scoped to the signed-in customer (someone else's agent is a
404, never a 403 that would confirm it exists) and writes through services. What a customer reads
about a job is worked out once, by the presenter (presenters.py), and rendered by one partial
that both pages include and the htmx poll re-renders. Buying lives in billing (billing/views.py).
"""

from __future__ import annotations

from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from provisioning import selectors, services
from provisioning.errors import (
    AgentEnded,
    CancelledByOurTeam,
    InvalidTransition,
    ProvisionInProgress,
    ReprovisionLimited,
)
from provisioning.models import Agent
from provisioning.web.presenters import agent_present


def _own_agent(request: HttpRequest, agent_id: UUID) -> Agent:
    agent = selectors.agent_get_for_user(user=request.user, agent_id=agent_id)
    if agent is None:
        raise Http404("No such agent.")
    return agent


def _agent_context(agent: Agent) -> dict[str, object]:
    job, status = agent_present(agent)
    return {"agent": agent, "job": job, "status": status}


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return redirect("dashboard:agent-list")


@login_required
@require_GET
def agent_list(request: HttpRequest) -> HttpResponse:
    if request.GET.get("checkout") == "success":  # back from Checkout (Stripe's or the stand-in)
        messages.success(
            request,
            "Payment received: your agent is being built. It appears below and updates by itself.",
        )
    rows = [_agent_context(a) for a in selectors.agent_list_for_user(user=request.user)]
    return render(
        request,
        "provisioning/agent_list.html",
        {"rows": rows, "poll_seconds": settings.DASHBOARD_POLL_SECONDS},
    )


@login_required
@require_GET
def agent_detail(request: HttpRequest, agent_id: UUID) -> HttpResponse:
    agent = _own_agent(request, agent_id)
    context = _agent_context(agent) | {
        "poll_seconds": settings.DASHBOARD_POLL_SECONDS,
        "compact": False,
    }
    return render(request, "provisioning/agent_detail.html", context)


@login_required
@require_GET
def agent_status_partial(request: HttpRequest, agent_id: UUID) -> HttpResponse:
    """The htmx poll target: the status block alone. Stops polling once the state is final
    (the returned block carries no trigger)."""
    agent = _own_agent(request, agent_id)
    compact = request.GET.get("compact") == "1"
    context = _agent_context(agent) | {
        "poll_seconds": settings.DASHBOARD_POLL_SECONDS,
        "compact": compact,
    }
    return render(request, "provisioning/_agent_status.html", context)


@login_required
@require_POST
def agent_reprovision(request: HttpRequest, agent_id: UUID) -> HttpResponse:
    agent = _own_agent(request, agent_id)
    try:
        services.job_reprovision(agent=agent)
    except (ProvisionInProgress, AgentEnded, CancelledByOurTeam, ReprovisionLimited) as exc:
        messages.error(request, exc.message)
    except InvalidTransition:
        messages.info(request, "Only an agent whose build failed can be re-provisioned.")
    else:
        messages.success(request, "We are building your agent again. Follow its progress here.")
    return redirect("dashboard:agent-detail", agent_id=agent.pk)
