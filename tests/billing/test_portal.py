""" "Manage subscription": a Stripe Customer Portal session for the agent's own Stripe customer
(Stripe faked at the wire), and the local stand-in portal whose "Cancel subscription" ends the
agent through the webhook, exactly as Stripe's `customer.subscription.deleted` would."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from django.test import Client
from django.urls import reverse

from billing.views import LocalPortalView
from provisioning.models import Agent, JobKind, JobStatus, ProvisioningJob
from tests.billing.conftest import DjangoClientTransport
from tests.factories import AgentFactory, JobFactory, UserFactory

pytestmark = pytest.mark.django_db

CUSTOMER = "cus_TPortalCustomer1"
SUBSCRIPTION = "sub_1SxPortalSubscription000"
PORTAL_URL = "https://billing.stripe.com/p/session/test_portal_1"


@pytest.fixture
def customer():
    return UserFactory(username="ada")


@pytest.fixture
def customer_client(customer):
    client = Client()
    client.force_login(customer)
    return client


@pytest.fixture
def agent(customer):
    agent = AgentFactory(
        owner=customer,
        name="helper",
        stripe_customer_id=CUSTOMER,
        stripe_subscription_id=SUBSCRIPTION,
    )
    JobFactory(agent=agent, status=JobStatus.RUNNING, stripe_event_id=f"evt_paid_{agent.pk}")
    return agent


@pytest.fixture
def local_portal(settings, monkeypatch):
    settings.BILLING_LOCAL_CHECKOUT = True
    # The stand-in calls the webhook over HTTP; here that HTTP goes to this app in-process.
    monkeypatch.setattr(LocalPortalView, "transport", DjangoClientTransport())


def manage(agent: Agent) -> str:
    return reverse("dashboard:agent-subscription", args=[agent.pk])


def deprovisions(agent: Agent) -> list[ProvisioningJob]:
    return list(ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION))


def test_the_agent_page_offers_manage_subscription(customer_client, agent):
    page = customer_client.get(reverse("dashboard:agent-detail", args=[agent.pk]))

    assert "Manage subscription" in page.content.decode()
    assert f'action="{manage(agent)}"' in page.content.decode()


def test_manage_creates_a_portal_session_for_the_agents_customer(
    customer_client, agent, stripe_http
):
    stripe_http.answer(
        "post",
        "/v1/billing_portal/sessions",
        {"id": "bps_1", "object": "billing_portal.session", "url": PORTAL_URL},
    )

    response = customer_client.post(manage(agent))

    assert response.status_code == 302
    assert response["Location"] == PORTAL_URL
    (call,) = stripe_http.calls
    sent = parse_qs(call.post_data)
    assert sent["customer"] == [CUSTOMER]
    assert sent["return_url"] == [f"http://testserver/agents/{agent.pk}/"]


def test_stripe_refusing_leaves_a_message_and_changes_nothing(customer_client, agent, stripe_http):
    response = customer_client.post(manage(agent), follow=True)

    assert response.redirect_chain[-1][0] == f"/agents/{agent.pk}/"
    assert "could not open your subscription" in response.content.decode()
    agent.refresh_from_db()
    assert not agent.is_ended


def test_another_customers_subscription_cannot_be_opened(agent, stripe_http):
    client = Client()
    client.force_login(UserFactory(username="eve"))

    assert client.post(manage(agent)).status_code == 404
    assert stripe_http.calls == []


def test_manage_is_post_only_and_needs_a_login(client, customer_client, agent, stripe_http):
    assert customer_client.get(manage(agent)).status_code == 405
    assert client.post(manage(agent)).url.startswith("/accounts/login/")
    assert stripe_http.calls == []


def test_an_agent_without_a_stripe_customer_gets_a_plain_message(customer, customer_client):
    agent = AgentFactory(owner=customer, stripe_customer_id="")

    response = customer_client.post(manage(agent), follow=True)

    assert "no subscription we can open online" in response.content.decode()


def test_locally_manage_goes_to_the_stand_in(local_portal, customer_client, agent, stripe_http):
    response = customer_client.post(manage(agent))

    assert response["Location"] == reverse("billing:local-portal", args=[agent.pk])
    page = customer_client.get(response["Location"]).content.decode()
    assert "Cancel subscription" in page
    assert "helper" in page
    assert stripe_http.calls == []


def test_cancelling_in_the_stand_in_ends_the_agent_through_the_webhook(
    local_portal, endpoint, customer_client, agent
):
    url = reverse("billing:local-portal", args=[agent.pk])

    response = customer_client.post(url, follow=True)

    assert response.redirect_chain[-1][0] == f"/agents/{agent.pk}/"
    agent.refresh_from_db()
    assert agent.is_ended
    assert agent.end_reason == "subscription cancelled"
    assert len(deprovisions(agent)) == 1
    page = response.content.decode()
    assert "Subscription cancelled" in page
    assert "Manage subscription" not in page  # nothing left to manage
    # A second cancel (another tab) sends nothing more.
    customer_client.post(url)
    assert len(deprovisions(agent)) == 1


def test_the_stand_in_shows_only_the_customers_own_subscription(local_portal, endpoint, agent):
    client = Client()
    client.force_login(UserFactory(username="eve"))
    url = reverse("billing:local-portal", args=[agent.pk])

    assert client.get(url).status_code == 404
    assert client.post(url).status_code == 404
    agent.refresh_from_db()
    assert not agent.is_ended


def test_the_stand_in_does_not_exist_without_local_checkout(customer_client, agent):
    url = reverse("billing:local-portal", args=[agent.pk])

    assert customer_client.get(url).status_code == 404
