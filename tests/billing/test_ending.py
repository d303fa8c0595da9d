"""Subscription deleted, payment fully refunded, payment disputed: delivered as Stripe does (signed,
through dj-stripe's real URL), each ends the matching agent with one deprovision job; an event
that names no single agent ends nothing and is kept for operators."""

from __future__ import annotations

import copy
import json
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from djstripe.event_handlers import (
    handle_charge_dispute_event,
    handle_charge_event,
    handle_customer_subscription_event,
)
from djstripe.models import Event
from djstripe.signals import WEBHOOK_SIGNALS

from billing import sample_events
from billing.models import KnownCharge, UnmatchedEndingEvent, UnmatchedReason
from provisioning import services as provisioning_services
from provisioning.models import Agent, JobEvent, JobKind, JobStatus, ProvisioningJob, Step
from tests.billing.conftest import FIXTURES, WEBHOOK_UUID
from tests.factories import AgentFactory, JobFactory, UserFactory

pytestmark = pytest.mark.django_db

CUSTOMER = "cus_TFixtureCust01"
SUBSCRIPTION = "sub_1SxFixtureSubscription00"
CHARGE = "ch_3SxFixtureCharge000000000"
PAYMENT_INTENT = "pi_3SxFixtureIntent000000000"


def load(name: str, *, event_id: str | None = None, **ids: str) -> dict[str, Any]:
    """A fixture event made fresh: new event id, now, and the Stripe ids a test names.

    ids: customer, subscription, charge (the charge's id, or a dispute's charge),
    payment_intent.
    """
    event = copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text()))
    event["id"] = event_id or sample_events.stripe_id("evt_")
    event["created"] = int(time.time())
    obj = event["data"]["object"]
    kind = obj["object"]
    if "customer" in ids and kind in ("subscription", "charge"):
        obj["customer"] = ids["customer"]
    if "subscription" in ids and kind == "subscription":
        obj["id"] = ids["subscription"]
    if "charge" in ids:
        obj["charge" if kind == "dispute" else "id"] = ids["charge"]
    if "payment_intent" in ids:
        obj["payment_intent"] = ids["payment_intent"]
    return event


def paid_agent(**fields: Any) -> Agent:
    """An agent whose purchase carried the fixtures' customer and subscription, running."""
    fields.setdefault("stripe_customer_id", CUSTOMER)
    fields.setdefault("stripe_subscription_id", SUBSCRIPTION)
    agent = AgentFactory(**fields)
    JobFactory(agent=agent, status=JobStatus.RUNNING, stripe_event_id=f"evt_paid_{agent.pk}")
    return agent


def deprovisions(agent: Agent) -> list[ProvisioningJob]:
    return list(ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION))


def send_ending(deliver: Any, kind: str, **ids: str) -> dict[str, Any]:
    """Deliver one ending event (a dispute after the charge.succeeded it is about)."""
    if kind == "subscription":
        event = load("customer.subscription.deleted__canceled", **ids)
    elif kind == "refund":
        event = load("charge.refunded__full", **ids)
    else:
        charge_ids = {k: v for k, v in ids.items() if k in ("customer", "charge")}
        assert deliver(load("charge.succeeded__paid", **charge_ids)).status_code == 200
        event = load("charge.dispute.created__needs_response", **ids)
    response = deliver(event)
    assert response.status_code == 200, response.content
    return event


ENDINGS = [
    pytest.param("subscription", "subscription cancelled", id="customer.subscription.deleted"),
    pytest.param("refund", "payment refunded", id="charge.refunded-full"),
    pytest.param("dispute", "payment disputed", id="charge.dispute.created"),
]


@pytest.mark.parametrize(("kind", "reason"), ENDINGS)
def test_an_ending_event_ends_the_agent_with_one_deprovision_job(deliver, kind, reason):
    agent = paid_agent()
    bystander = paid_agent(stripe_customer_id="cus_other", stripe_subscription_id="sub_other")

    event = send_ending(deliver, kind)

    agent.refresh_from_db()
    assert agent.is_ended
    assert agent.end_reason == reason
    (job,) = deprovisions(agent)
    assert (job.status, job.stripe_event_id, job.attempt) == (JobStatus.QUEUED, event["id"], 1)
    (enqueue,) = JobEvent.objects.filter(job=job)
    assert (enqueue.actor, enqueue.action) == ("stripe", JobEvent.Action.ENQUEUE)
    assert reason in enqueue.reason
    bystander.refresh_from_db()
    assert not bystander.is_ended and not deprovisions(bystander)
    assert not UnmatchedEndingEvent.objects.exists()


@pytest.mark.parametrize(("kind", "reason"), ENDINGS)
def test_an_ending_event_is_handled_while_every_stripe_api_call_is_refused(
    deliver, stripe_http, kind, reason
):
    agent = paid_agent()

    send_ending(deliver, kind)

    assert len(deprovisions(agent)) == 1
    assert stripe_http.calls == []  # nothing was even attempted


@pytest.mark.parametrize(
    ("fixture", "handler"),
    [
        ("customer.subscription.deleted__canceled", handle_customer_subscription_event),
        ("charge.refunded__full", handle_charge_event),
        ("charge.dispute.created__needs_response", handle_charge_dispute_event),
    ],
)
def test_control_dj_stripes_own_sync_would_call_stripe_and_fail(
    client, endpoint, stripe_http, fixture, handler
):
    # Why BillingConfig.ready disconnects it: with dj-stripe's sync back on, the same event
    # retrieves its object from Stripe, fails, and the whole delivery rolls back with a 500.
    from tests.billing.conftest import deliver_with

    agent = paid_agent()
    KnownCharge.objects.create(
        charge_id=CHARGE, stripe_customer_id=CUSTOMER, stripe_event_id="evt_x"
    )
    signal = WEBHOOK_SIGNALS[fixture.split("__")[0]]
    signal.connect(handler, sender=Event)
    try:
        client.raise_request_exception = False
        response = deliver_with(client)(load(fixture))
    finally:
        signal.disconnect(handler, sender=Event)

    assert response.status_code == 500
    assert stripe_http.calls
    assert not deprovisions(agent)


@pytest.mark.parametrize(("kind", "reason"), ENDINGS)
def test_a_redelivered_ending_event_adds_nothing(deliver, kind, reason):
    agent = paid_agent()
    event = send_ending(deliver, kind)

    assert deliver(event).status_code == 200

    assert len(deprovisions(agent)) == 1
    assert Event.objects.filter(id=event["id"]).count() == 1


def test_the_same_event_reprocessed_after_a_lost_event_row_still_makes_one_job(deliver):
    # dj-stripe's duplicate check is its Event row; ours is agent_end's (per event, per agent).
    agent = paid_agent()
    event = send_ending(deliver, "refund")
    Event.objects.filter(id=event["id"]).delete()

    assert deliver(event).status_code == 200

    assert len(deprovisions(agent)) == 1


def test_every_ending_event_for_one_agent_makes_one_deprovision_and_keeps_the_first_reason(
    deliver,
):
    agent = paid_agent()

    first = send_ending(deliver, "subscription")
    send_ending(deliver, "refund")
    send_ending(deliver, "dispute")

    (job,) = deprovisions(agent)
    assert job.stripe_event_id == first["id"]
    agent.refresh_from_db()
    assert agent.end_reason == "subscription cancelled"
    assert not UnmatchedEndingEvent.objects.exists()


def test_an_ending_event_for_an_agent_still_provisioning_cancels_the_build_first(deliver):
    agent = AgentFactory(stripe_customer_id=CUSTOMER, stripe_subscription_id=SUBSCRIPTION)
    build = provisioning_services.job_enqueue(agent=agent, stripe_event_id="evt_paid")

    send_ending(deliver, "subscription")

    build.refresh_from_db()
    assert (build.status, build.failed_step) == (JobStatus.FAILED, Step.CANCELLED)
    assert "subscription cancelled" in build.error
    (job,) = deprovisions(agent)
    assert job.status == JobStatus.QUEUED
    cancel = JobEvent.objects.get(job=build, action=JobEvent.Action.CANCEL)
    enqueue = JobEvent.objects.get(job=job, action=JobEvent.Action.ENQUEUE)
    assert cancel.pk < enqueue.pk


def test_the_deprovision_is_dispatched_after_the_webhook_commits(
    deliver, settings, monkeypatch, backend, django_capture_on_commit_callbacks
):
    settings.DISPATCH_ON_COMMIT = True
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)
    agent = paid_agent()

    with django_capture_on_commit_callbacks(execute=True):
        send_ending(deliver, "subscription")

    (job,) = deprovisions(agent)
    assert [(jid, mode) for jid, _attempt, mode, _run in backend.dispatched] == [
        (str(job.pk), "deprovision")
    ]


# --- refunds ----------------------------------------------------------------------------------


def test_a_partial_refund_changes_nothing_and_records_nothing(deliver):
    agent = paid_agent()

    response = deliver(load("charge.refunded__partial"))

    assert response.status_code == 200
    agent.refresh_from_db()
    assert not agent.is_ended
    assert not deprovisions(agent)
    assert not UnmatchedEndingEvent.objects.exists()


def test_a_refund_whose_amount_refunded_equals_the_amount_is_full_even_without_the_flag(deliver):
    agent = paid_agent()
    event = load("charge.refunded__full")
    event["data"]["object"]["refunded"] = False  # amount_refunded == amount decides

    assert deliver(event).status_code == 200

    assert len(deprovisions(agent)) == 1


def test_a_refund_ends_the_customers_one_agent_that_is_not_ended_yet(deliver):
    older = paid_agent(stripe_subscription_id="sub_old")
    provisioning_services.agent_end(agent_id=older.pk, actor="operator:ann", reason="moved")
    current = paid_agent(stripe_subscription_id="sub_new")

    send_ending(deliver, "refund")

    assert len(deprovisions(current)) == 1
    current.refresh_from_db()
    assert current.end_reason == "payment refunded"


def test_a_refund_is_matched_by_its_customer_whatever_invoice_it_names(deliver):
    # Since API 2025-03-31 a Charge has no invoice; an old-style one is not read either.
    agent = paid_agent(stripe_subscription_id="sub_wanted")
    event = load("charge.refunded__full")
    event["data"]["object"]["invoice"] = "in_1"

    assert deliver(event).status_code == 200

    assert len(deprovisions(agent)) == 1
    assert KnownCharge.objects.get().stripe_subscription_id == ""


# --- no single agent: an operator's turn --------------------------------------------------------


def test_a_refund_matching_several_live_agents_ends_none_and_is_recorded(deliver):
    first = paid_agent(stripe_subscription_id="sub_a")
    second = paid_agent(stripe_subscription_id="sub_b")
    event = load("charge.refunded__full")

    assert deliver(event).status_code == 200
    assert deliver(event).status_code == 200  # redelivered

    assert not deprovisions(first) and not deprovisions(second)
    row = UnmatchedEndingEvent.objects.get()
    assert (row.stripe_event_id, row.reason) == (event["id"], UnmatchedReason.SEVERAL_AGENTS)
    assert row.detail.startswith("payment refunded: customer cus_TFixtureCust01 matches 2 agents")
    assert {str(first.pk), str(second.pk)} <= set(row.detail.replace(",", " ").split())
    assert (row.stripe_customer_id, row.stripe_charge_id) == (CUSTOMER, CHARGE)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("subscription", "subscription cancelled: no agent has subscription sub_unknown"),
        ("refund", "payment refunded: no agent has customer cus_unknown"),
        ("dispute", "payment disputed: no agent has customer cus_unknown"),
    ],
)
def test_an_ending_event_for_nobody_we_know_ends_nothing_and_is_recorded(deliver, kind, expected):
    agent = paid_agent()

    send_ending(deliver, kind, customer="cus_unknown", subscription="sub_unknown")

    assert not deprovisions(agent)
    row = UnmatchedEndingEvent.objects.get()
    assert (row.reason, row.detail) == (UnmatchedReason.NO_AGENT, expected)


def test_a_dispute_about_a_charge_we_never_saw_is_recorded(deliver):
    agent = paid_agent()

    deliver(load("charge.dispute.created__needs_response", charge="ch_never"))

    assert not deprovisions(agent)
    row = UnmatchedEndingEvent.objects.get()
    assert row.reason == UnmatchedReason.NO_AGENT
    assert "charge ch_never" in row.detail
    assert "no signed charge event" in row.detail


def test_a_dispute_finds_its_charge_by_payment_intent_too(deliver):
    agent = paid_agent()
    assert deliver(load("charge.succeeded__paid")).status_code == 200

    deliver(load("charge.dispute.created__needs_response", charge="ch_renumbered"))

    assert len(deprovisions(agent)) == 1


def test_charge_succeeded_remembers_the_charge_once(deliver):
    event = load("charge.succeeded__paid")
    deliver(event)
    deliver(load("charge.succeeded__paid"))  # another event about the same charge

    known = KnownCharge.objects.get()
    assert (known.charge_id, known.stripe_customer_id, known.payment_intent_id) == (
        CHARGE,
        CUSTOMER,
        PAYMENT_INTENT,
    )
    assert known.stripe_event_id == event["id"]


# --- the test-event command -------------------------------------------------------------------


def _run(*args: Any) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("kind", "reason"), ENDINGS)
def test_stripe_send_test_event_ends_the_customers_latest_agent(
    live_server, endpoint, kind, reason
):
    type_ = {
        "subscription": "customer.subscription.deleted",
        "refund": "charge.refunded",
        "dispute": "charge.dispute.created",
    }[kind]
    customer = UserFactory(username="ada")
    url = f"{live_server.url}/stripe/webhook/{WEBHOOK_UUID}/"
    _run("stripe_send_test_event", "checkout.session.completed", "--customer", "ada", "--url", url)
    older = Agent.objects.get(owner=customer)
    _run("stripe_send_test_event", "checkout.session.completed", "--customer", "ada", "--url", url)
    latest = Agent.objects.exclude(pk=older.pk).get(owner=customer)

    output = _run("stripe_send_test_event", type_, "--customer", "ada", "--url", url)

    assert f"{type_} " in output and "HTTP 200" in output
    latest.refresh_from_db()
    older.refresh_from_db()
    assert (latest.is_ended, latest.end_reason) == (True, reason)
    assert not older.is_ended
    assert len(deprovisions(latest)) == 1


@pytest.mark.django_db(transaction=True)
def test_stripe_send_test_event_partial_refund_leaves_the_agent(live_server, endpoint):
    UserFactory(username="ada")
    url = f"{live_server.url}/stripe/webhook/{WEBHOOK_UUID}/"
    _run("stripe_send_test_event", "checkout.session.completed", "--customer", "ada", "--url", url)

    _run(
        "stripe_send_test_event", "charge.refunded", "--customer", "ada", "--partial", "--url", url
    )

    assert not Agent.objects.get().is_ended


def test_stripe_send_test_event_needs_an_agent_for_an_ending_event():
    from django.core.management import CommandError

    UserFactory(username="ada")

    with pytest.raises(CommandError, match="has no agent"):
        _run("stripe_send_test_event", "customer.subscription.deleted", "--customer", "ada")


# --- out of order: the ending arrives before the purchase ---------------------------------------


def test_a_purchase_arriving_after_its_subscriptions_deletion_is_ended_at_once(deliver):
    from tests.billing.conftest import load_event

    customer = UserFactory(username="ada")
    cancelled = load("customer.subscription.deleted__canceled", subscription="sub_early")
    assert deliver(cancelled).status_code == 200
    assert UnmatchedEndingEvent.objects.get().reason == UnmatchedReason.NO_AGENT

    purchase = load_event("checkout.session.completed__paid", user=customer)
    purchase["data"]["object"]["subscription"] = "sub_early"
    assert deliver(purchase).status_code == 200

    agent = Agent.objects.get()
    assert (agent.is_ended, agent.end_reason) == (True, "subscription cancelled")
    build = ProvisioningJob.objects.get(agent=agent, kind=JobKind.PROVISION)
    assert (build.status, build.failed_step) == (JobStatus.FAILED, Step.CANCELLED)
    (job,) = deprovisions(agent)
    assert job.stripe_event_id == cancelled["id"]
    row = UnmatchedEndingEvent.objects.get()
    assert row.is_resolved and str(agent.pk) in row.note


def test_an_earlier_unmatched_refund_of_the_same_customer_is_not_a_reason_to_end(deliver):
    # Only an exact subscription id counts; a customer-only match would be a guess.
    from tests.billing.conftest import load_event

    customer = UserFactory(username="ada")
    deliver(load("charge.refunded__full", customer="cus_early"))
    purchase = load_event("checkout.session.completed__paid", user=customer)
    purchase["data"]["object"]["customer"] = "cus_early"

    assert deliver(purchase).status_code == 200

    assert not Agent.objects.get().is_ended
    assert not UnmatchedEndingEvent.objects.get().is_resolved


def test_an_unmatched_ending_event_shows_in_admin_and_can_be_resolved(deliver, admin_client):
    paid_agent(stripe_subscription_id="sub_a")
    paid_agent(stripe_subscription_id="sub_b")
    deliver(load("charge.refunded__full"))
    row = UnmatchedEndingEvent.objects.get()

    changelist = admin_client.get(
        "/admin/billing/unmatchedendingevent/", {"state": "open", "reason": "several_agents"}
    )
    detail = admin_client.get(f"/admin/billing/unmatchedendingevent/{row.pk}/change/")
    resolved = admin_client.post(
        "/admin/billing/unmatchedendingevent/",
        {"action": "mark_resolved", "_selected_action": [row.pk]},
    )

    assert changelist.status_code == 200 and row.stripe_event_id in changelist.content.decode()
    assert detail.status_code == 200 and "matches 2 agents" in detail.content.decode()
    assert resolved.status_code == 302
    row.refresh_from_db()
    assert row.is_resolved and row.resolved_by is not None
