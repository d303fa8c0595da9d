"""Realistic Stripe events, signed with Stripe's real scheme: what `stripe trigger` does for us.

Used by `manage.py stripe_send_test_event`, the local stand-in checkout page and the tests.
Nothing here is trusted by the webhook: events are verified exactly as Stripe's would be.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import string
import time
from typing import Any

import httpx
from django.conf import settings
from django.urls import reverse

_ALPHABET = string.ascii_letters + string.digits

CHECKOUT_EVENT_TYPES = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
)


def stripe_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


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
    amount = getattr(settings, "STRIPE_PRICE_AMOUNT", None) or 2000
    currency = getattr(settings, "STRIPE_PRICE_CURRENCY", "") or "usd"
    email = getattr(user, "email", "") or f"{user.get_username()}@example.com"
    return {
        "id": session_id or stripe_id(f"cs_{mode}_a1", 58),
        "object": "checkout.session",
        "adaptive_pricing": {"enabled": False},
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": amount,
        "amount_total": amount,
        "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
        "billing_address_collection": None,
        "cancel_url": f"{settings.PUBLIC_BASE_URL}/agents/",
        "client_reference_id": str(user.pk),
        "client_secret": None,
        "collected_information": None,
        "consent": None,
        "consent_collection": None,
        "created": now - 60,
        "currency": currency,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer_id or stripe_id("cus_", 14),
        "customer_creation": "always",
        "customer_details": {
            "address": None,
            "email": email,
            "name": user.get_username(),
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        },
        "customer_email": None,
        "discounts": [],
        "expires_at": now + 86400,
        "invoice": stripe_id("in_"),
        "invoice_creation": None,
        "livemode": livemode,
        "locale": None,
        "metadata": {"agent_name": agent_name, "region": region},
        "mode": "subscription",
        "origin_context": None,
        "payment_intent": None,
        "payment_link": None,
        "payment_method_collection": "always",
        "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
        "payment_method_types": ["card"],
        "payment_status": "paid" if paid else "unpaid",
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": {
            "allow_redisplay_filters": ["always"],
            "payment_method_remove": "disabled",
            "payment_method_save": None,
        },
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": "complete",
        "submit_type": None,
        "subscription": subscription_id or stripe_id("sub_"),
        "success_url": f"{settings.PUBLIC_BASE_URL}/agents/",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": None,
        "wallet_options": None,
    }


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


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header value: `t=<ts>,v1=HMAC-SHA256(secret, "<ts>.<body>")`."""
    ts = int(time.time()) if timestamp is None else timestamp
    signed = f"{ts}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, indent=2).encode()  # Stripe sends pretty-printed JSON


def webhook_path(endpoint_uuid: str | None = None) -> str:
    return reverse(
        "djstripe:djstripe_webhook_by_uuid",
        kwargs={"uuid": endpoint_uuid or settings.STRIPE_WEBHOOK_UUID},
    )


def webhook_url(endpoint_uuid: str | None = None) -> str:
    return settings.PUBLIC_BASE_URL + webhook_path(endpoint_uuid)


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
