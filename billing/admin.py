from __future__ import annotations

from typing import TypeVar

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from billing import services
from billing.models import (
    BillingDrift,
    OperatorCase,
    StripeCatchUp,
    UnfulfillablePayment,
    UnmatchedEndingEvent,
)

_Case = TypeVar("_Case", bound=OperatorCase)


class ResolvedFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[_Case]
    ) -> list[tuple[str, str]]:
        return [("open", "Open"), ("resolved", "Resolved")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[_Case]) -> QuerySet[_Case]:
        if self.value() == "open":
            return queryset.filter(resolved_at__isnull=True)
        if self.value() == "resolved":
            return queryset.filter(resolved_at__isnull=False)
        return queryset


class OperatorCaseAdmin(admin.ModelAdmin[_Case]):
    """What every operator case's admin shares: rows come only from events or checks (never added
    by hand), and the one action marks the selected cases resolved, by whom."""

    noun = "cases"  # what the report counts ("Resolved 2 of 3 payments.")
    actions = ["mark_resolved"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Mark selected cases resolved", permissions=["change"])
    def mark_resolved(self, request: HttpRequest, queryset: QuerySet[_Case]) -> None:
        rows = list(queryset)
        done = sum(services.operator_case_resolve(case=row, by=request.user) for row in rows)
        self.message_user(request, f"Resolved {done} of {len(rows)} {self.noun}.")


@admin.register(UnfulfillablePayment)
class UnfulfillablePaymentAdmin(OperatorCaseAdmin[UnfulfillablePayment]):
    noun = "payments"
    list_display = [
        "created_at",
        "stripe_event_id",
        "event_type",
        "reason",
        "detail",
        "customer_reference",
        "checkout_session_id",
        "resolved_at",
    ]
    list_filter = [ResolvedFilter, "reason", "event_type", "created_at"]
    search_fields = [
        "stripe_event_id",
        "checkout_session_id",
        "customer_reference",
        "stripe_customer_id",
        "detail",
    ]
    date_hierarchy = "created_at"
    readonly_fields = [
        "stripe_event_id",
        "event_type",
        "checkout_session_id",
        "customer_reference",
        "stripe_customer_id",
        "reason",
        "detail",
        "payload",
        "created_at",
        "resolved_at",
        "resolved_by",
    ]
    fields = [*readonly_fields, "note"]


@admin.register(UnmatchedEndingEvent)
class UnmatchedEndingEventAdmin(OperatorCaseAdmin[UnmatchedEndingEvent]):
    noun = "events"
    """Subscription cancellations, refunds and disputes that named no single agent: nothing was
    ended. Find the agent (search by customer or subscription id), end it from the agent's page
    if it should go, then mark the row resolved."""

    list_display = [
        "created_at",
        "event_type",
        "reason",
        "detail",
        "stripe_customer_id",
        "stripe_object_id",
        "resolved_at",
    ]
    list_filter = [ResolvedFilter, "reason", "created_at"]
    search_fields = [
        "stripe_event_id",
        "stripe_object_id",
        "stripe_customer_id",
        "stripe_subscription_id",
        "stripe_charge_id",
    ]
    date_hierarchy = "created_at"
    readonly_fields = [
        "stripe_event_id",
        "event_type",
        "stripe_object_id",
        "stripe_customer_id",
        "stripe_subscription_id",
        "stripe_charge_id",
        "reason",
        "detail",
        "payload",
        "created_at",
        "resolved_at",
        "resolved_by",
    ]
    fields = [*readonly_fields, "note"]


@admin.register(BillingDrift)
class BillingDriftAdmin(OperatorCaseAdmin[BillingDrift]):
    noun = "cases"
    """Subscriptions Stripe still bills whose agent has ended, found by the Stripe catch-up's
    drift check. Nothing was changed: refund or cancel in Stripe, or rebuild the agent, then
    mark the row resolved."""

    list_display = [
        "created_at",
        "stripe_subscription_id",
        "subscription_status",
        "agent_id",
        "detail",
        "resolved_at",
    ]
    list_filter = [ResolvedFilter, "reason", "created_at"]
    search_fields = ["stripe_subscription_id", "stripe_customer_id", "agent_id"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "stripe_event_id",
        "stripe_subscription_id",
        "stripe_customer_id",
        "agent_id",
        "subscription_status",
        "reason",
        "detail",
        "payload",
        "created_at",
        "resolved_at",
        "resolved_by",
    ]
    fields = [*readonly_fields, "note"]


@admin.register(StripeCatchUp)
class StripeCatchUpAdmin(admin.ModelAdmin[StripeCatchUp]):
    """What the Stripe catch-up did because no webhook had: events it processed first, paid
    sessions it fulfilled with no event. A growing list means webhook delivery is broken."""

    list_display = ["created_at", "kind", "stripe_id", "event_type", "stripe_created_at"]
    list_filter = ["kind", "event_type", "created_at"]
    search_fields = ["stripe_id"]
    date_hierarchy = "created_at"
    readonly_fields = ["created_at", "kind", "stripe_id", "event_type", "stripe_created_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # rows come from the catch-up only

    def has_change_permission(self, request: HttpRequest, obj: StripeCatchUp | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: StripeCatchUp | None = None) -> bool:
        return False
