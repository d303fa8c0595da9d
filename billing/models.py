"""Billing's own records. Stripe's objects live in dj-stripe's tables; nothing here points at them
(ids are kept as strings). The one model tied to dj-stripe is WebhookEvent, a proxy of its Event
(no table), so billing's migrations follow dj-stripe's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, models
from django.db.models import Q
from djstripe.models import Event
from djstripe.settings import djstripe_settings


class OperatorCase(models.Model):
    """A Stripe event we answered 200 but could not act on: kept, with its payload, until an
    operator resolves it. One row per event (the unique id): a redelivery adds nothing."""

    stripe_event_id = models.CharField(max_length=255, unique=True)
    event_type = models.CharField(max_length=100)
    detail = models.TextField(blank=True, default="")
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)
    # Operators close the loop here (refunded, agent made by hand, …).
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    note = models.TextField(blank=True, default="")

    class Meta:
        abstract = True

    if TYPE_CHECKING:
        # Each concrete case declares its own `reason` choices field; Django adds this per model.
        def get_reason_display(self) -> str: ...

    def __str__(self) -> str:
        return f"{self.stripe_event_id} ({self.get_reason_display()})"

    @property
    def is_resolved(self) -> bool:
        return self.resolved_at is not None


class UnfulfillableReason(models.TextChoices):
    UNKNOWN_CUSTOMER = "unknown_customer", "Unknown customer"
    INELIGIBLE_CUSTOMER = "ineligible_customer", "Customer account inactive or staff"
    BAD_METADATA = "bad_metadata", "Missing or invalid metadata"
    WRONG_MODE = "wrong_mode", "Not a subscription checkout"
    WRONG_LIVEMODE = "wrong_livemode", "Live/test mode mismatch"
    WRONG_PRICE = "wrong_price", "Amount or currency is not our price"
    AGENT_CONFLICT = "agent_conflict", "Agent for this session exists for another customer"


class UnfulfillablePayment(OperatorCase):
    """A paid Stripe event we could not turn into an agent: an operator's turn.

    Recording it answers Stripe with 200 (retrying a permanent error for days helps nobody); the
    row is what keeps the payment from being silently dropped. One row per event: a redelivery
    of the same event finds it and adds nothing.
    """

    checkout_session_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    # client_reference_id as Stripe sent it (our user's pk, when the session is ours).
    customer_reference = models.CharField(max_length=255, blank=True, default="")
    stripe_customer_id = models.CharField(max_length=255, blank=True, default="")
    reason = models.CharField(max_length=32, choices=UnfulfillableReason)

    class Meta(OperatorCase.Meta):
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(reason__in=UnfulfillableReason.values),
                name="unfulfillable_reason_valid",
            ),
        ]
        indexes = [
            # The admin's default view: open cases, newest first.
            models.Index(
                fields=["-created_at"],
                condition=Q(resolved_at__isnull=True),
                name="unfulfillable_open_newest",
            ),
        ]


class UnmatchedReason(models.TextChoices):
    NO_AGENT = "no_agent", "No agent matches"
    SEVERAL_AGENTS = "several_agents", "Several agents match"
    WRONG_LIVEMODE = "wrong_livemode", "Live/test mode mismatch"


class UnmatchedEndingEvent(OperatorCase):
    """A Stripe event that should end an agent (subscription deleted, full refund, dispute) but
    does not name exactly one agent: an operator's turn.

    Nothing was ended: guessing could switch off the wrong customer's agent, or leave a VM billing
    for a customer who is gone. Recording it answers Stripe with 200 (a retry would match the
    same way). One row per event: a redelivery finds it and adds nothing.
    """

    # The event's object: sub_…, ch_… or dp_…
    stripe_object_id = models.CharField(max_length=255, blank=True, default="")
    stripe_customer_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    # A purchase that arrives after its subscription's deletion looks itself up here.
    stripe_subscription_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    stripe_charge_id = models.CharField(max_length=255, blank=True, default="")
    reason = models.CharField(max_length=32, choices=UnmatchedReason)

    class Meta(OperatorCase.Meta):
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(reason__in=UnmatchedReason.values),
                name="unmatched_ending_reason_valid",
            ),
        ]
        indexes = [
            models.Index(
                fields=["-created_at"],
                condition=Q(resolved_at__isnull=True),
                name="unmatched_ending_open_newest",
            ),
        ]


class DriftReason(models.TextChoices):
    ACTIVE_AFTER_END = "active_after_end", "Subscription active, agent ended"


class BillingDrift(OperatorCase):
    """Stripe and our agents disagree in a way we must not fix by guessing: a subscription Stripe
    still bills (active, trialing, past due) whose agent has ended. Refund, cancel the
    subscription in Stripe or rebuild the agent — an operator decides. Found by the Stripe
    catch-up's drift check, not by an event: `stripe_event_id` is `drift:<subscription id>`,
    so one subscription makes one case however often the check sees it.
    """

    stripe_subscription_id = models.CharField(max_length=255, db_index=True)
    stripe_customer_id = models.CharField(max_length=255, blank=True, default="")
    agent_id = models.CharField(max_length=64, blank=True, default="")  # the ended agent
    subscription_status = models.CharField(max_length=32, blank=True, default="")
    reason = models.CharField(max_length=32, choices=DriftReason)

    class Meta(OperatorCase.Meta):
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(reason__in=DriftReason.values), name="billing_drift_reason_valid"
            ),
        ]


class KnownCharge(models.Model):
    """Whose a charge is, as a signed `charge.*` event said (customer, and subscription when the
    payload carried it).

    A dispute names only its charge (and payment intent), never the customer: this row is how a
    later `charge.dispute.created` finds its agent without asking the Stripe API.
    """

    charge_id = models.CharField(max_length=255, unique=True)
    payment_intent_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    stripe_customer_id = models.CharField(max_length=255, blank=True, default="")
    stripe_subscription_id = models.CharField(max_length=255, blank=True, default="")
    stripe_event_id = models.CharField(max_length=255)  # the first event that told us
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.charge_id


class StripeReconcileState(models.Model):
    """The Stripe catch-up's one row (`name` "default"): where the next run starts, what the last
    one found, and the lease that lets one worker at a time run it.

    `watermark`: the newest event time fully processed, minus a safety overlap (events appear in
    Stripe's list slightly out of order); the next run lists events created at or after it.
    """

    name = models.CharField(max_length=32, unique=True, default="default")
    watermark = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    # Paid sessions the last audit found with no agent that it could not fulfil (each has an open
    # UnfulfillablePayment, or its event is still being processed).
    paid_sessions_without_agent = models.PositiveIntegerField(default=0)
    # The drift check asks Stripe about a batch of subscriptions per run, in subscription-id
    # order from here ("" = from the start), so every agent is checked in turn.
    subscription_cursor = models.CharField(max_length=255, blank=True, default="")

    def __str__(self) -> str:
        return f"stripe reconcile ({self.name})"


class CatchUpKind(models.TextChoices):
    EVENT = "event", "Event caught up"
    SESSION = "session", "Paid session fulfilled by the audit"


class StripeCatchUp(models.Model):
    """Something the reconciler did because a webhook did not: an event it processed first (the
    Event row was inserted by the reconciler, not by a delivery), or a paid session it fulfilled
    with no event at all. One row per Stripe id; written in the same transaction as the work."""

    stripe_id = models.CharField(max_length=255, unique=True)  # evt_… or cs_…
    kind = models.CharField(max_length=16, choices=CatchUpKind)
    event_type = models.CharField(max_length=100, blank=True, default="")
    stripe_created_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=CatchUpKind.values), name="stripe_catch_up_kind_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.stripe_id} ({self.kind})"


class EventRecorded(Exception):
    """The Stripe event's row is already there: nothing of this delivery may be kept."""

    def __init__(self, event_id: str) -> None:
        super().__init__(f"Stripe event {event_id} is already recorded")
        self.event_id = event_id


# dj-stripe ships no type information, so its Event is Any to the type checker.
class WebhookEvent(Event):  # type: ignore[misc]
    """dj-stripe's Event row, made by the webhook with what this service already knows.

    dj-stripe resolves the event's owner account from the API key on every event (a savepoint,
    the APIKey row, the Account row) although a key never changes hands; here the answer is kept
    per process (billing.webhook forgets it when an Account or APIKey row is saved or deleted, and
    after any failed delivery). Events of a connected account (`account` set) go dj-stripe's way.
    """

    class Meta:
        proxy = True

    @classmethod
    def record(cls, data: dict[str, Any], api_key: str | None = None) -> Event:
        """dj-stripe's Event.process without its two reads of the same row (it checks that the
        event is new, then, making it, fetches it by id again) and without its savepoint: the
        INSERT decides. Call it as the first write of a transaction. A duplicate (a redelivery,
        or a concurrent delivery that committed first) fails on the unique id before any receiver
        runs, and raises EventRecorded: the caller's transaction must roll back (it holds nothing
        else) and read the row recorded before. The row is dj-stripe's Event (its post_save
        receivers see their own sender)."""
        api_key = api_key or djstripe_settings.STRIPE_SECRET_KEY
        event = Event(**cls._stripe_object_to_record(data, api_key=api_key))
        event._attach_objects_hook(Event, data, api_key=api_key)
        try:
            event.save(force_insert=True)
        except IntegrityError as error:
            raise EventRecorded(str(data["id"])) from error
        event._attach_objects_post_save_hook(Event, data, api_key=api_key)
        event.invoke_webhook_handlers()
        return event

    @classmethod
    def _find_owner_account(cls, data: Any, api_key: Any = None, livemode: Any = None) -> Any:
        from billing import webhook

        if isinstance(data, dict) and data.get("account"):
            return super()._find_owner_account(data, api_key=api_key, livemode=livemode)
        return webhook.owner_account_cached(
            api_key, lambda: super(WebhookEvent, cls)._find_owner_account(data, api_key=api_key)
        )
