"""Read-only registrations; the operator console (filters, actions, timeline) builds on these."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from provisioning.models import Agent, JobEvent, ProvisioningJob


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """State is changed only by services (actions), never by editing a form."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Agent)
class AgentAdmin(ReadOnlyAdmin):
    list_display = ["name", "owner", "region", "ipv4", "created_at", "ended_at"]
    list_select_related = ["owner"]
    search_fields = ["=id", "name", "owner__email", "=stripe_checkout_session_id"]


@admin.register(ProvisioningJob)
class ProvisioningJobAdmin(ReadOnlyAdmin):
    list_display = [
        "short_id",
        "agent",
        "kind",
        "status",
        "attempt",
        "retry_count",
        "step",
        "created_at",
    ]
    list_select_related = ["agent"]
    list_filter = ["status", "kind"]
    show_full_result_count = False


@admin.register(JobEvent)
class JobEventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "job", "actor", "action", "from_status", "to_status", "attempt"]
    list_select_related = ["job"]
    show_full_result_count = False
