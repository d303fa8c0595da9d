"""dj-stripe receivers. They run inside dj-stripe's webhook transaction, after its Event row.

They read only the signed payload (never the Stripe API: dj-stripe's own sync receivers for
the events handled here are disconnected in BillingConfig.ready) and hand it to billing.services
(purchases) or billing.ending (subscription deleted, full refund, dispute).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from django.conf import settings
from djstripe.event_handlers import djstripe_receiver

from billing import ending, services

logger = logging.getLogger(__name__)


class StripeEvent(Protocol):
    """What the receivers read of dj-stripe's Event row (dj-stripe ships no types)."""

    id: str
    type: str
    livemode: bool | None
    data: object  # the signed payload's `data`: {"object": {...}}


_Handler = TypeVar("_Handler", bound=Callable[..., None])


def _receiver(event_type: str) -> Callable[[_Handler], _Handler]:
    """dj-stripe's receiver decorator, typed: it connects the handler and returns it unchanged."""
    connect: Callable[[_Handler], _Handler] = djstripe_receiver(event_type)
    return connect


def _object_of(event: StripeEvent) -> dict[str, Any]:
    data = event.data or {}
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


_session_of = _object_of


def _other_mode(event: StripeEvent, obj: dict[str, Any]) -> bool:
    """Is this event (or its object) from the Stripe mode this service does not run in?"""
    live = bool(settings.STRIPE_LIVE_MODE)
    return bool(event.livemode) != live or bool(obj.get("livemode", event.livemode)) != live


def _ending_in_other_mode(event: StripeEvent, obj: dict[str, Any]) -> bool:
    """Checks an ending event's mode like purchases are checked; records a mismatch for operators."""
    if not _other_mode(event, obj):
        return False
    ending.wrong_livemode(
        event_id=event.id, event_type=event.type, payload=obj, livemode=bool(event.livemode)
    )
    return True


@_receiver("checkout.session.completed")
def checkout_session_completed_event(sender: object, event: StripeEvent, **kwargs: object) -> None:
    """Fulfil when paid now; an unpaid (delayed payment method) session waits for
    `async_payment_succeeded`."""
    session = _session_of(event)
    status = session.get("payment_status")
    if status not in services.PAID_STATUSES:
        logger.info(
            "%s: session %s payment_status=%r, waiting for async_payment_succeeded",
            event.id,
            session.get("id"),
            status,
        )
        return
    services.purchase_fulfil(
        event_id=event.id, event_type=event.type, session=session, livemode=bool(event.livemode)
    )


@_receiver("checkout.session.async_payment_succeeded")
def checkout_session_async_payment_succeeded_event(
    sender: object, event: StripeEvent, **kwargs: object
) -> None:
    services.purchase_fulfil(
        event_id=event.id,
        event_type=event.type,
        session=_session_of(event),
        livemode=bool(event.livemode),
    )


@_receiver("checkout.session.async_payment_failed")
def checkout_session_async_payment_failed_event(
    sender: object, event: StripeEvent, **kwargs: object
) -> None:
    """Nothing was paid and nothing was built: only say so in the log."""
    logger.info("%s: delayed payment failed for session %s", event.id, _session_of(event).get("id"))


# --- ending an agent ------------------------------------------------------------------------


@_receiver("customer.subscription.deleted")
def customer_subscription_deleted_event(
    sender: object, event: StripeEvent, **kwargs: object
) -> None:
    subscription = _object_of(event)
    if _ending_in_other_mode(event, subscription):
        return
    ending.subscription_deleted(event_id=event.id, event_type=event.type, subscription=subscription)


@_receiver("charge.refunded")
def charge_refunded_event(sender: object, event: StripeEvent, **kwargs: object) -> None:
    """Only a full refund ends the agent; a partial one is logged and changes nothing."""
    charge = _object_of(event)
    if _ending_in_other_mode(event, charge):
        return
    ending.charge_refunded(event_id=event.id, event_type=event.type, charge=charge)


@_receiver("charge.dispute.created")
def charge_dispute_created_event(sender: object, event: StripeEvent, **kwargs: object) -> None:
    dispute = _object_of(event)
    if _ending_in_other_mode(event, dispute):
        return
    ending.dispute_created(event_id=event.id, event_type=event.type, dispute=dispute)


@_receiver("charge.succeeded")
def charge_succeeded_event(sender: object, event: StripeEvent, **kwargs: object) -> None:
    """Remember whose the charge is: a later dispute names only the charge."""
    charge = _object_of(event)
    if _other_mode(event, charge):
        logger.info("%s: charge from the other Stripe mode, not recorded", event.id)
        return
    ending.known_charge_record(event_id=event.id, charge=charge)
