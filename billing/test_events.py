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


# ---------------------------------------------------------------------------------------------
# the events that end an agent (and the charge a dispute is about)

ENDING_EVENT_TYPES = (
    "customer.subscription.deleted",
    "charge.refunded",
    "charge.dispute.created",
)


def _amount_and_currency() -> tuple[int, str]:
    amount = getattr(settings, "STRIPE_PRICE_AMOUNT", None) or 2000
    currency = getattr(settings, "STRIPE_PRICE_CURRENCY", "") or "usd"
    return int(amount), str(currency)


def build_subscription(
    *,
    subscription_id: str,
    customer_id: str,
    status: str = "canceled",
    livemode: bool = False,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A `subscription` object as Stripe renders it in `customer.subscription.deleted`."""
    now = int(time.time())
    amount, currency = _amount_and_currency()
    started = now - 30 * 86400
    ended = status == "canceled"
    return {
        "id": subscription_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": started,
        "billing_cycle_anchor_config": None,
        "billing_mode": {"flexible": None, "type": "classic"},
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": now if ended else None,
        "cancellation_details": {
            "comment": None,
            "feedback": None,
            "reason": "cancellation_requested" if ended else None,
        },
        "collection_method": "charge_automatically",
        "created": started,
        "currency": currency,
        "customer": customer_id,
        "days_until_due": None,
        "default_payment_method": stripe_id("pm_"),
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "ended_at": now if ended else None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": stripe_id("si_", 14),
                    "object": "subscription_item",
                    "created": started,
                    "current_period_end": started + 30 * 86400,
                    "current_period_start": started,
                    "discounts": [],
                    "metadata": {},
                    "price": {
                        "id": getattr(settings, "STRIPE_PRICE_ID", "") or stripe_id("price_"),
                        "object": "price",
                        "active": True,
                        "currency": currency,
                        "livemode": livemode,
                        "recurring": {"interval": "month", "interval_count": 1},
                        "type": "recurring",
                        "unit_amount": amount,
                    },
                    "quantity": 1,
                    "subscription": subscription_id,
                    "tax_rates": [],
                }
            ],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/subscription_items?subscription={subscription_id}",
        },
        "latest_invoice": stripe_id("in_"),
        "livemode": livemode,
        "metadata": metadata or {},
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": started,
        "status": status,
        "test_clock": None,
        "transfer_data": None,
        "trial_end": None,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": None,
    }


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
    now = int(time.time())
    amount, currency = _amount_and_currency()
    charge_id = charge_id or stripe_id("ch_")
    return {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": stripe_id("txn_"),
        "billing_details": {
            "address": {
                "city": None,
                "country": "US",
                "line1": None,
                "line2": None,
                "postal_code": "10001",
                "state": None,
            },
            "email": None,
            "name": None,
            "phone": None,
            "tax_id": None,
        },
        "calculated_statement_descriptor": "AGENTS",
        "captured": True,
        "created": now - 3600,
        "currency": currency,
        "customer": customer_id,
        "description": "Subscription creation",
        "destination": None,
        "dispute": None,
        "disputed": disputed,
        "failure_balance_transaction": None,
        "failure_code": None,
        "failure_message": None,
        "fraud_details": {},
        "livemode": livemode,
        "metadata": {},
        "on_behalf_of": None,
        "outcome": {
            "advice_code": None,
            "network_advice_code": None,
            "network_decline_code": None,
            "network_status": "approved_by_network",
            "reason": None,
            "risk_level": "normal",
            "risk_score": 32,
            "seller_message": "Payment complete.",
            "type": "authorized",
        },
        "paid": True,
        "payment_intent": payment_intent_id or stripe_id("pi_"),
        "payment_method": stripe_id("pm_"),
        "payment_method_details": {
            "card": {
                "brand": "visa",
                "country": "US",
                "exp_month": 12,
                "exp_year": 2030,
                "funding": "credit",
                "last4": "4242",
                "network": "visa",
            },
            "type": "card",
        },
        "radar_options": {},
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": f"https://pay.stripe.com/receipts/invoices/{stripe_id('')}",
        "refunded": amount_refunded >= amount,
        "review": None,
        "shipping": None,
        "source": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "succeeded",
        "transfer_data": None,
        "transfer_group": None,
    }


def build_dispute(
    *, charge_id: str, payment_intent_id: str, livemode: bool = False
) -> dict[str, Any]:
    """A `dispute` object as `charge.dispute.created` carries it: the charge only by id."""
    now = int(time.time())
    amount, currency = _amount_and_currency()
    return {
        "id": stripe_id("dp_"),
        "object": "dispute",
        "amount": amount,
        "balance_transactions": [],
        "charge": charge_id,
        "created": now,
        "currency": currency,
        "enhanced_eligibility_types": [],
        "evidence": {
            "access_activity_log": None,
            "billing_address": None,
            "cancellation_policy": None,
            "customer_email_address": None,
            "customer_name": None,
            "product_description": None,
            "uncategorized_text": None,
        },
        "evidence_details": {
            "due_by": now + 7 * 86400,
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        },
        "is_charge_refundable": False,
        "livemode": livemode,
        "metadata": {},
        "payment_intent": payment_intent_id,
        "payment_method_details": {
            "card": {"brand": "visa", "case_type": "chargeback", "network_reason_code": "10.4"},
            "type": "card",
        },
        "reason": "fraudulent",
        "status": "needs_response",
    }


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
