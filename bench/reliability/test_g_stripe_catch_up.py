"""The webhook endpoint is down while orders are paid and subscriptions cancelled; then it
recovers, Stripe's late redeliveries arrive while the workers' Stripe catch-up runs: every paid
order makes exactly one agent that reaches running, every cancelled one ends once, nothing is
doubled or lost.

Its own small stack (2 web workers, 2 workers) with a loopback Stripe API (tests/fakes/stripe.py
behind an HTTP server) and the catch-up every 2 s. During the outage that API answers 500 too, so
nothing is caught up before the recovery. Knob: RELIABILITY_CATCHUP_ORDERS (8; a third as many
earlier agents are cancelled).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from bench.reliability import checks
from bench.reliability.conftest import figure, knob, wait_for
from bench.reliability.stack import Stack
from tests.fakes.stripe import FakeStripeAPI


class LoopbackStripe:
    """FakeStripeAPI served over HTTP on 127.0.0.1; `down` makes every call a 500."""

    def __init__(self) -> None:
        self.api = FakeStripeAPI()
        self.down = True
        api, outer = self.api, self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if outer.down:
                    body, status = b'{"error": {"type": "api_error", "message": "down"}}', 500
                else:
                    text, status, _headers = api.request("get", self.path, dict(self.headers))
                    body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> LoopbackStripe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stripe_api() -> Iterator[LoopbackStripe]:
    with LoopbackStripe() as fake:
        yield fake


@pytest.fixture
def catch_up_stack(
    live_db: str, hetzner: Any, issuer: Any, workdir: Any, stripe_api: LoopbackStripe
) -> Iterator[Stack]:
    s = Stack(
        db_url=live_db,
        hetzner_url=hetzner.url,
        issuer=issuer,
        workdir=workdir / "catch-up",
        chaos_dir=workdir / "catch-up-chaos",
        workers=2,
        gunicorn_workers=2,
        extra_env={"STRIPE_API_BASE": stripe_api.url, "STRIPE_RECONCILE_INTERVAL_SECONDS": "2"},
    )
    s.start()
    yield s
    s.stop()


def _post(client: httpx.Client, url: str, event: dict[str, Any]) -> int | str:
    body = checks.encode(event)
    try:
        return client.post(
            url,
            content=body,
            headers={"Content-Type": "application/json", "Stripe-Signature": checks.sign(body)},
        ).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def test_orders_and_cancellations_missed_by_the_webhook_are_caught_up_exactly_once(
    catch_up_stack, stripe_api, make_users
):
    from billing import sample_events
    from billing.models import BillingDrift, StripeCatchUp, UnfulfillablePayment
    from provisioning.models import Agent, JobKind, JobStatus, ProvisioningJob

    stack = catch_up_stack
    n = knob("RELIABILITY_CATCHUP_ORDERS", 8)
    k = max(1, n // 3)
    users = make_users("catchup", n + k)
    running = ProvisioningJob.objects.filter(kind=JobKind.PROVISION, status=JobStatus.RUNNING)

    # Before the outage: k agents bought through the webhook, built and running.
    earlier = [checks.checkout_event(u, f"earlier {i}") for i, u in enumerate(users[n:])]
    earlier_sessions = [e["data"]["object"]["id"] for e in earlier]
    with httpx.Client(timeout=60) as client:
        assert [_post(client, stack.webhook_url, e) for e in earlier] == [200] * k
    wait_for(
        f"{k} earlier agents running",
        lambda: running.filter(agent__stripe_checkout_session_id__in=earlier_sessions).count() == k,
        timeout=90,
    )

    # The outage: n orders paid and k subscriptions cancelled; Stripe has the events, we do not.
    missed: list[dict[str, Any]] = []
    orders = [checks.checkout_event(u, f"missed {i}") for i, u in enumerate(users[:n])]
    for event in orders:
        session = event["data"]["object"]
        stripe_api.api.add_session({**session, "status": "complete"})
        subscription = sample_events.build_subscription(
            subscription_id=session["subscription"], customer_id=session["customer"]
        )
        stripe_api.api.subscriptions[session["subscription"]] = {**subscription, "status": "active"}
    for agent in Agent.objects.filter(stripe_checkout_session_id__in=earlier_sessions):
        subscription = sample_events.build_subscription(
            subscription_id=agent.stripe_subscription_id, customer_id=agent.stripe_customer_id
        )
        stripe_api.api.subscriptions[agent.stripe_subscription_id] = subscription  # canceled
        missed.append(sample_events.build_event("customer.subscription.deleted", subscription))
    missed += orders
    for event in missed:
        stripe_api.api.add_event(event)
    time.sleep(3)  # the catch-up tries during the outage and gets 500s
    assert not Agent.objects.filter(
        stripe_checkout_session_id__in=[o["data"]["object"]["id"] for o in orders]
    ).exists()

    # Recovery: Stripe answers again, and its late redeliveries (half the events, some twice,
    # in any order) arrive while the catch-up runs.
    late = random.sample(missed, len(missed) // 2) * 2
    random.shuffle(late)
    statuses: list[int | str] = []
    t0 = time.monotonic()
    stripe_api.down = False

    def redeliver(events: list[dict[str, Any]]) -> None:
        with httpx.Client(timeout=60) as client:
            for event in events:
                statuses.append(_post(client, stack.webhook_url, event))

    threads = [threading.Thread(target=redeliver, args=(late[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    order_sessions = [o["data"]["object"]["id"] for o in orders]
    earlier_agents = Agent.objects.filter(stripe_checkout_session_id__in=earlier_sessions)
    deprovisioned = ProvisioningJob.objects.filter(
        agent__in=earlier_agents, kind=JobKind.DEPROVISION, status=JobStatus.RUNNING
    )
    wait_for(
        f"{n} caught-up orders running and {k} cancelled agents deprovisioned",
        lambda: (
            running.filter(agent__stripe_checkout_session_id__in=order_sessions).count() == n
            and deprovisioned.count() == k
        ),
        timeout=100,
    )
    took = time.monotonic() - t0

    agents = Agent.objects.filter(stripe_checkout_session_id__in=order_sessions)
    provisions = ProvisioningJob.objects.filter(agent__in=agents, kind=JobKind.PROVISION)
    deprovisions = ProvisioningJob.objects.filter(
        agent__in=earlier_agents, kind=JobKind.DEPROVISION
    )
    doubled = (agents.count() - n) + (provisions.count() - n) + (deprovisions.count() - k)
    lost = n - running.filter(agent__in=agents).count() + k - deprovisioned.count()
    never_redelivered = {e["id"] for e in missed} - {e["id"] for e in late}
    caught_up = StripeCatchUp.objects.filter(stripe_id__in=[e["id"] for e in missed]).count()
    figure(
        f"[catch-up] {n} orders and {k} cancellations missed by the webhook, "
        f"{len(late)} late redeliveries, {caught_up} events caught up by reconciliation: "
        f"{doubled} doubled, {lost} lost; "
        f"recovery to last agent running/ended {took:.1f}s"
    )
    assert statuses == [200] * len(late)
    # Events Stripe never redelivered reached us through the catch-up alone.
    assert caught_up >= len(never_redelivered)
    assert (doubled, lost) == (0, 0)
    assert all(a.is_ended for a in earlier_agents)
    assert not UnfulfillablePayment.objects.filter(checkout_session_id__in=order_sessions).exists()
    assert not BillingDrift.objects.filter(
        stripe_subscription_id__in=[a.stripe_subscription_id for a in agents]
    ).exists()
