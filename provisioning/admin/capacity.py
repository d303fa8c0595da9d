"""Capacity holds: builds held back while the Hetzner project is at its server limit.

An operator who raised the limit (or freed servers by hand) lifts the hold here; deprovisions
lift it by themselves, and it lapses after CAPACITY_RETRY_SECONDS.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from provisioning import services
from provisioning.admin.common import ReadOnlyAdmin, local_time
from provisioning.models import Actor, CapacityHold


@admin.register(CapacityHold)
class CapacityHoldAdmin(ReadOnlyAdmin):
    list_display = ["started", "state", "until_at", "renewals", "lifted_by", "reason"]
    ordering = ["-started_at"]
    fields = ["started_at", "until", "renewals", "lifted_at", "lifted_by", "reason"]
    readonly_fields = ["started_at", "until", "renewals", "lifted_at", "lifted_by", "reason"]
    actions = ["lift_holds"]

    @admin.display(description="since", ordering="started_at")
    def started(self, hold: CapacityHold) -> str:
        return local_time(hold.started_at)

    @admin.display(description="until")
    def until_at(self, hold: CapacityHold) -> str:
        return local_time(hold.until)

    @admin.display(description="state")
    def state(self, hold: CapacityHold) -> str:
        if hold.lifted_at is not None:
            return "lifted"
        return "in force" if hold.in_force(timezone.now()) else "lapsed (builds are tried)"

    def has_lift_permission(self, request: HttpRequest) -> bool:
        # Django's own "change" permission on holds: the form itself stays read-only.
        return request.user.has_perm("provisioning.change_capacityhold")

    @admin.action(
        description="Lift the capacity hold (the server limit was raised): builds go again",
        permissions=["lift"],
    )
    def lift_holds(self, request: HttpRequest, queryset: QuerySet[CapacityHold]) -> None:
        lifted = services.capacity_hold_lift(actor=Actor.operator(request.user.get_username()))
        self.message_user(request, f"{lifted} hold(s) lifted.", messages.SUCCESS)
