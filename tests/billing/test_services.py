from __future__ import annotations

from urllib.parse import parse_qs

import pytest
import stripe

from billing import services
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _checkout(**overrides):
    kwargs = {
        "user": UserFactory(username="ada"),
        "agent_name": "helper",
        "region": "us-west",
        "success_url": "http://testserver/agents/",
        "cancel_url": "http://testserver/agents/new/",
    }
    kwargs.update(overrides)
    return services.checkout_session_create(**kwargs)


def test_checkout_creates_a_subscription_session_carrying_our_references(stripe_http):
    stripe_http.answer(
        "post",
        "/v1/checkout/sessions",
        {"id": "cs_test_1", "object": "checkout.session", "url": "https://checkout.stripe.com/c/1"},
    )
    user = UserFactory(username="ada")

    url = _checkout(user=user)

    assert url == "https://checkout.stripe.com/c/1"
    (call,) = stripe_http.calls
    sent = parse_qs(call.post_data)
    assert sent["mode"] == ["subscription"]
    assert sent["client_reference_id"] == [str(user.pk)]
    assert sent["line_items[0][price]"] == ["price_1SxTestPrice000000000000"]
    assert sent["metadata[agent_name]"] == ["helper"]
    assert sent["metadata[region]"] == ["us-west"]
    assert sent["subscription_data[metadata][agent_name]"] == ["helper"]
    # Webhook payloads carry no line items: the session's metadata names the price for the check.
    assert sent["metadata[price_id]"] == ["price_1SxTestPrice000000000000"]


def test_checkout_surfaces_stripe_being_unreachable(stripe_http):
    with pytest.raises(stripe.APIConnectionError):
        _checkout()


def test_local_checkout_sends_the_customer_to_the_stand_in_page(settings, stripe_http):
    settings.BILLING_LOCAL_CHECKOUT = True

    url = _checkout(agent_name=" helper ")

    assert url == "/billing/local-checkout/?agent_name=helper&region=us-west"
    assert stripe_http.calls == []


def test_checkout_refuses_a_bad_name_before_calling_stripe(stripe_http):
    with pytest.raises(services.PurchaseInvalid):
        _checkout(agent_name="x" * 65)
    assert stripe_http.calls == []
