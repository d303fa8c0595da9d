"""The jobs list and job page: what is stuck or failing and why, and the four operator actions.

Every action calls one service per selected job, as `operator:<username>`, and reports how many
jobs changed and why the others were skipped. Cancel and time out ask for confirmation first.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.apps import apps
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db import DatabaseError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe
from djstripe.models import Event as StripeEvent

from provisioning import selectors, services
from provisioning.admin import search
from provisioning.admin.activity import overview_activity
from provisioning.admin.common import (
    EstimatedCountPaginator,
    ReadOnlyAdmin,
    action_report,
    ago,
    capped_count,
    duration,
    fieldset_fields,
    local_time,
    report_level,
    run_link,
    skip_reason,
)
from provisioning.errors import ProvisioningError
from provisioning.models import Actor, JobStatus, ProvisioningJob
from provisioning.state import CANCEL, REDISPATCH, RETRY, TIMEOUT, Move

logger = logging.getLogger(__name__)

OVERVIEW_EXACT_LIMIT = 10_000

# An action on more jobs than this is refused: "select all 900,000" is never what an operator means.
MAX_ACTION_JOBS = 500


class StaleFilter(admin.SimpleListFilter):
    """Provisioning jobs the sweeper would time out now (selectors.job_list_stale)."""

    title = "heartbeat"
    parameter_name = "stale"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        limit = duration(settings.JOB_TIMEOUT_SECONDS)
        return [("yes", f"Stale (silent > {limit} or overdue)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "yes":
            stale = selectors.job_list_stale(now=timezone.now())
            return queryset.filter(pk__in=stale.values("pk"))
        return None


class FailedStepFilter(admin.ChoicesFieldListFilter):
    title = "failed step"


@dataclass(frozen=True)
class JobAction:
    """One operator action: its service and that service's move, which says which jobs it applies
    to (`move.sources`); a job's page offers it only where `job.allows(move)`."""

    name: str
    verb: str  # past tense for the report: "3 retried"
    label: str
    permission: str
    move: Move
    service: Callable[..., Any]
    destructive: bool
    consequence: str

    @property
    def applies_to(self) -> frozenset[str]:
        """The states of the jobs this action can change: its move's sources."""
        return self.move.sources

    def applies(self, job: ProvisioningJob) -> bool:
        """Whether this action can change `job` (its move may start from the job's state)."""
        return job.allows(self.move)


ACTIONS = {
    a.name: a
    for a in [
        JobAction(
            name="retry_jobs",
            verb="retried",
            label="Retry",
            permission="retry_job",
            move=RETRY,
            service=services.job_retry,
            destructive=False,
            consequence="Failed jobs go back to queued with a fresh set of retries.",
        ),
        JobAction(
            name="cancel_jobs",
            verb="cancelled",
            label="Cancel",
            permission="cancel_job",
            move=CANCEL,
            service=services.job_cancel,
            destructive=True,
            consequence=(
                "Queued and provisioning jobs become failed (step “cancelled”); their workflow "
                "runs are cancelled. The customer sees that our team stopped the build."
            ),
        ),
        JobAction(
            name="timeout_jobs",
            verb="timed out",
            label="Time out now",
            permission="timeout_job",
            move=TIMEOUT,
            service=services.job_force_timeout,
            destructive=True,
            consequence=(
                "Provisioning jobs are timed out as if they had gone silent: their runs are "
                "cancelled, and each is requeued if it has retries left, otherwise failed."
            ),
        ),
        JobAction(
            name="redispatch_jobs",
            verb="re-dispatched",
            label="Re-dispatch",
            permission="redispatch_job",
            move=REDISPATCH,
            service=services.job_redispatch,
            destructive=False,
            consequence="Queued jobs forget their unclaimed run and backoff and are sent again now.",
        ),
    ]
}


@admin.register(ProvisioningJob)
class ProvisioningJobAdmin(ReadOnlyAdmin):
    paginator = EstimatedCountPaginator
    # What is stuck and why first; who it belongs to after.
    list_display = [
        "short_id",
        "status_badge",
        "heartbeat",
        "step_progress",
        "attempt_retries",
        "agent_link",
        "customer",
        "age",
        "run",
    ]
    list_display_links = ["short_id"]
    list_select_related = ["agent", "user"]
    # Only orderings an index serves: newest or oldest first.
    sortable_by = ["age"]
    ordering = ["-created_at"]
    list_filter = [
        "status",
        StaleFilter,
        "kind",
        "region",
        ("failed_step", FailedStepFilter),
        "created_at",
    ]
    # Not used as field lookups (get_search_results decides), but a non-empty list shows the box.
    search_fields = ["id"]
    search_help_text = (
        "Job id (full or first 8), Stripe event id (evt_…), Checkout session (cs_…), "
        "workflow run id, customer email or agent name."
    )
    actions = list(ACTIONS)
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "id",
                    "status_badge",
                    "kind",
                    "agent_link",
                    "customer",
                    "region",
                    "created_at",
                    "updated_at",
                ]
            },
        ),
        (
            "Progress",
            {
                "fields": [
                    "attempt",
                    "retries",
                    "step_progress",
                    "heartbeat",
                    "claimed_at",
                    "last_heartbeat_at",
                    "dispatched_at",
                    "next_attempt_at",
                    "completed_at",
                    "cleanup_dispatched_at",
                ]
            },
        ),
        ("Workflow run", {"fields": ["run", "run_attempt"]}),
        ("Payment", {"fields": ["stripe_event"]}),
        ("Error", {"fields": ["failed_step", "error_in_full"]}),
        ("Timeline", {"fields": ["timeline"], "classes": ["wide"]}),
    ]
    readonly_fields = fieldset_fields(fieldsets)

    # --- permissions for the actions (@admin.action(permissions=[...]) calls these) ----------

    def _has(self, request: HttpRequest, codename: str) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")

    def has_retry_job_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "retry_job")

    def has_cancel_job_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "cancel_job")

    def has_timeout_job_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "timeout_job")

    def has_redispatch_job_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "redispatch_job")

    # --- search --------------------------------------------------------------------------------

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        return search.apply(queryset, search_term, search.job_term), False

    # --- columns (all from the job, its agent and its user: no query per row) ---------------

    @admin.display(description="job")
    def short_id(self, job: ProvisioningJob) -> SafeString | str:
        if job.is_deprovision:  # the rare kind is tagged; provisions are the default
            return format_html('{} <span class="job-kind">{}</span>', job.short_id, job.kind)
        return job.short_id

    @admin.display(description="agent")
    def agent_link(self, job: ProvisioningJob) -> SafeString:
        url = reverse("admin:provisioning_agent_change", args=[job.agent_id])
        ended = mark_safe(' <span class="job-muted">(ended)</span>') if job.agent.is_ended else ""
        return format_html('<a href="{}">{}</a>{}', url, job.agent.name, ended)

    @admin.display(description="customer")
    def customer(self, job: ProvisioningJob) -> str:
        return job.user.email or job.user.get_username()

    @admin.display(description="status")
    def status_badge(self, job: ProvisioningJob) -> SafeString:
        return format_html(
            '<span class="job-badge job-{}">{}</span>', job.status, job.get_status_display()
        )

    @admin.display(description="retries")
    def retries(self, job: ProvisioningJob) -> str:
        return f"{job.retry_count} of {job.max_retries}"

    @admin.display(description="attempt · retries")
    def attempt_retries(self, job: ProvisioningJob) -> SafeString:
        return format_html(
            '<span title="attempt {}; automatic retries spent {} of {}">{} · {} of {}</span>',
            job.attempt,
            job.retry_count,
            job.max_retries,
            job.attempt,
            job.retry_count,
            job.max_retries,
        )

    @admin.display(description="step")
    def step_progress(self, job: ProvisioningJob) -> SafeString | str:
        if job.is_failed:
            return format_html(
                '<span class="job-failed-step" title="{}">✗ {}</span>',
                job.error[:300],
                job.failed_step or "?",
            )
        if job.is_running:
            return "done"
        if job.is_queued:
            if job.failed_step:  # requeued after a failure: say which
                return format_html(
                    '<span title="{}">retry after {}</span>', job.error[:300], job.failed_step
                )
            return "waiting"
        progress = f" · {job.progress}%" if job.progress is not None else ""
        return f"{job.step or 'claimed'}{progress}"

    @admin.display(description="age", ordering="created_at")
    def age(self, job: ProvisioningJob) -> SafeString:
        return format_html(
            '<span title="{}">{}</span>', local_time(job.created_at), ago(job.created_at)
        )

    @admin.display(description="heartbeat")
    def heartbeat(self, job: ProvisioningJob) -> SafeString | str:
        if not job.is_provisioning:
            return "—"
        now = timezone.now()
        silent = ago(job.silent_since(), now=now)
        if job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS):
            return format_html(
                '<span class="job-stale" title="No heartbeat for {} (limit {}): the sweeper '
                'will time it out">stale · {}</span>',
                silent,
                duration(settings.JOB_TIMEOUT_SECONDS),
                silent,
            )
        if job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS):
            return format_html(
                '<span class="job-stale" title="Claimed {} ago, past the {} deadline">'
                "overdue · {}</span>",
                ago(job.claimed_at, now=now),
                duration(settings.JOB_DEADLINE_SECONDS),
                silent,
            )
        return format_html('<span class="job-fresh">{} ago</span>', silent)

    @admin.display(description="workflow run")
    def run(self, job: ProvisioningJob) -> SafeString | str:
        return run_link(job.workflow_run_id)

    # --- job page only ---------------------------------------------------------------------

    @admin.display(description="Stripe event")
    def stripe_event(self, job: ProvisioningJob) -> SafeString | str:
        if not job.stripe_event_id:
            return "— (made by an operator or the customer, not a payment)"
        dashboard = "https://dashboard.stripe.com/{}events/{}".format(
            "" if settings.STRIPE_LIVE_MODE else "test/", job.stripe_event_id
        )
        local = _djstripe_event_url(job.stripe_event_id)
        if local:
            return format_html(
                '<a href="{}">{}</a> · <a href="{}" target="_blank" rel="noopener">Stripe ↗</a>',
                local,
                job.stripe_event_id,
                dashboard,
            )
        return format_html(
            '{} <span class="job-muted">(not in the dj-stripe event table)</span> · '
            '<a href="{}" target="_blank" rel="noopener">Stripe ↗</a>',
            job.stripe_event_id,
            dashboard,
        )

    @admin.display(description="error")
    def error_in_full(self, job: ProvisioningJob) -> SafeString | str:
        if not job.error:
            return "—"
        return format_html('<pre class="job-error">{}</pre>', job.error)

    @admin.display(description="events")
    def timeline(self, job: ProvisioningJob) -> SafeString:
        rows = [
            (event, run_link(event.workflow_run_id) if event.workflow_run_id else "")
            for event in job.events.order_by("created_at", "id")
        ]
        return render_to_string("admin/provisioning/provisioningjob/_timeline.html", {"rows": rows})

    # --- views -----------------------------------------------------------------------------

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra_context = {**(extra_context or {}), "overview": job_overview(now=timezone.now())}
        return super().changelist_view(request, extra_context=extra_context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        job = self.get_object(request, object_id)
        offered = []
        if job is not None:
            for action in ACTIONS.values():
                if action.applies(job) and self._has(request, action.permission):
                    offered.append(action)
        extra_context = {**(extra_context or {}), "job_actions": offered}
        return super().change_view(request, object_id, form_url, extra_context=extra_context)

    # --- actions ---------------------------------------------------------------------------

    @admin.action(description="Retry selected failed jobs", permissions=["retry_job"])
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        return self._act(request, queryset, ACTIONS["retry_jobs"])

    @admin.action(description="Cancel selected jobs and their runs…", permissions=["cancel_job"])
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        return self._act(request, queryset, ACTIONS["cancel_jobs"])

    @admin.action(
        description="Time out selected provisioning jobs now…", permissions=["timeout_job"]
    )
    def timeout_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        return self._act(request, queryset, ACTIONS["timeout_jobs"])

    @admin.action(description="Re-dispatch selected queued jobs", permissions=["redispatch_job"])
    def redispatch_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        return self._act(request, queryset, ACTIONS["redispatch_jobs"])

    def _act(
        self, request: HttpRequest, queryset: QuerySet[Any], action: JobAction
    ) -> HttpResponse | None:
        jobs = list(
            queryset.select_related("agent", "user").order_by("-created_at")[: MAX_ACTION_JOBS + 1]
        )
        if len(jobs) > MAX_ACTION_JOBS:
            self.message_user(
                request,
                f"Select at most {MAX_ACTION_JOBS} jobs per action; nothing was changed.",
                messages.ERROR,
            )
            return None
        if action.destructive and request.POST.get("post") != "yes":
            return self._confirmation(request, jobs, action)
        actor = Actor.operator(request.user.get_username())
        changed, skipped = 0, Counter[str]()
        for job in jobs:
            try:
                action.service(job_id=job.pk, actor=actor)
            except ProvisioningError as error:
                skipped[skip_reason(error)] += 1
            else:
                changed += 1
        self.message_user(
            request, action_report(action.verb, changed, skipped), report_level(changed, skipped)
        )
        return None

    def _confirmation(
        self, request: HttpRequest, jobs: list[ProvisioningJob], action: JobAction
    ) -> TemplateResponse:
        rows = [(job, action.applies(job)) for job in jobs]
        affected = [job for job, applies in rows if applies]
        context = {
            **self.admin_site.each_context(request),
            "title": f"{action.label}: are you sure?",
            "subtitle": None,
            "opts": self.opts,
            "action": action,
            "jobs": jobs,
            "rows": rows,
            "affected_count": len(affected),
            "skipped_count": len(jobs) - len(affected),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/provisioning/provisioningjob/action_confirmation.html", context
        )


def _djstripe_event_url(stripe_event_id: str) -> str | None:
    pk = StripeEvent.objects.filter(id=stripe_event_id).values_list("pk", flat=True).first()
    if pk is None:
        return None
    try:
        return reverse("admin:djstripe_event_change", args=[pk])
    except NoReverseMatch:
        return None


# --- the overview above the list -------------------------------------------------------------


@dataclass(frozen=True)
class OverviewCard:
    """A figure another app shows above the job list (billing's Stripe catch-up)."""

    label: str
    value: str
    url: str | None = None
    alert: bool = False  # drawn as an alert: an operator should look


# Cards other apps add (their AppConfig.ready() calls overview_card_register): provisioning
# imports no app above it. Each is called when the list renders, with the render's `now`.
OVERVIEW_CARDS: dict[str, Callable[[datetime], list[OverviewCard]]] = {}


def overview_card_register(name: str, cards: Callable[[datetime], list[OverviewCard]]) -> None:
    OVERVIEW_CARDS[name] = cards


def _extra_cards(now: datetime) -> list[OverviewCard]:
    cards: list[OverviewCard] = []
    for name, make in OVERVIEW_CARDS.items():
        try:
            cards.extend(make(now))
        except DatabaseError as exc:  # a table not migrated here: the console still works
            logger.warning("overview cards %s: %s", name, exc)
    return cards


@dataclass(frozen=True)
class StatusCount:
    status: str
    label: str
    count: int
    approximate: bool


def job_overview(*, now: datetime) -> dict[str, Any]:
    """Counts by status, oldest queued age, stale count: a handful of short index scans.

    A GROUP BY over the status column reads every row. Each state is counted exactly up to
    OVERVIEW_EXACT_LIMIT rows instead (queued and provisioning, which operators act on, stay well
    below it, served by their partial indexes); bigger figures (running, years of failed jobs)
    are PostgreSQL's estimate, shown with "≈".
    """
    counts: dict[str, tuple[int, bool]] = {
        status: capped_count(
            ProvisioningJob.objects.filter(status=status), exact_limit=OVERVIEW_EXACT_LIMIT
        )
        for status in JobStatus
    }
    oldest_queued = (
        ProvisioningJob.objects.filter(status=JobStatus.QUEUED)
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    return {
        "statuses": [
            StatusCount(
                status=status.value,
                label=status.label,
                count=counts[status][0],
                approximate=counts[status][1],
            )
            for status in JobStatus
        ],
        "oldest_queued_age": ago(oldest_queued, now=now) if oldest_queued else None,
        "stale_count": selectors.job_list_stale(now=now).count(),
        "timeout": duration(settings.JOB_TIMEOUT_SECONDS),
        "unfulfillable": _unfulfillable_payments(),
        "cards": _extra_cards(now),
        "capacity_hold": _capacity_hold(now=now),
        "activity": overview_activity(now=now),
    }


def _capacity_hold(*, now: datetime) -> dict[str, Any] | None:
    """The hold on builds (Hetzner's server limit), if one is in force: what the card shows."""
    hold = selectors.capacity_hold_in_force(now=now)
    if hold is None:
        return None
    return {
        "since": ago(hold.started_at, now=now),
        "until": local_time(hold.until),
        "reason": hold.reason,
        "url": reverse("admin:provisioning_capacityhold_changelist"),
    }


def _unfulfillable_payments() -> dict[str, Any] | None:
    """The billing app's unfulfillable payments, if it has them in the admin."""
    try:
        model = apps.get_model("billing", "UnfulfillablePayment")
        if not admin.site.is_registered(model):
            return None
        url = reverse(f"admin:billing_{model._meta.model_name}_changelist")
        count = model._default_manager.order_by()[:1000].count()
    except (LookupError, NoReverseMatch):
        return None
    except DatabaseError as exc:  # billing's table not migrated here: the console still works
        logger.warning("could not count unfulfillable payments: %s", exc)
        return None
    return {"count": count, "url": url, "capped": count >= 1000}
