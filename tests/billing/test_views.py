"""The purchase pages: the dashboard's buy form, and the local stand-in checkout page that pays by
sending a signed event to our own webhook."""

from __future__ import annotations

import socket
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.urls import reverse

from billing.views import LocalCheckoutView
from provisioning.models import Agent
from tests.billing.conftest import DjangoClientTransport
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

URL = "/billing/local-checkout/"


@pytest.fixture
def local_checkout(settings, monkeypatch):
    settings.BILLING_LOCAL_CHECKOUT = True
    # The page calls the webhook over HTTP; here that HTTP goes to this app in-process.
    monkeypatch.setattr(LocalCheckoutView, "transport", DjangoClientTransport())


@pytest.fixture
def customer_client():
    client = Client()
    client.force_login(UserFactory(username="ada"))
    return client


def test_the_page_shows_the_order_and_a_test_mode_pay_button(local_checkout, customer_client):
    response = customer_client.get(URL, {"agent_name": "helper", "region": "eu-central"})

    assert response.status_code == 200
    page = response.content.decode()
    assert "Pay (test mode)" in page
    assert "helper" in page
    assert "csrfmiddlewaretoken" in page


def test_paying_sends_a_signed_event_and_the_agent_appears(local_checkout, endpoint):
    user = UserFactory(username="ada")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    page = client.get(URL, {"agent_name": "helper", "region": "eu-central"})
    token = page.context["csrf_token"]

    response = client.post(
        URL, {"agent_name": "helper", "region": "eu-central", "csrfmiddlewaretoken": str(token)}
    )

    assert response.status_code == 302
    assert response["Location"] == "/agents/?checkout=success"
    agent = Agent.objects.get()
    assert (agent.owner, agent.name, agent.region) == (user, "helper", "eu-central")
    assert agent.jobs.count() == 1


def test_paying_without_a_csrf_token_is_refused(local_checkout, endpoint):
    client = Client(enforce_csrf_checks=True)
    client.force_login(UserFactory(username="ada"))

    response = client.post(URL, {"agent_name": "helper", "region": "eu-central"})

    assert response.status_code == 403
    assert Agent.objects.count() == 0


def test_the_page_needs_a_login(local_checkout, client):
    response = client.get(URL, {"agent_name": "helper", "region": "us-east"})

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_the_page_does_not_exist_without_local_checkout(customer_client, settings):
    settings.BILLING_LOCAL_CHECKOUT = False

    assert customer_client.get(URL, {"agent_name": "a", "region": "us-east"}).status_code == 404


def test_a_bad_order_is_refused(local_checkout, customer_client):
    response = customer_client.get(URL, {"agent_name": "", "region": "mars"})

    assert response.status_code == 400


# --- the dashboard's buy form (dashboard:agent-buy, billing.views.agent_buy) -----------------


def test_the_buy_form_renders_with_every_region(customer_client):
    page = customer_client.get("/agents/buy/").content.decode()

    assert 'name="csrfmiddlewaretoken"' in page
    for value in ("us-east", "us-west", "eu-central", "ap-southeast"):
        assert f'value="{value}"' in page


@pytest.mark.parametrize(
    ("name", "region", "field", "message"),
    [
        ("", "us-east", "name", "This field is required."),
        ("   ", "us-east", "name", "This field is required."),
        ("x" * 65, "us-east", "name", "at most 64 characters"),
        ("my<agent>", "us-east", "name", "Use letters, digits, spaces"),
        ("drop; table", "us-east", "name", "Use letters, digits, spaces"),
        ("good-name", "mars-north", "region", "Select a valid choice."),
    ],
)
def test_the_buy_form_explains_what_is_wrong(
    customer_client, settings, name, region, field, message
):
    settings.BILLING_LOCAL_CHECKOUT = True

    response = customer_client.post("/agents/buy/", {"name": name, "region": region})

    assert response.status_code == 200
    assert any(message in error for error in response.context["form"].errors[field])
    assert Agent.objects.count() == 0


def test_buying_redirects_to_the_checkout_billing_returns(customer_client, settings):
    settings.BILLING_LOCAL_CHECKOUT = True

    response = customer_client.post(
        "/agents/buy/", {"name": "Research helper_2", "region": "eu-central"}
    )

    assert response.status_code == 302
    expected = urlencode({"agent_name": "Research helper_2", "region": "eu-central"})
    assert response.url == f"/billing/local-checkout/?{expected}"


def test_buying_while_stripe_is_unreachable_shows_a_friendly_error(customer_client, settings):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings.BILLING_LOCAL_CHECKOUT = False
    settings.STRIPE_SECRET_KEY = "sk_test_dashboard_unreachable"
    settings.STRIPE_TEST_SECRET_KEY = "sk_test_dashboard_unreachable"
    settings.STRIPE_API_BASE = f"http://127.0.0.1:{closed_port}"

    response = customer_client.post("/agents/buy/", {"name": "helper", "region": "us-east"})

    assert response.status_code == 503
    assert "We could not reach our payment provider just now" in response.content.decode()
    assert 'value="helper"' in response.content.decode()


def test_the_buy_page_shows_the_price_and_the_return_confirms_the_payment(db, client, settings):
    settings.STRIPE_PRICE_AMOUNT = 2900
    settings.STRIPE_PRICE_CURRENCY = "eur"
    client.force_login(UserFactory())

    buy = client.get(reverse("dashboard:agent-buy")).content.decode()
    back = client.get(reverse("dashboard:agent-list") + "?checkout=success").content.decode()
    plain = client.get(reverse("dashboard:agent-list")).content.decode()

    assert "EUR 29.00 per month" in buy
    assert "Payment received: your agent is being built." in back
    assert "Payment received" not in plain
