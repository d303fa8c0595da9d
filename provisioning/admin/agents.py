"""Agents with their jobs, and the append-only job-event log; both read-only.

The one operator action here, "End agent (deprovision)", calls services.agent_end per agent as
`operator:<username>` after a confirmation page that asks why (the reason is recorded on the
agent and in the deprovision job's history).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from provisioning import services
from provisioning.admin import search
from provisioning.admin.common import (
    EstimatedCountPaginator,
    ReadOnlyAdmin,
    action_report,
    ago,
    fieldset_fields,
    local_time,
    report_level,
    run_link,
    skip_reason,
)
from provisioning.admin.job_page import event_summary, event_transition
from provisioning.errors import ProvisioningError
from provisioning.models import Actor, Agent, JobEvent, JobKind, ProvisioningJob, status_label

# Ending is irreversible and deletes VMs: a handful at a time, never "select all 90,000".
MAX_END_AGENTS = 100


# The read-only columns of an agent's job rows and of the job events list.
JOB_ROW_FIELDS = (
    "job",
    "kind",
    "status_badge",
    "attempt",
    "retries",
    "step",
    "failed_step",
    "workflow_run",
    "created_at",
    "completed_at",
)

EVENT_FIELDS = (
    "created_at",
    "job_link",
    "actor",
    "action",
    "transition",
    "attempt",
    "step",
    "run",
    "reason_in_full",
)


class EndAgentForm(forms.Form):
    reason = forms.CharField(
        max_length=200,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        help_text="Recorded on each agent and in its deprovision job's history.",
    )


def _job_link(job_id: Any) -> SafeString:
    url = reverse("admin:provisioning_provisioningjob_change", args=[job_id])
    return format_html('<a href="{}">{}</a>', url, str(job_id)[:8])


def _status_badge(status: str | None, kind: str | None) -> SafeString | str:
    """A job's state for its kind: a finished deprovision reads "Deleted", not "Running"."""
    if not status:
        return "—"
    label = status_label(status, kind or JobKind.PROVISION)
    return format_html('<span class="job-badge job-{}">{}</span>', label.key, label.text)


class AgentJobInline(admin.TabularInline[ProvisioningJob, Agent]):
    """The agent's jobs, newest first (an agent has a handful: its provision, retries, deprovision)."""

    model = ProvisioningJob
    extra = 0
    can_delete = False
    show_change_link = False
    ordering = ["-created_at"]
    fields = JOB_ROW_FIELDS
    readonly_fields = JOB_ROW_FIELDS

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="job")
    def job(self, job: ProvisioningJob) -> SafeString:
        return _job_link(job.pk)

    @admin.display(description="status")
    def status_badge(self, job: ProvisioningJob) -> SafeString | str:
        return _status_badge(job.status, job.kind)

    @admin.display(description="retries")
    def retries(self, job: ProvisioningJob) -> str:
        return f"{job.retry_count} of {job.max_retries}"

    @admin.display(description="workflow run")
    def workflow_run(self, job: ProvisioningJob) -> SafeString | str:
        return run_link(job.workflow_run_id)


class EndedFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "ended"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Active"), ("yes", "Ended")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() in ("yes", "no"):
            return queryset.filter(ended_at__isnull=self.value() == "no")
        return None


@admin.register(Agent)
class AgentAdmin(ReadOnlyAdmin):
    paginator = EstimatedCountPaginator
    list_display = [
        "name",
        "owner_email",
        "region",
        "state",
        "latest_job",
        "ipv4",
        "age",
    ]
    list_select_related = ["owner"]
    sortable_by = ["age"]
    ordering = ["-created_at"]
    list_filter = [EndedFilter, "region"]
    search_fields = ["id"]
    search_help_text = (
        "Agent id (full or first 8), Checkout session (cs_…), agent name or customer email."
    )
    inlines = [AgentJobInline]
    actions = ["end_agents"]
    fieldsets = [
        (None, {"fields": ["id", "name", "owner_email", "region", "state", "created_at"]}),
        ("Server", {"fields": ["server_name", "server_id", "ipv4"]}),
        (
            "Billing",
            {
                "fields": [
                    "stripe_checkout_session_id",
                    "stripe_customer_id",
                    "stripe_subscription_id",
                ]
            },
        ),
        ("End", {"fields": ["ended_at", "end_reason"]}),
    ]
    readonly_fields = fieldset_fields(fieldsets)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        # The latest job's status per row in the same query (index job_agent_latest).
        latest = ProvisioningJob.objects.filter(agent=OuterRef("pk")).order_by("-created_at")
        rows: QuerySet[Any] = super().get_queryset(request)
        annotated: QuerySet[Any] = rows.annotate(
            latest_job_status=Subquery(latest.values("status")[:1]),
            latest_job_kind=Subquery(latest.values("kind")[:1]),
        )
        return annotated

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        return search.apply(queryset, search_term, search.agent_term), False

    def has_end_agent_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.end_agent")

    @admin.action(description="End agent (deprovision)…", permissions=["end_agent"])
    def end_agents(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        agents = list(
            queryset.select_related("owner").order_by("-created_at")[: MAX_END_AGENTS + 1]
        )
        if len(agents) > MAX_END_AGENTS:
            self.message_user(
                request,
                f"Select at most {MAX_END_AGENTS} agents to end at once; nothing was changed.",
                messages.ERROR,
            )
            return None
        form = EndAgentForm(request.POST if request.POST.get("post") == "yes" else None)
        if not form.is_valid():
            return self._end_confirmation(request, agents, form)
        reason = form.cleaned_data["reason"]
        actor = Actor.operator(request.user.get_username())
        ended, skipped = 0, Counter[str]()
        for agent in agents:
            started = timezone.now()
            try:
                job = services.agent_end(agent_id=agent.pk, actor=actor, reason=reason)
            except ProvisioningError as error:
                skipped[skip_reason(error)] += 1
                continue
            if job.created_at >= started:
                ended += 1
            else:  # agent_end is idempotent: it handed back the earlier deprovision job
                skipped["already ended"] += 1
        self.message_user(
            request, action_report("ended", ended, skipped), report_level(ended, skipped)
        )
        return None

    def _end_confirmation(
        self, request: HttpRequest, agents: list[Agent], form: EndAgentForm
    ) -> TemplateResponse:
        affected = [agent for agent in agents if not agent.is_ended]
        context = {
            **self.admin_site.each_context(request),
            "title": "End agents: are you sure?",
            "subtitle": None,
            "opts": self.opts,
            "agents": agents,
            "form": form,
            "affected_count": len(affected),
            "skipped_count": len(agents) - len(affected),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/provisioning/agent/end_confirmation.html", context)

    @admin.display(description="customer")
    def owner_email(self, agent: Agent) -> SafeString:
        who = agent.owner.email or agent.owner.get_username()
        return format_html('<span class="job-cut" title="{}">{}</span>', who, who)

    @admin.display(description="state")
    def state(self, agent: Agent) -> SafeString:
        if agent.is_ended:
            reason = agent.end_reason or "no reason recorded"
            return format_html(
                '<span class="job-badge job-ended" title="{}">ended {} ago</span>'
                ' <span class="job-muted" title="{}">{}</span>',
                reason,
                ago(agent.ended_at),
                reason,
                reason if len(reason) <= 40 else reason[:39] + "…",
            )
        return format_html('<span class="job-badge job-active">{}</span>', "active")

    @admin.display(description="latest job")
    def latest_job(self, agent: Agent) -> SafeString | str:
        return _status_badge(
            getattr(agent, "latest_job_status", None), getattr(agent, "latest_job_kind", None)
        )

    @admin.display(description="age", ordering="created_at")
    def age(self, agent: Agent) -> SafeString:
        return format_html(
            '<span title="{}">{}</span>', local_time(agent.created_at), ago(agent.created_at)
        )


@admin.register(JobEvent)
class JobEventAdmin(ReadOnlyAdmin):
    paginator = EstimatedCountPaginator
    list_display = [
        "when",
        "job_link",
        "who",
        "action",
        "transition",
        "attempt",
        "step",
        "run",
        "short_reason",
    ]
    list_display_links = ["when"]
    list_select_related = ["job"]  # its kind names the transition ("deleting → deleted")
    # Newest first by the primary key: always indexed, and it follows insertion order.
    ordering = ["-id"]
    sortable_by = ()
    list_filter = ["action", "to_status"]
    search_fields = ["job__id"]
    search_help_text = "Job id (full or first 8), or an exact actor such as operator:alice."
    fields = EVENT_FIELDS
    readonly_fields = EVENT_FIELDS

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        return search.apply(queryset, search_term, search.event_term), False

    @admin.display(description="job")
    def job_link(self, event: JobEvent) -> SafeString:
        return _job_link(event.job_id)

    @admin.display(description="from → to")
    def transition(self, event: JobEvent) -> SafeString | str:
        said, stored = event_transition(event, event.job.kind)
        if not said:
            return "—"
        return format_html('<span title="stored: {}">{}</span>', stored, said)

    @admin.display(description="run")
    def run(self, event: JobEvent) -> SafeString | str:
        return run_link(event.workflow_run_id)

    @admin.display(description="when")
    def when(self, event: JobEvent) -> SafeString:
        return format_html(
            '<span title="{}">{}</span>',
            local_time(event.created_at),
            timezone.localtime(event.created_at).strftime("%b %-d, %H:%M:%S"),
        )

    @admin.display(description="who")
    def who(self, event: JobEvent) -> SafeString:
        short = event.actor.split(":", 1)[0] if event.workflow_run_id else event.actor
        return format_html('<span title="{}">{}</span>', event.actor, short)

    @admin.display(description="why")
    def short_reason(self, event: JobEvent) -> str:
        """One line: a failure's last line (what went wrong), else the first."""
        return event_summary(event, limit=100)

    @admin.display(description="why")
    def reason_in_full(self, event: JobEvent) -> SafeString | str:
        return format_html('<pre class="job-error">{}</pre>', event.reason) if event.reason else "—"
