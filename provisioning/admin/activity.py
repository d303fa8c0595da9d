"""The admin overview's activity chart: builds per hour by outcome over the last 24 hours, and the
median and 95th percentile of order-to-running over the same window.

Drawn on the server as inline SVG (no script: the CSP allows none inline, and none is needed);
its colours come from the console's stylesheet, by class. The figures are SQL aggregates from
provisioning/ops/timings.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from provisioning.admin.common import duration
from provisioning.ops import timings

BAR_WIDTH = 12
BAR_GAP = 2
CHART_HEIGHT = 60
LABEL_HEIGHT = 12


@dataclass(frozen=True)
class Activity:
    svg: SafeString
    succeeded: int
    failed: int
    reached_running: int  # provisions that reached running in the window (order to running)
    p50: str  # "—" without any
    p95: str


def _bar(index: int, hour: timings.HourOutcomes, scale: float) -> tuple[object, ...]:
    x = index * (BAR_WIDTH + BAR_GAP)
    ok = round(hour.succeeded * scale)
    failed = round(hour.failed * scale)
    title = f"{hour.hour:%H}:00 UTC: {hour.succeeded} succeeded, {hour.failed} failed"
    return (
        x,
        title,
        x,
        CHART_HEIGHT - ok,
        BAR_WIDTH,
        ok,
        x,
        CHART_HEIGHT - ok - failed,
        BAR_WIDTH,
        failed,
    )


def _svg(hours: list[timings.HourOutcomes]) -> SafeString:
    peak = max((h.succeeded + h.failed for h in hours), default=0)
    scale = CHART_HEIGHT / peak if peak else 0.0
    width = len(hours) * (BAR_WIDTH + BAR_GAP)
    bars = format_html_join(
        "",
        '<g class="hour" data-x="{}"><title>{}</title>'
        '<rect class="ok" x="{}" y="{}" width="{}" height="{}"></rect>'
        '<rect class="failed" x="{}" y="{}" width="{}" height="{}"></rect></g>',
        (_bar(index, hour, scale) for index, hour in enumerate(hours)),
    )
    # An hour label every six hours, under its bar.
    labels = format_html_join(
        "",
        '<text x="{}" y="{}">{}</text>',
        (
            (index * (BAR_WIDTH + BAR_GAP), CHART_HEIGHT + LABEL_HEIGHT, f"{hour.hour:%H}:00")
            for index, hour in enumerate(hours)
            if index % 6 == 0
        ),
    )
    total_ok = sum(h.succeeded for h in hours)
    total_failed = sum(h.failed for h in hours)
    return format_html(
        '<svg class="activity-chart" role="img" viewBox="0 0 {} {}" width="{}" height="{}" '
        'aria-label="Builds per hour over the last 24 hours: {} succeeded, {} failed">'
        '<line class="axis" x1="0" y1="{}" x2="{}" y2="{}"></line>{}{}</svg>',
        width,
        CHART_HEIGHT + LABEL_HEIGHT + 2,
        width,
        CHART_HEIGHT + LABEL_HEIGHT + 2,
        total_ok,
        total_failed,
        CHART_HEIGHT,
        width,
        CHART_HEIGHT,
        bars,
        labels,
    )


def _seconds_text(value: float | None) -> str:
    return "—" if value is None else duration(round(value))


def overview_activity(*, now: datetime) -> Activity:
    hours = timings.builds_per_hour(now=now)
    reached = timings.time_to_running(now=now).count
    return Activity(
        svg=_svg(hours),
        succeeded=sum(h.succeeded for h in hours),
        failed=sum(h.failed for h in hours),
        reached_running=reached,
        p50=_seconds_text(timings.time_to_running_percentile(now=now, fraction=0.5, count=reached)),
        p95=_seconds_text(
            timings.time_to_running_percentile(now=now, fraction=0.95, count=reached)
        ),
    )
