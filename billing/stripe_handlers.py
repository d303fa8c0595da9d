"""dj-stripe receivers. They run inside dj-stripe's webhook transaction, after its Event row.

They read only the signed payload (never the Stripe API: dj-stripe's own sync receiver for
`checkout.session.*` is disconnected in BillingConfig.ready) and hand it to billing.services.
"""

from __future__ import annotations

import logging
from typing import Any

from djstripe.event_handlers import djstripe_receiver

from billing import services

logger = logging.getLogger(__name__)


def _session_of(event: Any) -> dict[str, Any]:
    data = event.data or {}
    session = data.get("object") if isinstance(data, dict) else None
    return session if isinstance(session, dict) else {}


@djstripe_receiver("checkout.session.completed")
def checkout_session_completed_event(sender: Any, event: Any, **kwargs: Any) -> None:
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


@djstripe_receiver("checkout.session.async_payment_succeeded")
def checkout_session_async_payment_succeeded_event(sender: Any, event: Any, **kwargs: Any) -> None:
    services.purchase_fulfil(
        event_id=event.id,
        event_type=event.type,
        session=_session_of(event),
        livemode=bool(event.livemode),
    )


@djstripe_receiver("checkout.session.async_payment_failed")
def checkout_session_async_payment_failed_event(sender: Any, event: Any, **kwargs: Any) -> None:
    """Nothing was paid and nothing was built: only say so in the log."""
    logger.info("%s: delayed payment failed for session %s", event.id, _session_of(event).get("id"))
