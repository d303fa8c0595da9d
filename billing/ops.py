"""What billing adds to provisioning's /metrics and admin overview (registered in
BillingConfig.ready: provisioning imports nothing from billing)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.urls import NoReverseMatch, reverse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from billing import selectors
from provisioning.admin.jobs import OverviewCard


def reconcile_metrics(now: datetime) -> Iterator[Any]:
    status = selectors.reconcile_status()
    last = status.last_success_at
    yield GaugeMetricFamily(
        "stripe_reconcile_last_success_age_seconds",
        "Seconds since the Stripe catch-up (missed events, paid-session audit) last ran without "
        "errors (+Inf when it never did).",
        value=math.inf if last is None else max((now - last).total_seconds(), 0.0),
    )
    caught_up = CounterMetricFamily(
        "stripe_reconcile_caught_up",
        "Stripe work done by reconciliation because no webhook did: events it processed first, "
        "and paid sessions it fulfilled with no event at all.",
        labels=["kind"],
    )
    caught_up.add_metric(["event"], status.events_caught_up)
    caught_up.add_metric(["session"], status.sessions_fulfilled)
    yield caught_up
    yield GaugeMetricFamily(
        "stripe_paid_sessions_without_agent",
        "Paid Checkout sessions the last audit found with no agent and could not fulfil.",
        value=status.paid_sessions_without_agent,
    )


def reconcile_cards(now: datetime) -> list[OverviewCard]:
    status = selectors.reconcile_status()
    return [
        OverviewCard(
            label="Stripe events caught up (no webhook)",
            value=str(status.events_caught_up + status.sessions_fulfilled),
            url=_url("admin:billing_stripecatchup_changelist"),
        ),
        OverviewCard(
            label="paid sessions without agent",
            value=str(status.paid_sessions_without_agent),
            url=_url("admin:billing_unfulfillablepayment_changelist"),
            alert=status.paid_sessions_without_agent > 0,
        ),
    ]


def _url(name: str) -> str | None:
    try:
        return reverse(name)
    except NoReverseMatch:
        return None
