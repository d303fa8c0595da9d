"""Operator alerts: which failed jobs operators were told about, and whether each channel went out."""

from __future__ import annotations

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from provisioning.admin.common import EstimatedCountPaginator, ReadOnlyAdmin
from provisioning.models import OperatorAlert


@admin.register(OperatorAlert)
class OperatorAlertAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "job_link", "attempt", "emailed_at", "posted_at", "tries"]
    list_display_links = ["created_at"]
    ordering = ["-id"]
    paginator = EstimatedCountPaginator
    list_select_related = ["job"]
    fields = ("created_at", "job_link", "attempt", "emailed_at", "posted_at", "tries")
    readonly_fields = ("created_at", "job_link", "attempt", "emailed_at", "posted_at", "tries")

    @admin.display(description="job")
    def job_link(self, alert: OperatorAlert) -> SafeString:
        url = reverse("admin:provisioning_provisioningjob_change", args=[alert.job_id])
        return format_html('<a href="{}">{}</a>', url, alert.job.short_id)
