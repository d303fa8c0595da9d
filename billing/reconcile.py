"""Catching up with Stripe when webhooks did not arrive: missed events, and paid sessions that
never became an agent.

Webhook delivery is the fast path; this is the safety net. Stripe retries a failed delivery for
about three days, then gives up (an endpoint that was down, a rotated signing secret, a disabled
endpoint). Every STRIPE_RECONCILE_INTERVAL_SECONDS the worker (and `manage.py stripe_reconcile`):

1. lists the events this service handles (`GET /v1/events`, `types[]`, `created[gte]` = the
   watermark, newest first, paginated with `starting_after`) and processes, oldest first, each one
   dj-stripe has not recorded, through dj-stripe's own `Event.process` (the webhook records the
   same row through billing.models.WebhookEvent.record) — so idempotency is the webhook's: the Event row's unique id makes a late delivery of an
   event processed here (or a delivery racing this run) a no-op, and the agent's unique
   checkout-session id keeps every purchase at one agent and one job;
2. audits completed Checkout sessions of the last STRIPE_SESSION_AUDIT_DAYS days
   (`GET /v1/checkout/sessions`, `status=complete`) against agents: a paid one without an agent
   whose purchase event we never recorded (never sent, or older than Stripe's 30 days of events)
   is fulfilled through `purchase_fulfil`, idempotent on the session id; the others are counted
   for operators (they already have an UnfulfillablePayment case);
3. compares subscriptions with agents, a batch per run (`GET /v1/subscriptions/<id>`): an agent
   still up whose subscription is `canceled` or `incomplete_expired` is ended through the normal
   ending path; a subscription Stripe still bills whose agent ended becomes a BillingDrift case
   for operators (never guessed at).

What it did is recorded (StripeCatchUp rows, StripeReconcileState) so /metrics and the admin can
show it from the database.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.db.models.signals import post_save
from django.utils import timezone

from billing import ending, services
from billing.models import CatchUpKind, StripeCatchUp, StripeReconcileState

logger = logging.getLogger(__name__)

STATE_NAME = "default"
# Stripe keeps events this long; with no watermark yet a run starts here.
EVENT_RETENTION = timedelta(days=30)
# The next run starts this far before the newest event processed: an event can show up in
# Stripe's list a little after a newer one, and re-listing a few minutes costs one query.
WATERMARK_OVERLAP = timedelta(minutes=10)
# A session completed this recently is left to its webhook (normally seconds away); a later
# audit fulfils it if the webhook never comes.
SESSION_GRACE = timedelta(minutes=10)
PAGE_SIZE = 100
# Subscriptions the drift check asks Stripe about per run (one retrieve each); the next run
# continues after the last one, so every agent's subscription is checked in turn.
SUBSCRIPTION_CHECK_BATCH = 100
# Prefix of the job's stripe_event_id for a purchase fulfilled from its session alone.
SESSION_EVENT_PREFIX = "reconcile:"


@dataclass
class ReconcileReport:
    listed: int = 0  # events Stripe listed since the watermark
    caught_up: int = 0  # events this run processed first (no webhook had)
    already_recorded: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # event id -> error
    sessions_checked: int = 0
    sessions_fulfilled: int = 0  # paid sessions fulfilled by the audit (no event recorded)
    sessions_without_agent: list[str] = field(default_factory=list)  # still without an agent
    subscriptions_checked: int = 0
    agents_ended: int = 0  # up although Stripe says their subscription ended
    drift_cases: list[str] = field(default_factory=list)  # billed subscriptions of ended agents
    watermark: datetime | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def work(self) -> int:
        return self.caught_up + self.sessions_fulfilled + self.agents_ended


# ---------------------------------------------------------------------------------------------
# which Event rows this process inserted (not a concurrent webhook delivery)

_inserting: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "billing_reconcile_inserting", default=None
)


def _note_inserted(sender: object, instance: Any, created: bool, **kwargs: object) -> None:
    """post_save of dj-stripe's Event: remember ids this reconcile call inserted.

    Event.process returns the existing row both when it was there before and when a concurrent
    delivery won the insert; only this signal says that our insert is the one that happened.
    """
    ids = _inserting.get()
    if created and ids is not None:
        ids.add(str(instance.id))


def connect_signals() -> None:
    from djstripe.models import Event

    post_save.connect(_note_inserted, sender=Event, dispatch_uid="billing.reconcile.inserted")


# ---------------------------------------------------------------------------------------------
# the state row


def _state() -> StripeReconcileState:
    state, _ = StripeReconcileState.objects.get_or_create(name=STATE_NAME)
    return state


def reconcile_lease_take(*, now: datetime | None = None) -> bool:
    """Take the run for one interval (one conditional UPDATE): several workers, one run."""
    now = now or timezone.now()
    _state()
    interval = timedelta(seconds=settings.STRIPE_RECONCILE_INTERVAL_SECONDS)
    taken: int = (
        StripeReconcileState.objects.filter(name=STATE_NAME)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lte=now))
        .update(lease_until=now + interval)
    )
    return taken == 1


def _to_datetime(created: object) -> datetime | None:
    if isinstance(created, int) and not isinstance(created, bool):
        return datetime.fromtimestamp(created, tz=UTC)
    return None


# ---------------------------------------------------------------------------------------------
# listing (Stripe returns newest first; `starting_after` the last id of a page gives older ones)


def _pages(
    list_call: Any, params: dict[str, Any], *, limit: int = PAGE_SIZE
) -> Iterator[dict[str, Any]]:
    starting_after: str | None = None
    while True:
        page_params = {**params, "limit": limit}
        if starting_after:
            page_params["starting_after"] = starting_after
        page = list_call(params=page_params)
        items = [item.to_dict(for_json=True) for item in page.data]
        yield from items
        if not page.has_more or not items:
            return
        starting_after = str(items[-1]["id"])


@dataclass
class Listing:
    """What listing found: the events not recorded yet (oldest first), and of the ones already
    recorded only how many and the newest time (30 days of events need not sit in memory)."""

    missed: list[dict[str, Any]]
    recorded: int
    newest_recorded: datetime | None


def events_list(*, client: stripe.StripeClient, since: datetime, limit: int = PAGE_SIZE) -> Listing:
    """Every handled event created at or after `since`; those dj-stripe has not recorded are
    returned oldest first (ties: Stripe's order reversed)."""
    from djstripe.models import Event

    params: dict[str, Any] = {
        "types": list(services.ENABLED_EVENTS),
        "created": {"gte": int(since.timestamp())},
    }
    listing = Listing(missed=[], recorded=0, newest_recorded=None)
    page: list[dict[str, Any]] = []

    def sift() -> None:
        known = set(
            Event.objects.filter(id__in=[str(e.get("id")) for e in page]).values_list(
                "id", flat=True
            )
        )
        for event in page:
            if event.get("id") not in known:
                listing.missed.append(event)
                continue
            listing.recorded += 1
            created = _to_datetime(event.get("created"))
            if created and (listing.newest_recorded is None or created > listing.newest_recorded):
                listing.newest_recorded = created
        page.clear()

    for event in _pages(client.v1.events.list, params, limit=limit):
        page.append(event)
        if len(page) >= limit:
            sift()
    sift()
    listing.missed.reverse()
    return listing


# ---------------------------------------------------------------------------------------------
# processing one event (the webhook's path)


def event_process(*, data: dict[str, Any]) -> bool:
    """Process one Stripe event as its webhook delivery would; True if this call recorded it.

    One transaction: dj-stripe's Event row, what our receivers do with it (agent and job, an
    ending, an operator case) and, if this call inserted the Event, its StripeCatchUp row. An
    event type without a receiver is recorded and nothing else happens, as on the webhook.
    """
    from djstripe.models import Event

    event_id = str(data.get("id") or "")
    if not event_id:
        return False
    if Event.objects.filter(id=event_id).exists():
        return False
    inserted: set[str] = set()
    token = _inserting.set(inserted)
    try:
        with transaction.atomic():
            Event.process(data=data, api_key=settings.STRIPE_SECRET_KEY)
            if event_id not in inserted:
                return False  # a delivery recorded it between our check and our insert
            StripeCatchUp.objects.create(
                stripe_id=event_id[:255],
                kind=CatchUpKind.EVENT,
                event_type=str(data.get("type") or "")[:100],
                stripe_created_at=_to_datetime(data.get("created")),
            )
    finally:
        _inserting.reset(token)
    logger.warning(
        "stripe reconcile: caught up event %s (%s) that no webhook delivered",
        event_id,
        data.get("type"),
    )
    return True


# ---------------------------------------------------------------------------------------------
# the audit of paid sessions


def _purchase_event_recorded(session_id: str) -> bool:
    """Has dj-stripe recorded a purchase event for this session (so the event path decided)?"""
    from djstripe.models import Event

    recorded: bool = Event.objects.filter(
        type__in=services.FULFILMENT_EVENTS, data__object__id=session_id
    ).exists()
    return recorded


def sessions_audit(*, client: stripe.StripeClient, now: datetime, report: ReconcileReport) -> None:
    """Paid, completed sessions of the last STRIPE_SESSION_AUDIT_DAYS days against agents."""
    from provisioning.models import Agent

    since = now - timedelta(days=settings.STRIPE_SESSION_AUDIT_DAYS)
    params: dict[str, Any] = {"status": "complete", "created": {"gte": int(since.timestamp())}}
    for session in _pages(client.v1.checkout.sessions.list, params):
        if session.get("payment_status") not in services.PAID_STATUSES:
            continue
        if session.get("mode") != "subscription":
            continue  # not a purchase of ours (the event path records such events)
        report.sessions_checked += 1
        session_id = str(session.get("id") or "")
        if not session_id or Agent.objects.filter(stripe_checkout_session_id=session_id).exists():
            continue
        created = _to_datetime(session.get("created"))
        too_fresh = created is not None and created > now - SESSION_GRACE
        if too_fresh or not report.ok or _purchase_event_recorded(session_id):
            # Its webhook may still come, this run could not process every event, or the event
            # path already decided (an UnfulfillablePayment names it): report, never guess.
            report.sessions_without_agent.append(session_id)
            continue
        if session_fulfil(session=session):
            report.sessions_fulfilled += 1
        else:
            report.sessions_without_agent.append(session_id)


def session_fulfil(*, session: dict[str, Any]) -> bool:
    """Fulfil a paid session no recorded event told us about; True if it now has an agent.

    Through purchase_fulfil, like an event: the agent's unique session id makes a webhook that
    arrives afterwards (or at the same moment) find this agent and enqueue nothing.
    """
    session_id = str(session["id"])
    event_id = f"{SESSION_EVENT_PREFIX}{session_id}"[:255]
    with transaction.atomic():
        result = services.purchase_fulfil(
            event_id=event_id,
            event_type="checkout.session.completed",
            session=session,
            livemode=bool(session.get("livemode")),
        )
        if result.agent is None:
            return False
        if result.created:
            StripeCatchUp.objects.get_or_create(
                stripe_id=session_id[:255],
                defaults={
                    "kind": CatchUpKind.SESSION,
                    "event_type": "checkout.session.completed",
                    "stripe_created_at": _to_datetime(session.get("created")),
                },
            )
            logger.warning(
                "stripe reconcile: paid session %s had no agent and no recorded event: "
                "fulfilled as agent %s",
                session_id,
                result.agent.pk,
            )
    return True


# ---------------------------------------------------------------------------------------------
# billing drift: what Stripe bills against which agents are up


def subscriptions_check(
    *,
    client: stripe.StripeClient,
    now: datetime,
    report: ReconcileReport,
    batch: int = SUBSCRIPTION_CHECK_BATCH,
) -> None:
    """Ask Stripe about the next `batch` subscriptions of agents that are up or ended recently
    (STRIPE_SESSION_AUDIT_DAYS); end agents whose subscription ended, record a case for a
    subscription still billed whose agent ended."""
    from provisioning.models import Agent

    state = _state()
    recently = now - timedelta(days=settings.STRIPE_SESSION_AUDIT_DAYS)
    ids = list(
        Agent.objects.exclude(stripe_subscription_id="")
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gte=recently))
        .filter(stripe_subscription_id__gt=state.subscription_cursor)
        .order_by("stripe_subscription_id")
        .values_list("stripe_subscription_id", flat=True)
        .distinct()[:batch]
    )
    for subscription_id in ids:
        try:
            found = client.v1.subscriptions.retrieve(subscription_id)
        except stripe.InvalidRequestError as exc:
            # Not in this account or mode (an agent made by hand, test data): nothing to compare.
            logger.warning("stripe reconcile: subscription %s: %s", subscription_id, exc)
            continue
        report.subscriptions_checked += 1
        subscription_reconcile(subscription=found.to_dict(for_json=True), report=report)
    cursor = ids[-1] if len(ids) == batch else ""
    StripeReconcileState.objects.filter(pk=state.pk).update(subscription_cursor=cursor)


def subscription_reconcile(*, subscription: dict[str, Any], report: ReconcileReport) -> None:
    """One subscription as Stripe has it now against the agents made from it."""
    from provisioning.models import Agent

    subscription_id = str(subscription.get("id") or "")
    status = subscription.get("status")
    agents = list(Agent.objects.filter(stripe_subscription_id=subscription_id))
    if not subscription_id or not agents:
        return
    up = [agent for agent in agents if not agent.is_ended]
    if status in ending.SUBSCRIPTION_ENDED_STATUSES:
        for agent in up:
            ending.subscription_ended_unnoticed(agent=agent, subscription=subscription)
            report.agents_ended += 1
    elif status in ending.SUBSCRIPTION_BILLING_STATUSES and not up:
        latest = max(agents, key=lambda agent: agent.ended_at or agent.created_at)
        ending.billing_after_end_record(agent=latest, subscription=subscription)
        report.drift_cases.append(subscription_id)


# ---------------------------------------------------------------------------------------------
# one run


def reconcile_run(
    *,
    since: datetime | None = None,
    http_client: stripe.HTTPClient | None = None,
    page_size: int = PAGE_SIZE,
) -> ReconcileReport:
    """List and process missed events, then audit paid sessions; record the outcome.

    `since` (the command's --since) overrides the watermark for this run; the watermark itself
    only moves forward past events all processed. A Stripe or database error while listing
    propagates (the run is recorded as failed); an event that fails to process is reported and
    holds the watermark at its time, so the next run tries it again.
    """
    now = timezone.now()
    state = _state()
    oldest = now - EVENT_RETENTION
    start = since or state.watermark or oldest
    start = max(start, oldest)
    report = ReconcileReport()
    client = services.stripe_client(http_client=http_client)
    # dj-stripe needs the key's account row; for a test key it is recorded offline.
    services.stripe_account_record(api_key=settings.STRIPE_SECRET_KEY)
    try:
        listing = events_list(client=client, since=start, limit=page_size)
        report.listed = listing.recorded + len(listing.missed)
        report.already_recorded = listing.recorded
        oldest_failed: datetime | None = None
        newest_done = listing.newest_recorded
        for data in listing.missed:
            created = _to_datetime(data.get("created")) or now
            try:
                if event_process(data=data):
                    report.caught_up += 1
                else:
                    report.already_recorded += 1
            except Exception as exc:
                logger.exception("stripe reconcile: event %s failed", data.get("id"))
                report.failed[str(data.get("id"))] = f"{type(exc).__name__}: {exc}"
                if oldest_failed is None or created < oldest_failed:
                    oldest_failed = created
                continue
            if newest_done is None or created > newest_done:
                newest_done = created
        sessions_audit(client=client, now=now, report=report)
        subscriptions_check(client=client, now=now, report=report)
    except Exception as exc:
        StripeReconcileState.objects.filter(pk=state.pk).update(
            last_run_at=now, last_error=f"{type(exc).__name__}: {exc}"[:4000]
        )
        raise
    report.watermark = _watermark_next(
        previous=state.watermark, newest_done=newest_done, oldest_failed=oldest_failed
    )
    fields: dict[str, Any] = {
        "watermark": report.watermark,
        "last_run_at": now,
        "paid_sessions_without_agent": len(report.sessions_without_agent),
        "last_error": "; ".join(f"{k}: {v}" for k, v in report.failed.items())[:4000],
    }
    if report.ok:
        fields["last_success_at"] = now
    StripeReconcileState.objects.filter(pk=state.pk).update(**fields)
    for session_id in report.sessions_without_agent:
        logger.warning("stripe reconcile: paid session %s has no agent", session_id)
    logger.info(
        "stripe reconcile: %d listed, %d caught up, %d failed, %d sessions fulfilled, "
        "%d paid sessions without agent, %d subscriptions checked, %d agents ended, %d drift "
        "cases; watermark %s",
        report.listed,
        report.caught_up,
        len(report.failed),
        report.sessions_fulfilled,
        len(report.sessions_without_agent),
        report.subscriptions_checked,
        report.agents_ended,
        len(report.drift_cases),
        report.watermark,
    )
    return report


def _watermark_next(
    *,
    previous: datetime | None,
    newest_done: datetime | None,
    oldest_failed: datetime | None,
) -> datetime | None:
    """The newest event time fully processed, minus WATERMARK_OVERLAP; never past a failure."""
    if oldest_failed is not None:
        # Hold before the failed event so the next run lists it again.
        held = oldest_failed - WATERMARK_OVERLAP
        return min(previous, held) if previous is not None else held
    if newest_done is None:
        return previous  # nothing listed: nothing learnt
    candidate = newest_done - WATERMARK_OVERLAP
    return max(previous, candidate) if previous is not None else candidate


def reconcile_duty() -> int:
    """The worker's duty: a run when the interval's lease is free and Stripe is configured.

    Off without a key, and under the local stand-in checkout with no Stripe fake to ask
    (`make run`: there is no Stripe account to catch up with).
    """
    if settings.STRIPE_RECONCILE_INTERVAL_SECONDS <= 0 or not settings.STRIPE_SECRET_KEY:
        return 0
    if settings.BILLING_LOCAL_CHECKOUT and not settings.STRIPE_API_BASE:
        return 0
    if not reconcile_lease_take():
        return 0
    report = reconcile_run()
    if not report.ok:
        raise RuntimeError(
            f"stripe reconcile: {len(report.failed)} events failed: {', '.join(report.failed)}"
        )
    return report.work
