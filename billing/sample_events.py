"""Realistic Stripe events, signed with Stripe's real scheme: what `stripe trigger` does for us.

Every object starts from a payload captured from Stripe (billing/sample_payloads/, named
`<event type>__<variant>.json`) and gets fresh ids, times, the price, the customer and our
metadata filled in. Used by `manage.py stripe_send_test_event`, the local stand-in checkout page
and the tests. Nothing here is trusted by the webhook: events are verified exactly as Stripe's
would be.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
import string
import time
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings

from billing.webhook import webhook_url

PAYLOADS = Path(__file__).resolve().parent / "sample_payloads"
_ALPHABET = string.ascii_letters + string.digits
DAY = 86400

CHECKOUT_EVENT_TYPES = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
)
ENDING_EVENT_TYPES = (
    "customer.subscription.deleted",
    "charge.refunded",
    "charge.dispute.created",
)


def stripe_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def price_amount() -> int:
    """The price in cents (STRIPE_PRICE_AMOUNT; 2000 when the price is not pinned)."""
    return int(settings.STRIPE_PRICE_AMOUNT or 2000)


def price_currency() -> str:
    return str(settings.STRIPE_PRICE_CURRENCY or "usd")


@functools.cache
def _payload_text(name: str) -> str:
    return (PAYLOADS / f"{name}.json").read_text()


def load_payload(name: str) -> dict[str, Any]:
    """A fresh copy of the captured event `billing/sample_payloads/<name>.json`."""
    payload: dict[str, Any] = json.loads(_payload_text(name))  # parsed afresh: a private copy
    return payload


def _sample_object(name: str) -> dict[str, Any]:
    sample: dict[str, Any] = load_payload(name)["data"]["object"]
    return sample


# ---------------------------------------------------------------------------------------------
# objects


def build_checkout_session(
    *,
    user: Any,
    agent_name: str,
    region: str,
    session_id: str | None = None,
    paid: bool = True,
    livemode: bool = False,
    customer_id: str | None = None,
    subscription_id: str | None = None,
) -> dict[str, Any]:
    """A `checkout.session` object as Stripe renders it for our subscription checkout."""
    now = int(time.time())
    mode = "live" if livemode else "test"
    amount = price_amount()
    session = _sample_object("checkout.session.completed__paid")
    session["customer_details"].update(
        email=getattr(user, "email", "") or f"{user.get_username()}@example.com",
        name=user.get_username(),
    )
    session.update(
        id=session_id or stripe_id(f"cs_{mode}_a1", 58),
        amount_subtotal=amount,
        amount_total=amount,
        cancel_url=f"{settings.PUBLIC_BASE_URL}/agents/",
        success_url=f"{settings.PUBLIC_BASE_URL}/agents/",
        client_reference_id=str(user.pk),
        created=now - 60,
        expires_at=now + DAY,
        currency=price_currency(),
        customer=customer_id or stripe_id("cus_", 14),
        invoice=stripe_id("in_"),
        livemode=livemode,
        metadata={"agent_name": agent_name, "region": region},
        payment_status="paid" if paid else "unpaid",
        subscription=subscription_id or stripe_id("sub_"),
    )
    return session


def build_subscription(
    *,
    subscription_id: str,
    customer_id: str,
    livemode: bool = False,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A canceled `subscription` object as Stripe renders it in `customer.subscription.deleted`."""
    now = int(time.time())
    started = now - 30 * DAY
    currency = price_currency()
    subscription = _sample_object("customer.subscription.deleted__canceled")
    (item,) = subscription["items"]["data"]
    item.update(
        id=stripe_id("si_", 14),
        created=started,
        current_period_start=started,
        current_period_end=started + 30 * DAY,
        subscription=subscription_id,
    )
    item["price"].update(
        id=settings.STRIPE_PRICE_ID or stripe_id("price_"),
        currency=currency,
        livemode=livemode,
        unit_amount=price_amount(),
    )
    subscription["items"]["url"] = f"/v1/subscription_items?subscription={subscription_id}"
    subscription.update(
        id=subscription_id,
        billing_cycle_anchor=started,
        created=started,
        start_date=started,
        canceled_at=now,
        ended_at=now,
        currency=currency,
        customer=customer_id,
        default_payment_method=stripe_id("pm_"),
        latest_invoice=stripe_id("in_"),
        livemode=livemode,
        metadata=metadata or {},
    )
    return subscription


def build_charge(
    *,
    customer_id: str,
    charge_id: str | None = None,
    payment_intent_id: str | None = None,
    amount_refunded: int = 0,
    disputed: bool = False,
    livemode: bool = False,
) -> dict[str, Any]:
    """A `charge` object for a subscription payment (API 2025-03-31+: no `invoice` field)."""
    amount = price_amount()
    charge = _sample_object("charge.succeeded__paid")
    charge.update(
        id=charge_id or stripe_id("ch_"),
        amount=amount,
        amount_captured=amount,
        amount_refunded=amount_refunded,
        refunded=amount_refunded >= amount,
        balance_transaction=stripe_id("txn_"),
        created=int(time.time()) - 3600,
        currency=price_currency(),
        customer=customer_id,
        disputed=disputed,
        livemode=livemode,
        payment_intent=payment_intent_id or stripe_id("pi_"),
        payment_method=stripe_id("pm_"),
        receipt_url=f"https://pay.stripe.com/receipts/invoices/{stripe_id('')}",
    )
    return charge


def build_dispute(
    *, charge_id: str, payment_intent_id: str, livemode: bool = False
) -> dict[str, Any]:
    """A `dispute` object as `charge.dispute.created` carries it: the charge only by id."""
    now = int(time.time())
    dispute = _sample_object("charge.dispute.created__needs_response")
    dispute["evidence_details"]["due_by"] = now + 7 * DAY
    dispute.update(
        id=stripe_id("dp_"),
        amount=price_amount(),
        charge=charge_id,
        created=now,
        currency=price_currency(),
        livemode=livemode,
        payment_intent=payment_intent_id,
    )
    return dispute


# ---------------------------------------------------------------------------------------------
# events


def build_event(
    event_type: str, obj: dict[str, Any], *, livemode: bool = False, event_id: str | None = None
) -> dict[str, Any]:
    """Wrap an object in a Stripe `event` envelope (API version = settings.STRIPE_API_VERSION)."""
    return {
        "id": event_id or stripe_id("evt_"),
        "object": "event",
        "api_version": settings.STRIPE_API_VERSION,
        "created": int(time.time()),
        "data": {"object": obj},
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def build_checkout_event(
    event_type: str,
    *,
    user: Any,
    agent_name: str,
    region: str,
    session_id: str | None = None,
    paid: bool = True,
    livemode: bool = False,
) -> dict[str, Any]:
    """A `checkout.session.*` event for one of our sessions.

    `paid` only matters for `checkout.session.completed` (an unpaid one waits for
    `async_payment_succeeded`, which is always paid; `async_payment_failed` never is).
    """
    if event_type not in CHECKOUT_EVENT_TYPES:
        raise ValueError(f"not a checkout session event: {event_type!r}")
    if event_type == "checkout.session.async_payment_succeeded":
        paid = True
    elif event_type in ("checkout.session.async_payment_failed", "checkout.session.expired"):
        paid = False
    session = build_checkout_session(
        user=user,
        agent_name=agent_name,
        region=region,
        session_id=session_id,
        paid=paid,
        livemode=livemode,
    )
    if event_type == "checkout.session.expired":
        session["status"] = "expired"
    return build_event(event_type, session, livemode=livemode)


def build_ending_events(
    event_type: str, *, agent: Any, partial: bool = False, livemode: bool = False
) -> list[dict[str, Any]]:
    """The events to send, in order, for an ending event about `agent` (like `stripe trigger`).

    `charge.dispute.created` comes after the `charge.succeeded` of the charge it disputes (a
    dispute names only its charge). `partial` makes `charge.refunded` a partial refund.
    """
    if event_type not in ENDING_EVENT_TYPES:
        raise ValueError(f"not an ending event: {event_type!r}")
    customer_id = agent.stripe_customer_id or stripe_id("cus_", 14)
    if event_type == "customer.subscription.deleted":
        subscription = build_subscription(
            subscription_id=agent.stripe_subscription_id or stripe_id("sub_"),
            customer_id=customer_id,
            livemode=livemode,
            metadata={"agent_name": agent.name, "region": agent.region},
        )
        return [build_event(event_type, subscription, livemode=livemode)]
    charge = build_charge(customer_id=customer_id, livemode=livemode)
    if event_type == "charge.refunded":
        charge["amount_refunded"] = charge["amount"] // 2 if partial else charge["amount"]
        charge["refunded"] = not partial
        return [build_event(event_type, charge, livemode=livemode)]
    dispute = build_dispute(
        charge_id=charge["id"], payment_intent_id=charge["payment_intent"], livemode=livemode
    )
    return [
        build_event("charge.succeeded", charge, livemode=livemode),
        build_event(event_type, dispute, livemode=livemode),
    ]


# ---------------------------------------------------------------------------------------------
# signing and sending


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header value: `t=<ts>,v1=HMAC-SHA256(secret, "<ts>.<body>")`."""
    ts = int(time.time()) if timestamp is None else timestamp
    signed = f"{ts}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, indent=2).encode()  # Stripe sends pretty-printed JSON


def post_event(
    event: dict[str, Any],
    *,
    url: str | None = None,
    secret: str | None = None,
    timeout: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Response:
    """Sign `event` and POST it to the webhook (default: our own, at PUBLIC_BASE_URL)."""
    body = encode(event)
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        "Stripe-Signature": sign(body, secret or settings.STRIPE_WEBHOOK_SECRET),
    }
    with httpx.Client(timeout=timeout, transport=transport) as client:
        return client.post(url or webhook_url(), content=body, headers=headers)
