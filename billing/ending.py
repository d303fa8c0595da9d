"""Stripe events that end an agent: a subscription deleted, a payment fully refunded or disputed.

Each runs inside dj-stripe's webhook transaction (receivers do) and reads only the signed
payload and our database, never the Stripe API. The agent is found by the ids the payload
carries:

- `customer.subscription.deleted`: the subscription id → `Agent.stripe_subscription_id`.
- `charge.refunded`: the charge's customer → the one agent of that customer that is not ended
  yet (each Checkout session makes its own Customer). A Charge names no invoice or subscription
  (since API 2025-03-31), and webhook payloads never carry expanded objects.
- `charge.dispute.created`: a dispute names only its charge and payment intent, so the charge's
  owner comes from an earlier signed `charge.*` event (`KnownCharge`), then as for a refund.

When zero or several agents match, nothing is ended (guessing could switch off somebody
else's agent): the event is recorded as `UnmatchedEndingEvent` for operators and Stripe gets a
200. Ending itself is `provisioning.services.agent_end`, idempotent per agent and per event
(it locks the agent's row), so redeliveries and concurrent ending events make one deprovision.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.models import (
    BillingDrift,
    DriftReason,
    KnownCharge,
    UnmatchedEndingEvent,
    UnmatchedReason,
)
from provisioning import services as provisioning_services
from provisioning.models import Actor, Agent, ProvisioningJob

logger = logging.getLogger(__name__)

# The events that end an agent, and the plain reason each gives (Agent.end_reason, JobEvent).
ENDING_REASONS = {
    "customer.subscription.deleted": "subscription cancelled",
    "charge.refunded": "payment refunded",
    "charge.dispute.created": "payment disputed",
}
# Signed charge events whose owner we remember for a later dispute.
CHARGE_RECORD_EVENTS = ("charge.succeeded", "charge.refunded")
# How many candidates a match reads at most (the detail lists them for operators).
MATCH_LIMIT = 20


@dataclass(frozen=True)
class EndingResult:
    agent: Agent | None = None
    job: ProvisioningJob | None = None  # the agent's deprovision job
    unmatched: UnmatchedEndingEvent | None = None
    skipped: str = ""  # why nothing was done on purpose (a partial refund)


class _Unmatched(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _id_of(value: object) -> str:
    """A Stripe reference as a string id, whether it came expanded or bare."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else ""


def is_fully_refunded(charge: dict[str, Any]) -> bool:
    if charge.get("refunded") is True:
        return True
    amount, refunded = charge.get("amount"), charge.get("amount_refunded")
    return (
        isinstance(amount, int) and isinstance(refunded, int) and amount > 0 and refunded >= amount
    )


# ---------------------------------------------------------------------------------------------
# matching


def _pick(candidates: Iterable[Agent], *, what: str) -> Agent:
    """The one agent `what` names: the single one, or the single one not ended yet.

    All of them ended: the first (ending it again changes nothing). Raises _Unmatched.
    """
    agents = list(candidates)
    if not agents:
        raise _Unmatched(UnmatchedReason.NO_AGENT, f"no agent has {what}")
    if len(agents) == 1:
        return agents[0]
    active = [a for a in agents if not a.is_ended]
    if len(active) == 1:
        return active[0]
    if not active:
        return agents[0]
    listed = ", ".join(str(a.pk) for a in active)
    raise _Unmatched(
        UnmatchedReason.SEVERAL_AGENTS,
        f"{what} matches {len(active)} agents that are not ended: {listed}",
    )


def _by_subscription(subscription_id: str) -> Agent:
    return _pick(
        Agent.objects.filter(stripe_subscription_id=subscription_id).order_by("-created_at")[
            :MATCH_LIMIT
        ],
        what=f"subscription {subscription_id}",
    )


def _by_customer(customer_id: str) -> Agent:
    return _pick(
        Agent.objects.filter(stripe_customer_id=customer_id).order_by("-created_at")[:MATCH_LIMIT],
        what=f"customer {customer_id}",
    )


def _by_charge_owner(*, subscription_id: str, customer_id: str, what: str) -> Agent:
    """A charge's agent: its subscription when known and matching, else its customer."""
    if subscription_id:
        try:
            return _by_subscription(subscription_id)
        except _Unmatched as exc:
            if exc.reason != UnmatchedReason.NO_AGENT or not customer_id:
                raise
    if customer_id:
        return _by_customer(customer_id)
    raise _Unmatched(UnmatchedReason.NO_AGENT, f"{what} names no customer or subscription")


# ---------------------------------------------------------------------------------------------
# the events


def subscription_deleted(
    *, event_id: str, event_type: str, subscription: dict[str, Any]
) -> EndingResult:
    subscription_id = _id_of(subscription)
    ids = {
        "stripe_object_id": subscription_id,
        "stripe_customer_id": _id_of(subscription.get("customer")),
        "stripe_subscription_id": subscription_id,
    }
    try:
        if not subscription_id:
            raise _Unmatched(UnmatchedReason.NO_AGENT, "payload has no subscription id")
        agent = _by_subscription(subscription_id)
    except _Unmatched as exc:
        return _unmatched(event_id, event_type, subscription, exc, ids)
    return _end(agent, event_id=event_id, event_type=event_type)


def charge_refunded(*, event_id: str, event_type: str, charge: dict[str, Any]) -> EndingResult:
    charge_id = _id_of(charge)
    known_charge_record(event_id=event_id, charge=charge)
    if not is_fully_refunded(charge):
        logger.info(
            "%s: charge %s partially refunded (%s of %s): the agent stays",
            event_id,
            charge_id,
            charge.get("amount_refunded"),
            charge.get("amount"),
        )
        return EndingResult(skipped="partial refund")
    customer_id = _id_of(charge.get("customer"))
    ids = {
        "stripe_object_id": charge_id,
        "stripe_customer_id": customer_id,
        "stripe_charge_id": charge_id,
    }
    try:
        agent = _by_charge_owner(
            subscription_id="", customer_id=customer_id, what=f"charge {charge_id}"
        )
    except _Unmatched as exc:
        return _unmatched(event_id, event_type, charge, exc, ids)
    return _end(agent, event_id=event_id, event_type=event_type)


def dispute_created(*, event_id: str, event_type: str, dispute: dict[str, Any]) -> EndingResult:
    dispute_id = _id_of(dispute)
    charge = dispute.get("charge")
    charge_id = _id_of(charge)
    payment_intent_id = _id_of(dispute.get("payment_intent"))
    known = None
    if charge_id:
        known = KnownCharge.objects.filter(charge_id=charge_id).first()
    if known is None and payment_intent_id:
        known = KnownCharge.objects.filter(payment_intent_id=payment_intent_id).first()
    # Rows recorded before charges stopped naming their invoice may still know the subscription.
    subscription_id = known.stripe_subscription_id if known else ""
    customer_id = known.stripe_customer_id if known else ""
    ids = {
        "stripe_object_id": dispute_id,
        "stripe_customer_id": customer_id,
        "stripe_subscription_id": subscription_id,
        "stripe_charge_id": charge_id,
    }
    try:
        if not (subscription_id or customer_id):
            raise _Unmatched(
                UnmatchedReason.NO_AGENT,
                f"dispute {dispute_id} is about charge {charge_id or '?'} (payment intent "
                f"{payment_intent_id or '?'}), which no signed charge event told us about",
            )
        agent = _by_charge_owner(
            subscription_id=subscription_id,
            customer_id=customer_id,
            what=f"the customer of charge {charge_id}",
        )
    except _Unmatched as exc:
        return _unmatched(event_id, event_type, dispute, exc, ids)
    return _end(agent, event_id=event_id, event_type=event_type)


def wrong_livemode(
    *, event_id: str, event_type: str, payload: dict[str, Any], livemode: bool
) -> EndingResult:
    """An ending event from the other Stripe mode (test vs live): never end anything on it."""
    error = _Unmatched(
        UnmatchedReason.WRONG_LIVEMODE,
        f"livemode={livemode} but this service runs with STRIPE_LIVE_MODE="
        f"{settings.STRIPE_LIVE_MODE}",
    )
    ids = {"stripe_object_id": _id_of(payload)}
    return _unmatched(event_id, event_type, payload, error, ids)


def known_charge_record(*, event_id: str, charge: dict[str, Any]) -> KnownCharge | None:
    """Remember whose a charge is (first signed event wins; a redelivery adds nothing)."""
    charge_id = _id_of(charge)
    if not charge_id:
        return None
    existing = KnownCharge.objects.filter(charge_id=charge_id).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return KnownCharge.objects.create(
                charge_id=charge_id[:255],
                payment_intent_id=_id_of(charge.get("payment_intent"))[:255],
                stripe_customer_id=_id_of(charge.get("customer"))[:255],
                stripe_event_id=event_id[:255],
            )
    except IntegrityError:  # a concurrent delivery recorded it first
        return KnownCharge.objects.filter(charge_id=charge_id).first()


# ---------------------------------------------------------------------------------------------
# outcomes


def _end(agent: Agent, *, event_id: str, event_type: str) -> EndingResult:
    reason = ENDING_REASONS[event_type]
    job = provisioning_services.agent_end(
        agent_id=agent.pk, actor=Actor.STRIPE, reason=reason, stripe_event_id=event_id
    )
    logger.info(
        "%s (%s): agent %s ended (%s); deprovision job %s",
        event_type,
        event_id,
        agent.pk,
        reason,
        job.pk,
    )
    return EndingResult(agent=agent, job=job)


def _unmatched(
    event_id: str,
    event_type: str,
    payload: dict[str, Any],
    error: _Unmatched,
    ids: dict[str, str],
) -> EndingResult:
    logger.warning(
        "ending event %s (%s) matched no single agent: %s — %s",
        event_id,
        event_type,
        error.reason,
        error.detail,
    )
    fields = {
        "event_type": event_type,
        "reason": error.reason,
        "detail": f"{ENDING_REASONS.get(event_type, event_type)}: {error.detail}",
        "payload": payload,
        **{name: value[:255] for name, value in ids.items()},
    }
    try:
        with transaction.atomic():
            row = UnmatchedEndingEvent.objects.create(stripe_event_id=event_id, **fields)
    except IntegrityError:
        row = UnmatchedEndingEvent.objects.get(stripe_event_id=event_id)
    return EndingResult(unmatched=row)


# Stripe statuses of a subscription that will never bill again.
SUBSCRIPTION_ENDED_STATUSES = ("canceled", "incomplete_expired")
SUBSCRIPTION_BILLING_STATUSES = ("active", "trialing", "past_due")
DRIFT_ENDED_REASON = "subscription ended while events were missed"


def subscription_ended_unnoticed(*, agent: Agent, subscription: dict[str, Any]) -> EndingResult:
    """An agent still up although Stripe says its subscription ended (its ending event was lost):
    end it through the same path as the event would have, with no event id."""
    job = provisioning_services.agent_end(
        agent_id=agent.pk, actor=Actor.STRIPE, reason=DRIFT_ENDED_REASON
    )
    logger.warning(
        "subscription %s is %s in Stripe but agent %s was up: ended; deprovision job %s",
        _id_of(subscription),
        subscription.get("status"),
        agent.pk,
        job.pk,
    )
    return EndingResult(agent=agent, job=job)


def billing_after_end_record(*, agent: Agent, subscription: dict[str, Any]) -> BillingDrift:
    """A subscription Stripe still bills whose agent has ended: one operator case per
    subscription (a later check finds it and adds nothing)."""
    subscription_id = _id_of(subscription)
    status = str(subscription.get("status") or "")
    fields = {
        "event_type": "billing.drift",
        "reason": DriftReason.ACTIVE_AFTER_END,
        "stripe_subscription_id": subscription_id[:255],
        "stripe_customer_id": _id_of(subscription.get("customer"))[:255],
        "agent_id": str(agent.pk),
        "subscription_status": status[:32],
        "detail": (
            f"subscription {subscription_id} is {status} in Stripe but agent {agent.pk} ended "
            f"({agent.end_reason or 'no reason recorded'}): the customer is still billed"
        ),
        "payload": subscription,
    }
    case_id = f"drift:{subscription_id}"[:255]
    try:
        with transaction.atomic():
            case, created = BillingDrift.objects.get_or_create(
                stripe_event_id=case_id, defaults=fields
            )
    except IntegrityError:
        case, created = BillingDrift.objects.get(stripe_event_id=case_id), False
    if created:
        logger.warning("billing drift: %s", fields["detail"])
    return case


def end_if_already_cancelled(*, agent: Agent) -> EndingResult | None:
    """A new agent whose subscription's deletion arrived first (Stripe delivers out of order):
    end it now with that event, and close the event's unmatched row.

    Only an exact subscription id counts: a customer-only match would be a guess.
    """
    if not agent.stripe_subscription_id:
        return None
    row = (
        UnmatchedEndingEvent.objects.filter(
            stripe_subscription_id=agent.stripe_subscription_id,
            reason=UnmatchedReason.NO_AGENT,
            resolved_at__isnull=True,
        )
        .order_by("created_at")
        .first()
    )
    if row is None:
        return None
    result = _end(agent, event_id=row.stripe_event_id, event_type=row.event_type)
    UnmatchedEndingEvent.objects.filter(pk=row.pk, resolved_at__isnull=True).update(
        resolved_at=timezone.now(),
        note=f"Ended agent {agent.pk} when its purchase arrived after this event.",
    )
    return result
