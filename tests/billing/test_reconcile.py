"""Catching up with Stripe: events no webhook delivered, and paid sessions that never became an
agent, listed from a Stripe fake on the wire with Stripe's filters and pagination."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe
from django.core.management import CommandError, call_command
from django.utils import timezone
from djstripe.models import Event

from billing import reconcile, sample_events
from billing.models import (
    BillingDrift,
    CatchUpKind,
    StripeCatchUp,
    StripeReconcileState,
    UnfulfillablePayment,
)
from provisioning.models import Agent, JobKind, ProvisioningJob
from provisioning.worker import Worker
from tests.billing.conftest import load_event, new_session_id
from tests.factories import UserFactory
from tests.fakes.stripe import FakeStripeAPI

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> FakeStripeAPI:
    """The Stripe fake, as the process-wide HTTP client (what stripe_client uses by default)."""
    api = FakeStripeAPI()
    monkeypatch.setattr(stripe, "default_http_client", api)
    return api


@pytest.fixture
def customer() -> Any:
    return UserFactory(username="ada")


def paid_event(
    user: Any, *, created: int | None = None, session_id: str | None = None
) -> dict[str, Any]:
    event = load_event(
        "checkout.session.completed__paid", user=user, session_id=session_id or new_session_id()
    )
    event["created"] = created if created is not None else int(time.time()) - 120
    return event


def session_of(event: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    session: dict[str, Any] = dict(event["data"]["object"])
    session["status"] = "complete"
    session["created"] = created if created is not None else event["created"] - 60
    return session


def state() -> StripeReconcileState:
    return StripeReconcileState.objects.get(name="default")


def gte_sent(fake: FakeStripeAPI) -> list[int]:
    return [int(q["created[gte]"][0]) for q in fake.list_calls("/v1/events")]


# --- the fake itself: Stripe's filters and pagination -----------------------------------------


def test_the_fake_lists_newest_first_filters_and_pages_like_stripe(fake, customer):
    now = int(time.time())
    for age in (500, 400, 300, 200, 100):
        fake.add_event(paid_event(customer, created=now - age))
    fake.add_event({**paid_event(customer, created=now - 50), "type": "customer.created"})
    client = stripe.StripeClient(api_key="sk_test_x", http_client=fake, max_network_retries=0)

    first = client.v1.events.list(
        params={"types": ["checkout.session.completed"], "created": {"gte": now - 400}, "limit": 2}
    )
    second = client.v1.events.list(
        params={
            "types": ["checkout.session.completed"],
            "created": {"gte": now - 400},
            "limit": 2,
            "starting_after": first.data[-1].id,
        }
    )

    assert [e.created for e in first.data] == [now - 100, now - 200]
    assert first.has_more is True
    assert [e.created for e in second.data] == [now - 300, now - 400]
    assert second.has_more is False
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.events.list(params={"limit": 101})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.events.list(params={"starting_after": "evt_unknown"})


# --- missed events ----------------------------------------------------------------------------


def test_a_purchase_no_webhook_delivered_becomes_one_agent_and_a_late_delivery_adds_nothing(
    fake, customer, deliver
):
    event = fake.add_event(paid_event(customer))

    report = reconcile.reconcile_run()

    assert (report.listed, report.caught_up, report.ok) == (1, 1, True)
    agent = Agent.objects.get()
    assert agent.stripe_checkout_session_id == event["data"]["object"]["id"]
    job = ProvisioningJob.objects.get()
    assert (job.agent, job.stripe_event_id) == (agent, event["id"])
    caught = StripeCatchUp.objects.get()
    assert (caught.stripe_id, caught.kind, caught.event_type) == (
        event["id"],
        CatchUpKind.EVENT,
        "checkout.session.completed",
    )

    # Stripe's own retry arrives after the reconciler processed the event.
    assert deliver(event).status_code == 200
    again = reconcile.reconcile_run()

    assert Agent.objects.count() == 1
    assert ProvisioningJob.objects.count() == 1
    assert Event.objects.filter(id=event["id"]).count() == 1
    assert (again.caught_up, again.already_recorded) == (0, 1)
    assert StripeCatchUp.objects.count() == 1


def test_events_the_webhook_delivered_are_not_counted_as_caught_up(fake, customer, deliver):
    event = fake.add_event(paid_event(customer))
    assert deliver(event).status_code == 200

    report = reconcile.reconcile_run()

    assert (report.caught_up, report.already_recorded) == (0, 1)
    assert not StripeCatchUp.objects.exists()
    assert ProvisioningJob.objects.count() == 1


def test_a_cancellation_no_webhook_delivered_ends_the_agent(fake, customer, deliver):
    purchase = paid_event(customer)
    assert deliver(purchase).status_code == 200
    agent = Agent.objects.get()
    subscription = sample_events.build_subscription(
        subscription_id=agent.stripe_subscription_id, customer_id=agent.stripe_customer_id
    )
    deleted = sample_events.build_event("customer.subscription.deleted", subscription)
    fake.add_event(purchase)
    fake.add_event(deleted)

    report = reconcile.reconcile_run()

    assert report.caught_up == 1
    agent.refresh_from_db()
    assert agent.is_ended
    assert agent.end_reason == "subscription cancelled"
    assert ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION).count() == 1


def test_pages_are_followed_with_starting_after_and_processed_oldest_first(fake, customer):
    now = int(time.time())
    events = [fake.add_event(paid_event(customer, created=now - 600 + i)) for i in range(7)]

    report = reconcile.reconcile_run(page_size=3)

    assert report.caught_up == 7
    calls = fake.list_calls("/v1/events")
    assert [q.get("starting_after", [None])[0] for q in calls] == [
        None,
        events[4]["id"],
        events[1]["id"],
    ]
    assert all(q["limit"] == ["3"] for q in calls)
    assert sorted(v for k, vs in calls[0].items() if k.startswith("types[") for v in vs) == sorted(
        reconcile.services.ENABLED_EVENTS
    )
    by_creation = Agent.objects.order_by("created_at").values_list(
        "stripe_checkout_session_id", flat=True
    )
    assert list(by_creation) == [e["data"]["object"]["id"] for e in events]


def test_an_event_type_the_service_does_not_handle_is_recorded_and_ignored(fake, customer):
    event = paid_event(customer)
    # A session that expired unpaid: neither our receivers nor dj-stripe's (disconnected for
    # checkout sessions) act on it.
    event["type"] = "checkout.session.expired"
    event["data"]["object"].update(status="expired", payment_status="unpaid")

    assert reconcile.event_process(data=event) is True

    assert Event.objects.filter(id=event["id"], type="checkout.session.expired").exists()
    assert StripeCatchUp.objects.filter(stripe_id=event["id"]).exists()
    assert not Agent.objects.exists()
    assert not ProvisioningJob.objects.exists()
    assert reconcile.event_process(data=event) is False  # recorded once


def test_types_the_service_does_not_handle_are_never_asked_for(fake, customer):
    other = paid_event(customer)
    other["type"] = "invoice.paid"
    fake.add_event(other)

    report = reconcile.reconcile_run()

    assert report.listed == 0
    assert not Event.objects.exists()


# --- the watermark ----------------------------------------------------------------------------


def test_with_no_watermark_a_run_starts_thirty_days_back_then_from_the_watermark(fake, customer):
    now = int(time.time())
    fake.add_event(paid_event(customer, created=now - 40 * 86400))  # gone from Stripe's window
    newest = fake.add_event(paid_event(customer, created=now - 300))

    first = reconcile.reconcile_run()

    (sent,) = gte_sent(fake)
    assert abs(sent - (now - 30 * 86400)) <= 5
    assert first.listed == 1
    expected = datetime.fromtimestamp(newest["created"], tz=UTC) - reconcile.WATERMARK_OVERLAP
    assert state().watermark == expected

    # A restart: nothing in memory, the next run starts at the stored watermark.
    reconcile.reconcile_run()

    assert gte_sent(fake)[-1] == int(expected.timestamp())


def test_the_overlap_catches_an_event_that_shows_up_late_and_older_than_the_newest(fake, customer):
    now = int(time.time())
    fake.add_event(paid_event(customer, created=now - 60))
    reconcile.reconcile_run()
    # Listed only now, although created before the newest event the first run processed.
    late = fake.add_event(paid_event(customer, created=now - 300))

    report = reconcile.reconcile_run()

    assert report.caught_up == 1
    assert Agent.objects.filter(stripe_checkout_session_id=late["data"]["object"]["id"]).exists()
    assert Agent.objects.count() == 2


def test_a_failing_event_holds_the_watermark_and_is_processed_next_run(fake, customer, monkeypatch):
    now = int(time.time())
    ok_before = fake.add_event(paid_event(customer, created=now - 900))
    broken = fake.add_event(paid_event(customer, created=now - 600))
    ok_after = fake.add_event(paid_event(customer, created=now - 300))
    real = reconcile.services.purchase_fulfil

    def fulfil(**kwargs: Any) -> Any:
        if kwargs["event_id"] == broken["id"]:
            raise RuntimeError("database hiccup")
        return real(**kwargs)

    monkeypatch.setattr(reconcile.services, "purchase_fulfil", fulfil)

    report = reconcile.reconcile_run()

    assert list(report.failed) == [broken["id"]]
    assert report.caught_up == 2
    held = datetime.fromtimestamp(broken["created"], tz=UTC) - reconcile.WATERMARK_OVERLAP
    assert state().watermark == held
    assert state().last_success_at is None
    assert not Event.objects.filter(id=broken["id"]).exists()  # rolled back with its work

    monkeypatch.setattr(reconcile.services, "purchase_fulfil", real)
    again = reconcile.reconcile_run()

    assert (again.caught_up, again.ok) == (1, True)
    assert Agent.objects.count() == ProvisioningJob.objects.count() == 3
    assert state().watermark == (
        datetime.fromtimestamp(ok_after["created"], tz=UTC) - reconcile.WATERMARK_OVERLAP
    )
    assert state().last_success_at is not None
    assert ok_before["id"] in set(StripeCatchUp.objects.values_list("stripe_id", flat=True))


def test_a_stripe_outage_is_recorded_and_moves_nothing(fake, customer):
    fake.add_event(paid_event(customer))
    fake.fail_next = 10  # more than the client's retries

    with pytest.raises(stripe.APIError):
        reconcile.reconcile_run()

    row = state()
    assert row.watermark is None
    assert row.last_success_at is None
    assert "APIError" in row.last_error
    assert not Agent.objects.exists()


# --- the paid-session audit -------------------------------------------------------------------


def test_a_paid_session_whose_event_is_gone_is_fulfilled_once(fake, customer, deliver):
    old = int(time.time()) - 31 * 86400
    event = paid_event(customer, created=old)  # not listed: older than Stripe keeps events
    session = fake.add_session(session_of(event))

    report = reconcile.reconcile_run()

    assert report.sessions_fulfilled == 1
    agent = Agent.objects.get()
    assert agent.stripe_checkout_session_id == session["id"]
    job = ProvisioningJob.objects.get()
    assert job.stripe_event_id == f"reconcile:{session['id']}"
    assert StripeCatchUp.objects.get().kind == CatchUpKind.SESSION

    # Its event turns up after all (a very late retry), and the next audit runs again.
    assert deliver(event).status_code == 200
    again = reconcile.reconcile_run()

    assert again.sessions_fulfilled == 0
    assert again.sessions_without_agent == []
    assert Agent.objects.count() == ProvisioningJob.objects.count() == 1


def test_the_audit_reports_and_never_guesses(fake, customer, deliver):
    now = int(time.time())
    # 1. its event was processed and could not be fulfilled (an operator case exists)
    bad = paid_event(customer, created=now - 3600)
    bad["data"]["object"]["metadata"] = {"agent_name": "???", "region": "eu-central"}
    assert deliver(bad).status_code == 200
    fake.add_session(session_of(bad))
    # 2. completed a moment ago: its webhook is probably on its way
    fresh = paid_event(customer, created=now - 5)
    fake.add_session(session_of(fresh, created=now - 5))
    # 3. unpaid (a delayed payment method) and 4. still open: not purchases yet
    unpaid = session_of(paid_event(customer, created=now - 3600))
    unpaid["payment_status"] = "unpaid"
    fake.add_session(unpaid)
    still_open = session_of(paid_event(customer, created=now - 3600))
    still_open["status"] = "open"
    fake.add_session(still_open)

    report = reconcile.reconcile_run()

    assert sorted(report.sessions_without_agent) == sorted(
        [bad["data"]["object"]["id"], fresh["data"]["object"]["id"]]
    )
    assert report.sessions_fulfilled == 0
    assert not Agent.objects.exists()
    assert state().paid_sessions_without_agent == 2
    assert fake.list_calls("/v1/checkout/sessions")[0]["status"] == ["complete"]


def test_a_session_that_is_not_ours_is_recorded_once_for_operators(fake):
    stranger = UserFactory(username="bob")
    session = session_of(paid_event(stranger, created=int(time.time()) - 3600))
    session["client_reference_id"] = "not-a-user"
    fake.add_session(session)

    reconcile.reconcile_run()
    report = reconcile.reconcile_run()

    assert report.sessions_without_agent == [session["id"]]
    case = UnfulfillablePayment.objects.get()
    assert case.checkout_session_id == session["id"]
    assert not Agent.objects.exists()


# --- the worker duty, the command, metrics and admin -----------------------------------------


def test_the_worker_runs_the_catch_up_once_per_interval(fake, customer, settings):
    settings.STRIPE_RECONCILE_INTERVAL_SECONDS = 900
    fake.add_event(paid_event(customer))

    first = Worker(name="w1").tick()
    second = Worker(name="w2").tick()  # another worker within the interval

    assert first.done["stripe_reconcile"] == 1
    assert second.done["stripe_reconcile"] == 0
    assert first.ok and second.ok
    assert len(fake.list_calls("/v1/events")) == 1


@pytest.mark.parametrize(
    "off",
    [
        {"STRIPE_RECONCILE_INTERVAL_SECONDS": 0},
        {"STRIPE_SECRET_KEY": ""},
        {"BILLING_LOCAL_CHECKOUT": True, "STRIPE_API_BASE": ""},  # `make run`: no Stripe
    ],
)
def test_the_duty_is_off_without_a_stripe_to_ask(fake, customer, settings, off):
    settings.STRIPE_RECONCILE_INTERVAL_SECONDS = 900
    for name, value in off.items():
        setattr(settings, name, value)
    fake.add_event(paid_event(customer))

    assert Worker(name="w1").tick().done["stripe_reconcile"] == 0
    assert fake.calls == []


def test_the_command_runs_from_since_and_refuses_a_bad_time(fake, customer, capsys):
    event = fake.add_event(paid_event(customer, created=int(time.time()) - 7200))
    since = (timezone.now() - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")

    call_command("stripe_reconcile", "--since", since)

    assert "1 caught up" in capsys.readouterr().out
    assert Event.objects.filter(id=event["id"]).exists()
    sent = gte_sent(fake)[-1]
    assert sent == int(datetime.fromisoformat(since).timestamp())
    with pytest.raises(CommandError, match="not an ISO 8601"):
        call_command("stripe_reconcile", "--since", "yesterday")
    with pytest.raises(CommandError, match="future"):
        call_command("stripe_reconcile", "--since", "2999-01-01T00:00:00Z")


def test_metrics_show_the_catch_up(fake, customer, client, settings):
    settings.METRICS_TOKEN = "t0ken"
    auth = {"Authorization": "Bearer t0ken"}
    before = client.get("/metrics", headers=auth).content.decode()
    assert "stripe_reconcile_last_success_age_seconds +Inf" in before
    fake.add_event(paid_event(customer))
    stranger = session_of(paid_event(customer, created=int(time.time()) - 3600))
    stranger["client_reference_id"] = "nobody"
    fake.add_session(stranger)

    reconcile.reconcile_run()
    body = client.get("/metrics", headers=auth).content.decode()

    assert 'stripe_reconcile_caught_up_total{kind="event"} 1.0' in body
    assert 'stripe_reconcile_caught_up_total{kind="session"} 0.0' in body
    assert "stripe_paid_sessions_without_agent 1.0" in body
    (line,) = [
        row for row in body.splitlines() if row.startswith("stripe_reconcile_last_success_age")
    ]
    age = float(line.split()[1])
    assert 0 <= age < 60 and not math.isinf(age)


def test_the_admin_overview_shows_the_catch_up(fake, customer, admin_client):
    fake.add_event(paid_event(customer))
    reconcile.reconcile_run()

    page = admin_client.get("/admin/provisioning/provisioningjob/").content.decode()

    assert "Stripe events caught up (no webhook)" in page
    assert "paid sessions without agent" in page
    assert "/admin/billing/stripecatchup/" in page
    listing = admin_client.get("/admin/billing/stripecatchup/")
    assert listing.status_code == 200
    assert StripeCatchUp.objects.get().stripe_id in listing.content.decode()


# --- billing drift ----------------------------------------------------------------------------


def subscription_in_stripe(fake: FakeStripeAPI, agent: Agent, status: str) -> dict[str, Any]:
    subscription = sample_events.build_subscription(
        subscription_id=agent.stripe_subscription_id, customer_id=agent.stripe_customer_id
    )
    subscription["status"] = status
    fake.subscriptions[agent.stripe_subscription_id] = subscription
    return subscription


def bought(customer: Any, deliver: Any) -> Agent:
    event = paid_event(customer)
    event["data"]["object"]["subscription"] = sample_events.stripe_id("sub_")
    assert deliver(event).status_code == 200
    return Agent.objects.get(stripe_checkout_session_id=event["data"]["object"]["id"])


@pytest.mark.parametrize("status", ["canceled", "incomplete_expired"])
def test_an_agent_whose_subscription_ended_unnoticed_is_ended_once(fake, customer, deliver, status):
    agent = bought(customer, deliver)
    subscription = subscription_in_stripe(fake, agent, status)

    report = reconcile.reconcile_run()

    assert (report.subscriptions_checked, report.agents_ended) == (1, 1)
    agent.refresh_from_db()
    assert agent.is_ended
    assert agent.end_reason == "subscription ended while events were missed"
    assert ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION).count() == 1

    # The lost event turns up after all; the next check finds nothing more to do.
    late = sample_events.build_event("customer.subscription.deleted", subscription)
    assert deliver(late).status_code == 200
    again = reconcile.reconcile_run()

    assert again.agents_ended == 0
    assert ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION).count() == 1


def test_a_subscription_still_billed_after_its_agent_ended_is_an_operator_case(
    fake, customer, deliver
):
    from provisioning import services as provisioning_services
    from provisioning.models import Actor

    agent = bought(customer, deliver)
    provisioning_services.agent_end(agent_id=agent.pk, actor=Actor.SYSTEM, reason="abuse")
    subscription_in_stripe(fake, agent, "active")

    report = reconcile.reconcile_run()
    reconcile.reconcile_run()

    assert report.drift_cases == [agent.stripe_subscription_id]
    case = BillingDrift.objects.get()
    assert (case.stripe_subscription_id, case.agent_id, case.subscription_status) == (
        agent.stripe_subscription_id,
        str(agent.pk),
        "active",
    )
    assert case.resolved_at is None
    agent.refresh_from_db()
    assert agent.end_reason == "abuse"  # nothing guessed, nothing changed


def test_an_agent_up_with_an_active_subscription_is_left_alone(fake, customer, deliver):
    agent = bought(customer, deliver)
    subscription_in_stripe(fake, agent, "active")

    report = reconcile.reconcile_run()

    assert (report.subscriptions_checked, report.agents_ended, report.drift_cases) == (1, 0, [])
    agent.refresh_from_db()
    assert not agent.is_ended
    assert not BillingDrift.objects.exists()


def test_the_drift_check_takes_a_batch_per_run_and_comes_round_again(fake, customer, deliver):
    agents = sorted(
        (bought(customer, deliver) for _ in range(3)), key=lambda a: a.stripe_subscription_id
    )
    for agent in agents:
        subscription_in_stripe(fake, agent, "active")
    client = reconcile.services.stripe_client()

    def one_run() -> list[str]:
        before = len(fake.calls)
        reconcile.subscriptions_check(
            client=client, now=timezone.now(), report=reconcile.ReconcileReport(), batch=2
        )
        return [path.rsplit("/", 1)[1] for _m, path, _q in fake.calls[before:]]

    ids = [a.stripe_subscription_id for a in agents]
    assert one_run() == ids[:2]
    assert one_run() == ids[2:]
    assert one_run() == ids[:2]


def test_a_subscription_stripe_does_not_know_is_skipped(fake, customer, deliver):
    bought(customer, deliver)  # its subscription is not in the fake: 404

    report = reconcile.reconcile_run()

    assert report.ok
    assert report.subscriptions_checked == 0
    assert state().last_success_at is not None
