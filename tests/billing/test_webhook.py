"""A paid Checkout session, delivered as Stripe does (signed, through dj-stripe's real URL),
becomes exactly one agent and one job; anything forged or garbled gets nothing."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.db import OperationalError
from djstripe.models import Event, WebhookEventTrigger

from billing import services
from billing.models import UnfulfillablePayment, UnfulfillableReason
from provisioning.models import Agent, JobStatus, ProvisioningJob
from tests.billing.conftest import load_event, new_session_id
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def customer() -> Any:
    return UserFactory(username="ada")


def test_a_paid_checkout_becomes_one_agent_and_one_job_dispatched_after_commit(
    deliver, customer, settings, monkeypatch, backend, django_capture_on_commit_callbacks
):
    settings.DISPATCH_ON_COMMIT = True
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)
    event = load_event("checkout.session.completed__paid", user=customer)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = deliver(event)

    assert response.status_code == 200
    agent = Agent.objects.get()
    session = event["data"]["object"]
    assert (agent.owner, agent.name, agent.region) == (customer, "research-bot", "eu-central")
    assert agent.stripe_checkout_session_id == session["id"]
    assert agent.stripe_customer_id == session["customer"]
    assert agent.stripe_subscription_id == session["subscription"]
    job = ProvisioningJob.objects.get()
    assert (job.agent, job.stripe_event_id, job.attempt) == (agent, event["id"], 1)
    assert len(callbacks) >= 1
    assert [(jid, mode) for jid, _attempt, mode, _run in backend.dispatched] == [
        (str(job.pk), "provision")
    ]


def test_nothing_is_dispatched_before_the_webhook_transaction_commits(
    deliver, customer, settings, monkeypatch, backend, django_capture_on_commit_callbacks
):
    settings.DISPATCH_ON_COMMIT = True
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        deliver(load_event("checkout.session.completed__paid", user=customer))

    assert callbacks
    assert backend.dispatched == []
    assert ProvisioningJob.objects.get().status == JobStatus.QUEUED


def test_a_redelivered_event_creates_nothing_new(deliver, customer):
    event = load_event("checkout.session.completed__paid", user=customer)
    assert deliver(event).status_code == 200

    response = deliver(event)

    assert response.status_code == 200
    assert Agent.objects.count() == 1
    assert ProvisioningJob.objects.count() == 1
    assert Event.objects.filter(id=event["id"]).count() == 1


@pytest.mark.parametrize(
    "first",
    ["checkout.session.completed__paid", "checkout.session.async_payment_succeeded__paid"],
)
def test_completed_and_async_succeeded_for_one_session_make_one_agent_in_either_order(
    deliver, customer, first
):
    second = (
        "checkout.session.async_payment_succeeded__paid"
        if first.startswith("checkout.session.completed")
        else "checkout.session.completed__paid"
    )
    session_id = new_session_id()
    deliver(load_event(first, user=customer, session_id=session_id))

    response = deliver(load_event(second, user=customer, session_id=session_id))

    assert response.status_code == 200
    agent = Agent.objects.get()
    assert agent.stripe_checkout_session_id == session_id
    assert ProvisioningJob.objects.filter(agent=agent).count() == 1


def test_an_unpaid_completed_creates_nothing_until_the_async_payment_succeeds(deliver, customer):
    session_id = new_session_id()
    unpaid = load_event("checkout.session.completed__unpaid", user=customer, session_id=session_id)

    assert deliver(unpaid).status_code == 200
    assert Agent.objects.count() == 0
    assert UnfulfillablePayment.objects.count() == 0

    succeeded = load_event(
        "checkout.session.async_payment_succeeded__paid", user=customer, session_id=session_id
    )
    assert deliver(succeeded).status_code == 200
    job = ProvisioningJob.objects.get()
    assert job.stripe_event_id == succeeded["id"]
    assert job.agent.stripe_checkout_session_id == session_id


def test_a_second_purchase_by_the_same_customer_is_a_second_agent_queued(deliver, customer):
    deliver(load_event("checkout.session.completed__paid", user=customer))

    deliver(load_event("checkout.session.completed__paid", user=customer, session_id="cs_test_2"))

    assert Agent.objects.filter(owner=customer).count() == 2
    assert ProvisioningJob.objects.filter(user=customer, status=JobStatus.QUEUED).count() == 2


def test_a_paid_order_is_fulfilled_while_every_stripe_api_call_is_refused(
    deliver, customer, stripe_http
):
    response = deliver(load_event("checkout.session.completed__paid", user=customer))

    assert response.status_code == 200
    assert ProvisioningJob.objects.count() == 1
    assert stripe_http.calls == []  # nothing was even attempted


def test_without_the_recorded_account_dj_stripe_would_call_stripe_and_fail(
    client, endpoint, customer, stripe_http
):
    # The control for the test above: dj-stripe's first event for a key fetches the account.
    from djstripe.models import APIKey

    endpoint.djstripe_owner_account = None
    endpoint.save()
    APIKey.objects.all().delete()
    from tests.billing.conftest import deliver_with

    client.raise_request_exception = False
    response = deliver_with(client)(load_event("checkout.session.completed__paid", user=customer))

    assert response.status_code == 500
    assert [c.path for c in stripe_http.calls] == ["/v1/account"]
    assert Agent.objects.count() == 0


# --- refusals -------------------------------------------------------------------------------


def _refusals() -> list[Any]:
    old = int(time.time()) - 301
    return [
        pytest.param({"signature": ""}, 400, id="missing-signature-header"),
        pytest.param({"secret": "whsec_somebody_else"}, 400, id="wrong-secret"),
        pytest.param({"timestamp": old}, 400, id="timestamp-older-than-300s"),
        pytest.param(
            {"endpoint_uuid": "11111111-2222-4333-8444-555555555555"}, 404, id="unknown-uuid"
        ),
        pytest.param({"tamper": True}, 400, id="body-altered-after-signing"),
        pytest.param({"body": b'{"id": "evt_1", "livemode": false,'}, 400, id="malformed-json"),
        # Valid JSON that is not an object: dj-stripe itself would crash (500) on these.
        pytest.param({"body": b"5"}, 400, id="json-number"),
        pytest.param({"body": b"null"}, 400, id="json-null"),
        pytest.param({"body": b"false"}, 400, id="json-false"),
        pytest.param({"body": b'["evt_1"]'}, 400, id="json-array"),
        # Nesting: json.loads recursed into RecursionError (500); past any event's depth, refused.
        pytest.param({"body": b"[" * 50_000}, 400, id="deeply-nested-array"),
        pytest.param({"body": b'{"a":' * 50_000}, 400, id="deeply-nested-object"),
        pytest.param(
            {"body": b'{"id": "evt_1", "x": ' + b'{"a": ' * 40 + b"1" + b"}" * 41},
            400,
            id="object-nested-past-the-limit",
        ),
        # NUL characters: PostgreSQL refuses them in the rows dj-stripe writes (another 500).
        pytest.param({"body": b'{"id": "evt_\\u0000"}'}, 400, id="json-nul-escape"),
        pytest.param({"signature": "t=1,v1=00\x00"}, 400, id="nul-in-signature-header"),
        pytest.param({"signature": "t=1,v1=\u00e9"}, 400, id="non-ascii-signature-header"),
        pytest.param(
            {
                "secret": "whsec_attacker",
                "headers": {"X-Djstripe-Webhook-Secret": "whsec_attacker"},
            },
            400,
            id="debug-secret-override-header-ignored-without-debug",
        ),
    ]


@pytest.mark.parametrize(("how", "status"), _refusals())
def test_a_forged_or_garbled_delivery_is_refused_and_creates_nothing(
    deliver, customer, how, status
):
    event = load_event("checkout.session.completed__paid", user=customer)
    kwargs = dict(how)
    if kwargs.pop("tamper", False):
        from billing.sample_events import encode

        original = encode(event)
        event["data"]["object"]["metadata"]["agent_name"] = "stolen"
        kwargs["sign_body"] = original

    response = deliver(event, **kwargs)

    assert response.status_code == status
    assert Agent.objects.count() == 0
    assert ProvisioningJob.objects.count() == 0
    assert not Event.objects.exists()


def test_the_debug_secret_override_header_is_honoured_only_with_debug(deliver, customer, settings):
    # The control for the refusal above: dj-stripe really does swap the secret under DEBUG.
    settings.DEBUG = True
    event = load_event("checkout.session.completed__paid", user=customer)

    response = deliver(
        event, secret="whsec_attacker", headers={"X-Djstripe-Webhook-Secret": "whsec_attacker"}
    )

    assert response.status_code == 200
    assert Agent.objects.count() == 1


def test_a_correctly_signed_delivery_is_the_control_for_the_refusals(deliver, customer):
    assert deliver(load_event("checkout.session.completed__paid", user=customer)).status_code == 200
    assert WebhookEventTrigger.objects.get().valid is True


# --- paid but not ours ------------------------------------------------------------------------


def _not_ours() -> list[Any]:
    def meta(**kw: Any) -> Any:
        return lambda s: s["metadata"].update(kw)

    return [
        pytest.param(
            lambda s: s.update(client_reference_id="999999"),
            UnfulfillableReason.UNKNOWN_CUSTOMER,
            id="unknown-customer",
        ),
        pytest.param(
            lambda s: s.update(client_reference_id=None),
            UnfulfillableReason.UNKNOWN_CUSTOMER,
            id="no-reference",
        ),
        pytest.param(
            lambda s: s.update(client_reference_id="not-a-pk"),
            UnfulfillableReason.UNKNOWN_CUSTOMER,
            id="reference-not-a-pk",
        ),
        pytest.param(
            lambda s: s.update(metadata={}), UnfulfillableReason.BAD_METADATA, id="no-metadata"
        ),
        pytest.param(meta(agent_name="x" * 65), UnfulfillableReason.BAD_METADATA, id="long-name"),
        pytest.param(meta(agent_name="   "), UnfulfillableReason.BAD_METADATA, id="blank-name"),
        pytest.param(meta(region="mars"), UnfulfillableReason.BAD_METADATA, id="unknown-region"),
        pytest.param(
            lambda s: s.update(mode="payment"), UnfulfillableReason.WRONG_MODE, id="payment-mode"
        ),
        pytest.param(
            lambda s: s.update(livemode=True), UnfulfillableReason.WRONG_LIVEMODE, id="livemode"
        ),
    ]


@pytest.mark.parametrize(("spoil", "reason"), _not_ours())
def test_a_paid_session_that_is_not_ours_is_recorded_for_operators_and_answered_200(
    deliver, customer, spoil, reason
):
    event = load_event("checkout.session.completed__paid", user=customer)
    spoil(event["data"]["object"])

    response = deliver(event)

    assert response.status_code == 200  # Stripe must not retry a permanent error for days
    assert Agent.objects.count() == 0
    assert ProvisioningJob.objects.count() == 0
    row = UnfulfillablePayment.objects.get()
    assert (row.stripe_event_id, row.reason) == (event["id"], reason)
    assert row.payload["id"] == event["data"]["object"]["id"]


def test_a_session_with_another_price_is_unfulfillable_when_our_price_is_configured(
    deliver, customer, settings
):
    settings.STRIPE_PRICE_AMOUNT = 4900
    settings.STRIPE_PRICE_CURRENCY = "eur"

    deliver(load_event("checkout.session.completed__paid", user=customer))

    assert UnfulfillablePayment.objects.get().reason == UnfulfillableReason.WRONG_PRICE
    assert Agent.objects.count() == 0


def test_a_session_with_our_price_is_fulfilled_when_the_price_is_configured(
    deliver, customer, settings
):
    event = load_event("checkout.session.completed__paid", user=customer)
    settings.STRIPE_PRICE_AMOUNT = event["data"]["object"]["amount_subtotal"]
    settings.STRIPE_PRICE_CURRENCY = event["data"]["object"]["currency"]

    deliver(event)

    assert Agent.objects.count() == 1


def _trial(event):
    """A subscription with a trial (or a free first period): Stripe's subtotal is 0."""
    event["data"]["object"].update(amount_subtotal=0, amount_total=0)
    return event


def test_a_trial_session_naming_our_price_is_fulfilled(deliver, customer, settings):
    event = _trial(load_event("checkout.session.completed__paid", user=customer))
    event["data"]["object"]["metadata"]["price_id"] = settings.STRIPE_PRICE_ID
    settings.STRIPE_PRICE_AMOUNT = 4900

    deliver(event)

    assert Agent.objects.count() == 1
    assert not UnfulfillablePayment.objects.exists()


def test_a_session_naming_another_price_is_unfulfillable_whatever_its_amount(
    deliver, customer, settings
):
    event = load_event("checkout.session.completed__paid", user=customer)
    event["data"]["object"]["metadata"]["price_id"] = "price_someone_elses"
    settings.STRIPE_PRICE_AMOUNT = event["data"]["object"]["amount_subtotal"]

    deliver(event)

    row = UnfulfillablePayment.objects.get()
    assert row.reason == UnfulfillableReason.WRONG_PRICE
    assert "price_someone_elses" in row.detail
    assert Agent.objects.count() == 0


def test_expanded_line_items_name_the_price_before_metadata(deliver, customer, settings):
    event = _trial(load_event("checkout.session.completed__paid", user=customer))
    event["data"]["object"]["line_items"] = {
        "object": "list",
        "data": [{"object": "item", "price": {"id": "price_other", "object": "price"}}],
    }
    event["data"]["object"]["metadata"]["price_id"] = settings.STRIPE_PRICE_ID

    deliver(event)

    assert UnfulfillablePayment.objects.get().reason == UnfulfillableReason.WRONG_PRICE


def test_a_trial_session_from_before_the_price_id_is_not_judged_by_its_zero_subtotal(
    deliver, customer, settings
):
    event = _trial(load_event("checkout.session.completed__paid", user=customer))
    settings.STRIPE_PRICE_AMOUNT = 4900

    deliver(event)

    assert Agent.objects.count() == 1


def test_the_captured_not_ours_session_is_recorded(deliver, customer):
    deliver(load_event("checkout.session.completed__not_ours"))

    assert UnfulfillablePayment.objects.get().reason == UnfulfillableReason.WRONG_MODE


def test_a_redelivered_unfulfillable_event_is_recorded_once(deliver, customer):
    event = load_event("checkout.session.completed__paid", user=customer)
    event["data"]["object"]["client_reference_id"] = "999999"
    deliver(event)

    # Simulate dj-stripe losing its Event row (e.g. reprocessing with --failed).
    Event.objects.all().delete()
    assert deliver(event).status_code == 200

    assert UnfulfillablePayment.objects.count() == 1


def test_a_session_reused_by_another_customer_never_hands_over_the_agent(deliver, customer):
    session_id = new_session_id()
    deliver(load_event("checkout.session.completed__paid", user=customer, session_id=session_id))
    mallory = UserFactory(username="mallory")

    deliver(
        load_event(
            "checkout.session.async_payment_succeeded__paid", user=mallory, session_id=session_id
        )
    )

    assert Agent.objects.get().owner == customer
    assert UnfulfillablePayment.objects.get().reason == UnfulfillableReason.AGENT_CONFLICT


def test_the_unfulfillable_payment_shows_in_admin_with_its_reason(deliver, customer, admin_client):
    event = load_event("checkout.session.completed__paid", user=customer)
    event["data"]["object"]["client_reference_id"] = "999999"
    deliver(event)
    row = UnfulfillablePayment.objects.get()

    changelist = admin_client.get("/admin/billing/unfulfillablepayment/")
    detail = admin_client.get(f"/admin/billing/unfulfillablepayment/{row.pk}/change/")
    filtered = admin_client.get(
        "/admin/billing/unfulfillablepayment/", {"state": "open", "reason": "unknown_customer"}
    )
    searched = admin_client.get("/admin/billing/unfulfillablepayment/", {"q": event["id"]})

    assert changelist.status_code == 200
    assert event["id"] in changelist.content.decode()
    assert "Unknown customer" in changelist.content.decode()
    assert detail.status_code == 200
    assert "999999" in detail.content.decode()
    assert event["id"] in filtered.content.decode()
    assert event["id"] in searched.content.decode()


def test_an_operator_marks_an_unfulfillable_payment_resolved(deliver, customer, admin_client):
    event = load_event("checkout.session.completed__paid", user=customer)
    event["data"]["object"]["mode"] = "payment"
    deliver(event)
    row = UnfulfillablePayment.objects.get()

    response = admin_client.post(
        "/admin/billing/unfulfillablepayment/",
        {"action": "mark_resolved", "_selected_action": [row.pk]},
        follow=True,
    )

    assert "Resolved 1 of 1 payments." in response.content.decode()
    row.refresh_from_db()
    assert row.is_resolved and row.resolved_by.username == "admin"


# --- transient errors ------------------------------------------------------------------------


def test_a_database_error_answers_500_and_the_retry_fulfils(
    client, endpoint, customer, monkeypatch
):
    from tests.billing.conftest import deliver_with

    client.raise_request_exception = False
    send = deliver_with(client)
    event = load_event("checkout.session.completed__paid", user=customer)
    real = services._agent_get_or_create

    def database_down(purchase: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "_agent_get_or_create", database_down)
    assert send(event).status_code == 500
    assert not Event.objects.filter(id=event["id"]).exists()  # rolled back: Stripe retries
    assert Agent.objects.count() == 0
    assert UnfulfillablePayment.objects.count() == 0

    monkeypatch.setattr(services, "_agent_get_or_create", real)
    assert send(event).status_code == 200
    assert ProvisioningJob.objects.count() == 1


def test_an_async_payment_failure_creates_nothing(deliver, customer):
    from billing.sample_events import build_checkout_event

    event = build_checkout_event(
        "checkout.session.async_payment_failed", user=customer, agent_name="a", region="us-east"
    )

    assert deliver(event).status_code == 200
    assert Agent.objects.count() == 0
    assert UnfulfillablePayment.objects.count() == 0
