"""Billing operations: a paid Checkout session becomes an agent and its first job, exactly once.

`purchase_fulfil` runs inside dj-stripe's webhook transaction (receivers do): the Agent, its job
and dj-stripe's Event row commit together or not at all, and dispatch happens after commit.
Idempotency is the database's: the Agent's unique checkout-session id makes every event about
one purchase (redeliveries, concurrent deliveries, `completed` and `async_payment_succeeded`)
land on one agent, and only the call that created it enqueues a job.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import stripe
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from billing import ending
from billing.models import OperatorCase, UnfulfillablePayment, UnfulfillableReason
from provisioning import services as provisioning_services
from provisioning.models import Agent, Region

if TYPE_CHECKING:
    # User: the AUTH_USER_MODEL (get_user_model() at run time). BaseAddresses: the Stripe
    # client's `base_addresses` type, which stripe does not re-export at the top level.
    from django.contrib.auth.models import User
    from stripe._base_address import BaseAddresses

logger = logging.getLogger(__name__)

AGENT_NAME_MAX_CHARS = 64

# The events whose payload is a Checkout session we fulfil (payment_status decides for
# `completed`; `async_payment_succeeded` is always paid).
FULFILMENT_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
PAID_STATUSES = ("paid", "no_payment_required")
# What the Stripe webhook endpoint must send us (set the same list in Stripe's dashboard):
# purchases, the events that end an agent, and `charge.succeeded` (a later dispute names only
# its charge; billing.ending remembers whose each charge is).
ENABLED_EVENTS = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "customer.subscription.deleted",
    "charge.succeeded",
    "charge.refunded",
    "charge.dispute.created",
)


class PurchaseInvalid(Exception):
    """A permanent reason why a paid session cannot become an agent."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FulfilmentResult:
    agent: Agent | None
    created: bool  # this call made the agent (and enqueued its job)
    unfulfillable: UnfulfillablePayment | None = None


@dataclass(frozen=True)
class Purchase:
    """What a validated session says was bought."""

    user: User
    agent_name: str
    region: str
    session_id: str
    stripe_customer_id: str
    stripe_subscription_id: str


# ---------------------------------------------------------------------------------------------
# validation


# The one name policy, for the buy form and for fulfilment alike. Letters (any script, including
# those outside the Basic Multilingual Plane), digits, spaces, hyphens and underscores: the name
# shows on pages and in the server's labels and Ansible variables, so nothing needs quoting.
AGENT_NAME_PATTERN = re.compile(r"[\w\- ]+\Z")
AGENT_NAME_RULE = "use letters, digits, spaces, hyphens (-) and underscores (_) only"


def agent_name_clean(value: object) -> str:
    """1 to 64 characters after trimming, by AGENT_NAME_PATTERN; the buy form uses it too."""
    if not isinstance(value, str):
        raise PurchaseInvalid(UnfulfillableReason.BAD_METADATA, "metadata.agent_name is missing")
    name = value.strip()
    if not 1 <= len(name) <= AGENT_NAME_MAX_CHARS:
        raise PurchaseInvalid(
            UnfulfillableReason.BAD_METADATA,
            f"metadata.agent_name must be 1 to {AGENT_NAME_MAX_CHARS} characters, got {len(name)}",
        )
    if not AGENT_NAME_PATTERN.match(name):
        raise PurchaseInvalid(
            UnfulfillableReason.BAD_METADATA, f"metadata.agent_name: {AGENT_NAME_RULE}"
        )
    return name


def region_clean(value: object) -> str:
    if value is None or value == "":
        return Region.US_EAST.value  # a session without a region is built in the default one
    if value not in Region.values:
        raise PurchaseInvalid(
            UnfulfillableReason.BAD_METADATA,
            f"metadata.region {value!r} is not one of {', '.join(Region.values)}",
        )
    return str(value)


def _id_of(value: object) -> str:
    """A Stripe reference as a string id, whether it came expanded or bare."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else ""


def _user_for_reference(reference: object) -> User:
    user_model = get_user_model()
    if not isinstance(reference, str) or not reference:
        raise PurchaseInvalid(
            UnfulfillableReason.UNKNOWN_CUSTOMER, "client_reference_id is missing"
        )
    try:
        pk = user_model._meta.pk.to_python(reference)
    except ValidationError:
        pk = None
    user = user_model._default_manager.filter(pk=pk).first() if pk is not None else None
    if user is None:
        raise PurchaseInvalid(
            UnfulfillableReason.UNKNOWN_CUSTOMER,
            f"client_reference_id {reference[:64]!r} is not one of our users",
        )
    if not user.is_active or user.is_staff:
        # A deactivated account, or a staff login (operators buy nothing): an operator decides.
        raise PurchaseInvalid(
            UnfulfillableReason.INELIGIBLE_CUSTOMER,
            f"client_reference_id {reference[:64]!r} names an "
            + ("inactive" if not user.is_active else "staff")
            + " account",
        )
    return user


def purchase_validate(*, session: dict[str, Any], livemode: bool) -> Purchase:
    """Check that a Checkout session looks like one of ours. Raises PurchaseInvalid."""
    if session.get("object") not in (None, "checkout.session") or not session.get("id"):
        raise PurchaseInvalid(UnfulfillableReason.BAD_METADATA, "payload is not a Checkout session")
    if bool(livemode) != bool(settings.STRIPE_LIVE_MODE) or bool(
        session.get("livemode", livemode)
    ) != bool(settings.STRIPE_LIVE_MODE):
        raise PurchaseInvalid(
            UnfulfillableReason.WRONG_LIVEMODE,
            f"livemode={livemode} but this service runs with STRIPE_LIVE_MODE="
            f"{settings.STRIPE_LIVE_MODE}",
        )
    if session.get("mode") != "subscription":
        raise PurchaseInvalid(
            UnfulfillableReason.WRONG_MODE, f"mode is {session.get('mode')!r}, not 'subscription'"
        )
    metadata = session.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise PurchaseInvalid(UnfulfillableReason.BAD_METADATA, "metadata is not an object")
    agent_name = agent_name_clean(metadata.get("agent_name"))
    region = region_clean(metadata.get("region"))
    _price_check(session)
    user = _user_for_reference(session.get("client_reference_id"))
    return Purchase(
        user=user,
        agent_name=agent_name,
        region=region,
        session_id=str(session["id"]),
        stripe_customer_id=_id_of(session.get("customer")),
        stripe_subscription_id=_id_of(session.get("subscription")),
    )


def _session_price_ids(session: dict[str, Any]) -> set[str]:
    """The price ids a session payload names: its line items when present (only if expanded:
    webhook payloads carry none), else the `price_id` we put in its metadata at checkout."""
    found: set[str] = set()
    line_items = session.get("line_items")
    items = line_items.get("data") if isinstance(line_items, dict) else None
    for item in items if isinstance(items, list) else []:
        price = item.get("price") if isinstance(item, dict) else None
        price_id = _id_of(price)
        if price_id:
            found.add(price_id)
    metadata = session.get("metadata")
    if not found and isinstance(metadata, dict) and isinstance(metadata.get("price_id"), str):
        found.add(metadata["price_id"])
    return found


def _price_check(session: dict[str, Any]) -> None:
    """Our price, when configured: its id (STRIPE_PRICE_ID) when the payload names one, else its
    amount and currency (STRIPE_PRICE_AMOUNT/_CURRENCY).

    The id first: with a trial or a free first period the subtotal is 0 whatever the price is,
    so the amount says nothing then.
    """
    want_currency = settings.STRIPE_PRICE_CURRENCY
    if want_currency and str(session.get("currency") or "").lower() != want_currency:
        raise PurchaseInvalid(
            UnfulfillableReason.WRONG_PRICE,
            f"currency {session.get('currency')!r}, expected {want_currency!r}",
        )
    price_ids = _session_price_ids(session)
    if price_ids and settings.STRIPE_PRICE_ID:
        if price_ids != {settings.STRIPE_PRICE_ID}:
            raise PurchaseInvalid(
                UnfulfillableReason.WRONG_PRICE,
                f"price {', '.join(sorted(price_ids))}, expected {settings.STRIPE_PRICE_ID}",
            )
        return
    want_amount = settings.STRIPE_PRICE_AMOUNT
    if want_amount is not None:
        # Before discounts and tax: a coupon or VAT must not make a real order unfulfillable.
        amount = session.get("amount_subtotal", session.get("amount_total"))
        if amount == 0:
            # A trial or a free first period, on a session that names no price (made before
            # checkout recorded it): nothing to compare.
            logger.info(
                "session %s: subtotal 0 and no price id; price not checked", session.get("id")
            )
            return
        if amount != want_amount:
            raise PurchaseInvalid(
                UnfulfillableReason.WRONG_PRICE, f"amount {amount!r}, expected {want_amount}"
            )


# ---------------------------------------------------------------------------------------------
# fulfilment


def purchase_fulfil(
    *, event_id: str, event_type: str, session: dict[str, Any], livemode: bool
) -> FulfilmentResult:
    """A paid Checkout session -> one Agent (per session) + its first QUEUED job.

    Repeat calls for the same session (any event) return the existing agent with created=False
    and enqueue nothing. A session that is not ours is recorded as UnfulfillablePayment (once per
    event) and the call returns normally, so Stripe gets a 200 and stops retrying. Database
    errors propagate: the webhook answers 500 and Stripe retries.
    """
    try:
        purchase = purchase_validate(session=session, livemode=livemode)
    except PurchaseInvalid as exc:
        return FulfilmentResult(
            agent=None,
            created=False,
            unfulfillable=unfulfillable_record(
                event_id=event_id, event_type=event_type, session=session, error=exc
            ),
        )

    agent, created = _agent_get_or_create(purchase)
    if agent.owner_id != purchase.user.pk:
        # Same session id, another customer: a forged or corrupted reference. Never hand over.
        conflict = PurchaseInvalid(
            UnfulfillableReason.AGENT_CONFLICT,
            f"agent {agent.pk} for session {purchase.session_id} belongs to user {agent.owner_id}",
        )
        return FulfilmentResult(
            agent=None,
            created=False,
            unfulfillable=unfulfillable_record(
                event_id=event_id, event_type=event_type, session=session, error=conflict
            ),
        )
    if created:
        provisioning_services.job_enqueue(agent=agent, stripe_event_id=event_id)
        logger.info(
            "fulfilled %s (%s): agent %s for user %s",
            purchase.session_id,
            event_id,
            agent.pk,
            agent.owner_id,
        )
        # Stripe delivers out of order: its subscription may already have been deleted.
        ending.end_if_already_cancelled(agent=agent)
    else:
        logger.info(
            "%s (%s): session %s already fulfilled as agent %s",
            event_type,
            event_id,
            purchase.session_id,
            agent.pk,
        )
    return FulfilmentResult(agent=agent, created=created)


def _agent_get_or_create(purchase: Purchase) -> tuple[Agent, bool]:
    """Insert-first get-or-create on the unique session id, safe against concurrent deliveries.

    On PostgreSQL a concurrent insert of the same session waits for the other transaction, then
    fails with IntegrityError (its savepoint rolls back) and reads the winner's committed row. No
    look-up first: a session seen before (another event of it) lands in the except, and a new one,
    the common case, costs no extra round trip.
    """
    try:
        with transaction.atomic():
            agent = Agent.objects.create(
                owner=purchase.user,
                name=purchase.agent_name,
                region=purchase.region,
                stripe_checkout_session_id=purchase.session_id,
                stripe_customer_id=purchase.stripe_customer_id,
                stripe_subscription_id=purchase.stripe_subscription_id,
            )
    except IntegrityError:
        return Agent.objects.get(stripe_checkout_session_id=purchase.session_id), False
    return agent, True


def unfulfillable_record(
    *, event_id: str, event_type: str, session: dict[str, Any], error: PurchaseInvalid
) -> UnfulfillablePayment:
    """Record a paid event we cannot fulfil, once per event (a redelivery finds the row)."""
    logger.warning(
        "unfulfillable paid event %s (%s): %s — %s",
        event_id,
        event_type,
        error.reason,
        error.detail,
    )
    reference = session.get("client_reference_id")
    fields = {
        "event_type": event_type,
        "checkout_session_id": str(session.get("id") or "")[:255],
        "customer_reference": str(reference)[:255] if reference is not None else "",
        "stripe_customer_id": _id_of(session.get("customer"))[:255],
        "reason": error.reason,
        "detail": error.detail,
        "payload": session,
    }
    try:
        with transaction.atomic():
            return UnfulfillablePayment.objects.create(stripe_event_id=event_id, **fields)
    except IntegrityError:
        return UnfulfillablePayment.objects.get(stripe_event_id=event_id)


def operator_case_resolve(
    *, case: OperatorCase, by: AbstractBaseUser | AnonymousUser, note: str = ""
) -> bool:
    """Mark an operator case (unfulfillable payment, unmatched ending event) handled.

    One conditional UPDATE: False if it already was resolved (two operators at once: one wins).
    `by` is the admin's request.user; only a logged-in user is recorded.
    """
    resolved_by = by if isinstance(by, AbstractBaseUser) else None
    updated: int = (
        type(case)
        ._default_manager.filter(pk=case.pk, resolved_at__isnull=True)
        .update(resolved_at=timezone.now(), resolved_by=resolved_by, note=note or case.note)
    )
    return updated == 1


# ---------------------------------------------------------------------------------------------
# Checkout (the dashboard's "Buy" form)


def checkout_session_create(
    *,
    user: AbstractBaseUser,
    agent_name: str,
    region: str,
    success_url: str,
    cancel_url: str,
    http_client: stripe.HTTPClient | None = None,
) -> str:
    """Start a purchase; returns the URL to send the customer to.

    With BILLING_LOCAL_CHECKOUT (local development, no real Stripe key) that is our stand-in
    checkout page; otherwise a Stripe Checkout session in subscription mode. Raises
    PurchaseInvalid for a bad name or region, stripe.StripeError when Stripe refuses.
    """
    agent_name = agent_name_clean(agent_name)
    region = region_clean(region)
    if settings.BILLING_LOCAL_CHECKOUT:
        query = urlencode({"agent_name": agent_name, "region": region})
        return f"{reverse('billing:local-checkout')}?{query}"
    metadata = {"agent_name": agent_name, "region": region}
    client = stripe_client(http_client=http_client)
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "line_items": [{"price": settings.STRIPE_PRICE_ID, "quantity": 1}],
            "client_reference_id": str(user.pk),
            # The price id rides in the session's metadata: webhook payloads carry no line
            # items, and a trial's subtotal of 0 says nothing about which price was bought.
            "metadata": {**metadata, "price_id": settings.STRIPE_PRICE_ID},
            "subscription_data": {"metadata": metadata},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
    )
    if not session.url:
        raise stripe.APIError("Stripe returned a Checkout session without a URL")
    return str(session.url)


class PortalUnavailable(Exception):
    """This agent has no Stripe customer to manage (bought before it was recorded, or by hand)."""


def portal_session_create(
    *, agent: Agent, return_url: str, http_client: stripe.HTTPClient | None = None
) -> str:
    """ "Manage subscription": where to send the agent's owner to see or cancel what they pay for.

    A Stripe Customer Portal session for the customer the agent's checkout made (the caller has
    checked that the agent is the logged-in customer's own); with BILLING_LOCAL_CHECKOUT the local
    stand-in portal instead. Raises PortalUnavailable when the agent names no Stripe customer,
    stripe.StripeError when Stripe refuses (e.g. no portal configuration in its dashboard).
    """
    if not agent.stripe_customer_id:
        raise PortalUnavailable(f"agent {agent.pk} has no Stripe customer")
    if settings.BILLING_LOCAL_CHECKOUT:
        return reverse("billing:local-portal", args=[agent.pk])
    session = stripe_client(http_client=http_client).v1.billing_portal.sessions.create(
        params={"customer": agent.stripe_customer_id, "return_url": return_url}
    )
    if not session.url:
        raise stripe.APIError("Stripe returned a portal session without a URL")
    return str(session.url)


def stripe_client(*, http_client: stripe.HTTPClient | None = None) -> stripe.StripeClient:
    """Our own Stripe client; its HTTP client defaults to the process-wide one (tests fake it)."""
    base: BaseAddresses | None = (
        {"api": settings.STRIPE_API_BASE} if settings.STRIPE_API_BASE else None
    )
    return stripe.StripeClient(
        api_key=settings.STRIPE_SECRET_KEY,
        stripe_version=settings.STRIPE_API_VERSION,
        base_addresses=base,
        max_network_retries=2,
        http_client=http_client or stripe.default_http_client,
    )


# ---------------------------------------------------------------------------------------------
# dj-stripe's rows: the webhook endpoint, and what it would otherwise fetch from Stripe


def local_account_id(api_key: str) -> str:
    """A stable, obviously-local account id for a key (dj-stripe needs an owner account)."""
    return "acct_local" + hashlib.sha256(api_key.encode()).hexdigest()[:14]


class AccountUnknown(Exception):
    """A live key whose account cannot be recorded without being told (a restricted key)."""


def stripe_account_record(*, api_key: str, account_id: str = "") -> Any:
    """Record the Account and APIKey rows dj-stripe would fetch (`GET /v1/account`) for our key.

    dj-stripe fetches them inside the first webhook that needs them; a restricted key may not
    call `GET /v1/account` at all, so that webhook would fail (500) and Stripe retry it in vain.
    Recorded here, webhooks never call Stripe for them. A test key gets a local stand-in
    account (tests, `make run`); a live key gets `account_id` when given, else the account its
    key reads once, now. A restricted live key without `account_id` raises AccountUnknown.
    """
    from djstripe.enums import APIKeyType
    from djstripe.models import Account, APIKey

    existing = APIKey.objects.filter(secret=api_key).select_related("djstripe_owner_account")
    key = existing.first()
    known = key.djstripe_owner_account if key is not None else None
    if known is not None and (not account_id or known.id == account_id):
        return known
    livemode = not api_key.startswith(("sk_test_", "rk_test_"))
    restricted = api_key.startswith("rk_")
    stripe_data: dict[str, Any]
    if account_id:
        stripe_data = {"id": account_id, "object": "account"}
    elif not livemode:
        account_id = local_account_id(api_key)
        stripe_data = {
            "id": account_id,
            "object": "account",
            "settings": {"dashboard": {"display_name": "Local test account"}},
        }
    elif restricted:
        raise AccountUnknown(
            "a restricted key cannot read its own account: pass the account id (acct_…)"
        )
    else:
        current = stripe_client().v1.accounts.retrieve_current(options={"api_key": api_key})
        stripe_data = current.to_dict()
        account_id = str(stripe_data["id"])
    with transaction.atomic():
        account, _ = Account.objects.get_or_create(
            id=account_id, defaults={"livemode": livemode, "stripe_data": stripe_data}
        )
        key, _ = APIKey.objects.get_or_create(
            secret=api_key,
            defaults={
                "type": APIKeyType.restricted if restricted else APIKeyType.secret,
                "livemode": livemode,
                "name": "local" if not livemode else "live",
            },
        )
        if key.djstripe_owner_account_id != account.pk:
            key.djstripe_owner_account = account
            key.save(update_fields=["djstripe_owner_account"])
    return account


def webhook_endpoint_setup(
    *,
    secret: str,
    endpoint_uuid: str,
    url: str,
    api_key: str,
    livemode: bool,
    api_version: str,
    account_id: str = "",
) -> tuple[Any, bool]:
    """Create or update dj-stripe's WebhookEndpoint row (no Stripe call but a live secret key's
    one `GET /v1/account`, see stripe_account_record). Idempotent."""
    from djstripe.enums import WebhookEndpointStatus
    from djstripe.models import WebhookEndpoint

    account = stripe_account_record(api_key=api_key, account_id=account_id) if api_key else None
    values = {
        "secret": secret,
        "url": url,
        "enabled_events": list(ENABLED_EVENTS),
        "status": WebhookEndpointStatus.enabled,
        "livemode": livemode,
        "api_version": api_version,
        "djstripe_owner_account": account,
    }
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.select_for_update().filter(djstripe_uuid=endpoint_uuid)
        found = endpoint.first()
        if found is not None:
            for name, value in values.items():
                setattr(found, name, value)
            found.save()
            return found, False
        created = WebhookEndpoint.objects.create(
            id="we_local" + endpoint_uuid.replace("-", "")[:24],
            djstripe_uuid=endpoint_uuid,
            **values,
        )
        return created, True


def webhook_trigger_prune(*, older_than: timedelta) -> tuple[int, int]:
    """Delete invalid (unverified) webhook trigger rows older than `older_than`; keep valid ones.

    Returns (deleted, invalid rows kept because they are recent). `manage.py prune` does this
    together with the rest of retention (billing.retention).
    """
    from billing import retention

    pruned = retention.invalid_triggers_prune(older_than=older_than)
    return pruned.deleted, pruned.kept
