"""The purchase flow: the dashboard's "Buy an agent" page, then Checkout; and "Manage subscription".

`agent_buy` takes a name and a region and sends the customer to Stripe Checkout, or, with
BILLING_LOCAL_CHECKOUT (`make run`, no Stripe account), to `LocalCheckoutView`, the local stand-in
whose "Pay (test mode)" does what Stripe would: it sends a signed `checkout.session.completed` to
our own webhook over HTTP, so the purchase goes through exactly the path a real one takes.

`agent_subscription` ("Manage subscription" on an agent's page) sends the agent's owner to Stripe's
Customer Portal, or under BILLING_LOCAL_CHECKOUT to `LocalPortalView`, whose "Cancel subscription"
sends a signed `customer.subscription.deleted` the same way: the agent ends through the webhook.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

import httpx
import stripe
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.decorators import login_required
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.template import TemplateDoesNotExist
from django.template.loader import get_template
from django.urls import reverse
from django.views import View
from django.views.decorators.http import require_http_methods, require_POST

from billing import sample_events, services
from billing.forms import AgentBuyForm
from provisioning import selectors as provisioning_selectors
from provisioning.models import Agent, Region

logger = logging.getLogger(__name__)

# The dashboard's list, told to confirm the payment ("payment received, being built").
AFTER_PAYMENT_URL = "/agents/?checkout=success"

PORTAL_UNAVAILABLE_MESSAGE = (
    "We could not open your subscription at our payment provider just now; nothing was changed. "
    "Please try again in a minute."
)
NO_SUBSCRIPTION_MESSAGE = (
    "This agent has no subscription we can open online. Please contact support to change it."
)

CHECKOUT_UNAVAILABLE_MESSAGE = (
    "We could not reach our payment provider just now, so nothing was charged. "
    "Please try again in a minute."
)


@login_required
@require_http_methods(["GET", "POST"])
def agent_buy(request: HttpRequest) -> HttpResponse:
    """Name and region, then off to Checkout (Stripe's, or the local stand-in under make run)."""
    form = AgentBuyForm(request.POST or None)
    status = 200
    if not isinstance(request.user, AbstractBaseUser):  # login_required let only users in
        raise PermissionDenied
    if request.method == "POST" and form.is_valid():
        try:
            checkout_url = services.checkout_session_create(
                user=request.user,
                agent_name=form.cleaned_data["name"],
                region=form.cleaned_data["region"],
                success_url=request.build_absolute_uri(
                    reverse("dashboard:agent-list") + "?checkout=success"
                ),
                cancel_url=request.build_absolute_uri(reverse("dashboard:agent-buy")),
            )
        except services.PurchaseInvalid as exc:
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
    return render(
        request, "billing/agent_buy.html", {"form": form, "price": price_label()}, status=status
    )


def price_label() -> str:
    """What an agent costs, for the buy page: the pinned price, or the stand-in's under make run.

    Empty when production has not pinned STRIPE_PRICE_AMOUNT (Checkout then shows the price).
    """
    if not (settings.STRIPE_PRICE_AMOUNT or settings.BILLING_LOCAL_CHECKOUT):
        return ""
    amount = sample_events.price_amount() / 100
    return f"{sample_events.price_currency().upper()} {amount:,.2f} per month"


def _base_template() -> str:
    try:
        get_template("base.html")
    except TemplateDoesNotExist:
        return "billing/standalone_base.html"
    return "base.html"


class LocalCheckoutView(LoginRequiredMixin, View):
    # The HTTP transport for the webhook call; None is a real socket (tests put the app here).
    transport: httpx.BaseTransport | None = None

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not settings.BILLING_LOCAL_CHECKOUT:
            raise Http404("local checkout is off")
        return super().dispatch(request, *args, **kwargs)

    def _order(self, data: Any) -> tuple[str, str] | None:
        try:
            return (
                services.agent_name_clean(data.get("agent_name")),
                services.region_clean(data.get("region")),
            )
        except services.PurchaseInvalid:
            return None

    def get(self, request: HttpRequest) -> HttpResponse:
        order = self._order(request.GET)
        if order is None:
            return HttpResponse("Invalid agent name or region.", status=400)
        agent_name, region = order
        return render(
            request,
            "billing/local_checkout.html",
            {
                "base_template": _base_template(),
                "agent_name": agent_name,
                "region": region,
                "region_label": Region(region).label,
                "amount": sample_events.price_amount() / 100,
                "currency": sample_events.price_currency().upper(),
            },
        )

    def post(self, request: HttpRequest) -> HttpResponse:
        order = self._order(request.POST)
        if order is None:
            return HttpResponse("Invalid agent name or region.", status=400)
        agent_name, region = order
        event = sample_events.build_checkout_event(
            "checkout.session.completed",
            user=request.user,
            agent_name=agent_name,
            region=region,
            livemode=False,
        )
        try:
            response = sample_events.post_event(event, transport=self.transport)
        except httpx.HTTPError as exc:
            logger.exception("local checkout: webhook unreachable")
            return HttpResponse(f"Could not reach the webhook: {exc}", status=502)
        if response.status_code != 200:
            logger.error("local checkout: webhook answered %s", response.status_code)
            return HttpResponse(
                f"The webhook refused the payment ({response.status_code}).", status=502
            )
        return HttpResponseRedirect(AFTER_PAYMENT_URL)


def _own_agent(request: HttpRequest, agent_id: UUID) -> Agent:
    """The logged-in customer's own agent; anyone else's is a 404 (never a 403)."""
    agent = provisioning_selectors.agent_get_for_user(user=request.user, agent_id=agent_id)
    if agent is None:
        raise Http404("No such agent.")
    return agent


@login_required
@require_POST
def agent_subscription(request: HttpRequest, agent_id: UUID) -> HttpResponse:
    """ "Manage subscription": a portal session for this agent's Stripe customer, then there."""
    agent = _own_agent(request, agent_id)
    back = reverse("dashboard:agent-detail", args=[agent.pk])
    try:
        url = services.portal_session_create(
            agent=agent, return_url=request.build_absolute_uri(back)
        )
    except services.PortalUnavailable:
        messages.error(request, NO_SUBSCRIPTION_MESSAGE)
        return redirect(back)
    except stripe.StripeError:
        logger.exception("portal session for agent %s could not be created", agent.pk)
        messages.error(request, PORTAL_UNAVAILABLE_MESSAGE)
        return redirect(back)
    return HttpResponseRedirect(url)


class LocalPortalView(LoginRequiredMixin, View):
    """The stand-in for Stripe's Customer Portal under make run: the subscription, and a button
    that cancels it the way Stripe would tell us (a signed `customer.subscription.deleted`)."""

    # The HTTP transport for the webhook call; None is a real socket (tests put the app here).
    transport: httpx.BaseTransport | None = None

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not settings.BILLING_LOCAL_CHECKOUT:
            raise Http404("local portal is off")
        return super().dispatch(request, *args, **kwargs)

    def get(self, request: HttpRequest, agent_id: UUID) -> HttpResponse:
        agent = _own_agent(request, agent_id)
        return render(
            request,
            "billing/local_portal.html",
            {
                "base_template": _base_template(),
                "agent": agent,
                "price": price_label(),
                "back_url": reverse("dashboard:agent-detail", args=[agent.pk]),
            },
        )

    def post(self, request: HttpRequest, agent_id: UUID) -> HttpResponse:
        agent = _own_agent(request, agent_id)
        back = reverse("dashboard:agent-detail", args=[agent.pk])
        if agent.is_ended:
            messages.info(request, "This subscription has already ended.")
            return redirect(back)
        for event in sample_events.build_ending_events(
            "customer.subscription.deleted", agent=agent
        ):
            try:
                response = sample_events.post_event(event, transport=self.transport)
            except httpx.HTTPError as exc:
                logger.exception("local portal: webhook unreachable")
                return HttpResponse(f"Could not reach the webhook: {exc}", status=502)
            if response.status_code != 200:
                logger.error("local portal: webhook answered %s", response.status_code)
                return HttpResponse(
                    f"The webhook refused the cancellation ({response.status_code}).", status=502
                )
        messages.success(request, "Subscription cancelled: your agent is being shut down.")
        return redirect(back)
