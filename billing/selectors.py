"""Billing's named reads: what the Stripe catch-up did, for /metrics and the admin overview."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing.models import CatchUpKind, StripeCatchUp, StripeReconcileState


@dataclass(frozen=True)
class ReconcileStatus:
    last_success_at: datetime | None
    last_run_at: datetime | None
    paid_sessions_without_agent: int
    events_caught_up: int  # all time: events the reconciler processed before any webhook did
    sessions_fulfilled: int  # all time: paid sessions fulfilled with no event at all


def reconcile_status() -> ReconcileStatus:
    state = StripeReconcileState.objects.filter(name="default").first()
    counts = {kind: StripeCatchUp.objects.filter(kind=kind).count() for kind in CatchUpKind.values}
    return ReconcileStatus(
        last_success_at=state.last_success_at if state else None,
        last_run_at=state.last_run_at if state else None,
        paid_sessions_without_agent=state.paid_sessions_without_agent if state else 0,
        events_caught_up=counts[CatchUpKind.EVENT],
        sessions_fulfilled=counts[CatchUpKind.SESSION],
    )
