"""What the console's admin pages share: read-only state, a paginator that never counts a million
rows, compact ages, safe links to workflow runs, and how an action reports what it did.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from provisioning import backends
from provisioning.errors import ProvisioningError

logger = logging.getLogger(__name__)


class ReadOnlyAdmin(admin.ModelAdmin[Any]):
    """State is changed only by services (the actions), never by editing a form.

    Every list is built for tables of millions of rows: no full COUNT(*) (EstimatedCountPaginator,
    show_full_result_count off), no facet counts, no date drill-down queries.
    """

    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    date_hierarchy = None
    list_per_page = 50

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(
        description=mark_safe(
            '<input type="checkbox" id="action-toggle" aria-label="Select all objects on this page for an action">'
        )
    )
    def action_checkbox(self, obj: Any) -> SafeString:
        # Django renders this through the form-widget template engine, a third of a page's
        # render time at 50 rows; the same markup, written directly.
        return format_html(
            '<input type="checkbox" name="{}" value="{}" class="action-select" '
            'aria-label="Select this object for an action - {}">',
            helpers.ACTION_CHECKBOX_NAME,
            str(obj.pk),
            str(obj),
        )

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def fieldset_fields(fieldsets: Sequence[tuple[Any, Mapping[str, Any]]]) -> list[str]:
    """Every field named in `fieldsets`, in order: read-only pages show exactly what they lay out."""
    names: list[str] = []
    for _title, options in fieldsets:
        for entry in options["fields"]:
            names.extend([entry] if isinstance(entry, str) else entry)
    return names


class EstimatedCountPaginator(Paginator[Any]):
    """Counts exactly up to EXACT_LIMIT rows; past that, PostgreSQL's estimate.

    Django's paginator runs COUNT(*) over the whole filtered queryset on every page view: a full
    scan of a 1M-row table. Here the exact count is capped (`SELECT COUNT(*) FROM (… LIMIT n)`),
    and a bigger result takes the table's `pg_class.reltuples` (unfiltered) or the planner's row
    estimate (filtered). Pages stay navigable; past MAX_ESTIMATED_PAGES the operator narrows the
    filters instead of paging through OFFSET 100000 (which would be slow anyway).
    On SQLite (development) a big result is simply counted.
    """

    EXACT_LIMIT = 1_000
    MAX_ESTIMATED_PAGES = 200

    is_estimate = False

    @cached_property
    def count(self) -> int:
        rows = self.object_list
        if not isinstance(rows, QuerySet):
            return len(rows)
        count, self.is_estimate = capped_count(rows, exact_limit=self.EXACT_LIMIT)
        return count

    @property
    def display_count(self) -> str:
        return f"{self.count:,}"

    @cached_property
    def num_pages(self) -> int:
        pages = super().num_pages
        if self.is_estimate:
            return min(pages, self.MAX_ESTIMATED_PAGES)
        return pages


def capped_count(queryset: QuerySet[Any], *, exact_limit: int) -> tuple[int, bool]:
    """(count, is_estimate): exact up to `exact_limit` rows, else PostgreSQL's estimate.

    The exact part reads at most exact_limit + 1 rows (`COUNT(*) FROM (… LIMIT n)`). Elsewhere
    than PostgreSQL (SQLite in development) a bigger result is counted in full.
    """
    capped = queryset.order_by()[: exact_limit + 1].count()
    if capped <= exact_limit:
        return capped, False
    estimate = estimate_count(queryset)
    if estimate is None:
        return queryset.count(), False
    return max(estimate, capped), True


def estimate_count(queryset: QuerySet[Any]) -> int | None:
    """PostgreSQL's own idea of how many rows `queryset` has, without reading them; None elsewhere.

    Unfiltered: the table's reltuples (kept by ANALYZE/autovacuum). Filtered: the planner's estimate
    from EXPLAIN. Either can be off by a few percent: the console says "about".
    """
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    try:
        with connection.cursor() as cursor:
            if not queryset.query.where:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                    [queryset.model._meta.db_table],
                )
                row = cursor.fetchone()
                if row and row[0] >= 0:  # -1: never analyzed
                    return int(row[0])
            sql, params = queryset.order_by().query.sql_with_params()
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            plan = cursor.fetchone()[0]
            if isinstance(plan, str):
                plan = json.loads(plan)
            return int(plan[0]["Plan"]["Plan Rows"])
    except Exception:  # an estimate is a nicety: fall back to counting
        logger.exception("row estimate failed for %s", queryset.model._meta.label)
        return None


def ago(moment: datetime | None, *, now: datetime | None = None) -> str:
    """`45s`, `12m`, `3h 5m`, `4d 2h`: how long ago, short enough for a table cell."""
    if moment is None:
        return "—"
    seconds = int(((now or timezone.now()) - moment).total_seconds())
    return duration(max(seconds, 0))


def duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if minutes < 60:
        return f"{minutes}m"
    if hours < 24:
        rest = minutes - hours * 60
        return f"{hours}h {rest}m" if rest else f"{hours}h"
    rest = hours - days * 24
    return f"{days}d {rest}h" if rest else f"{days}d"


def run_url(run_id: str | None) -> str | None:
    """The backend's link to a workflow run; None if it has none or cannot be built."""
    if not run_id:
        return None
    try:
        return backends.get_backend().run_url(run_id=run_id)
    except Exception:  # a misconfigured backend must not break the console
        logger.warning("no run link for %s: backend unavailable", run_id, exc_info=True)
        return None


def run_link(run_id: str | None) -> SafeString | str:
    if not run_id:
        return "—"
    url = run_url(run_id)
    if not url:
        return run_id
    return format_html('<a href="{}" target="_blank" rel="noopener">{} ↗</a>', url, run_id)


def local_time(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")


def seconds(value: timedelta) -> int:
    return int(value.total_seconds())


# --- what an action reports ------------------------------------------------------------------


def action_report(verb: str, changed: int, skipped: Counter[str]) -> str:
    """`2 retried, 1 skipped (1 was running).`"""
    total = sum(skipped.values())
    text = f"{changed} {verb}, {total} skipped"
    if total:
        ordered = sorted(skipped.items(), key=lambda item: (-item[1], item[0]))
        reasons = ", ".join(f"{n} {why}" for why, n in ordered)
        text += f" ({reasons})"
    return text + "."


def skip_reason(error: ProvisioningError) -> str:
    """Why an action left one object alone, in a few words (`was running`, `agent ended`)."""
    current = getattr(error, "current", None)
    if current:
        return f"was {current}"
    return {
        "agent_ended": "agent ended",
        "provision_in_progress": "agent already has an active job",
        "not_found": "no longer exists",
    }.get(error.code, error.code)


def report_level(changed: int, skipped: Counter[str]) -> int:
    """The message level of an action's report: error if nothing changed, warning if some skipped."""
    if not changed:
        return messages.ERROR if skipped else messages.INFO
    return messages.WARNING if skipped else messages.SUCCESS
