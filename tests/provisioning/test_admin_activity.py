"""The admin overview's activity chart: builds per hour by outcome and p50/p95 order-to-running
over the last 24 hours, drawn as inline SVG the CSP allows (no script, no inline style)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from provisioning.models import JobEvent, JobKind, JobStatus, ProvisioningJob
from tests.factories import JobEventFactory, JobFactory

pytestmark = pytest.mark.django_db

JOBS = reverse("admin:provisioning_provisioningjob_changelist")


def ended(*, ordered: datetime, after: float, action: str, kind: str = JobKind.PROVISION) -> None:
    """A job ordered at `ordered` whose attempt ended (`action`) `after` seconds later."""
    status = JobStatus.RUNNING if action == "complete" else JobStatus.FAILED
    job = JobFactory(status=status, kind=kind)
    ProvisioningJob.objects.filter(pk=job.pk).update(created_at=ordered)
    event = JobEventFactory(job=job, action=action, attempt=1)
    JobEvent.objects.filter(pk=event.pk).update(created_at=ordered + timedelta(seconds=after))


def test_the_overview_draws_builds_per_hour_and_the_time_to_running_percentiles(admin_client):
    now = timezone.now()
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    two_hours_ago = this_hour - timedelta(hours=2)
    for seconds in (100, 200, 300):
        ended(ordered=two_hours_ago, after=seconds, action="complete")
    ended(ordered=two_hours_ago, after=60, action="fail")
    ended(ordered=this_hour, after=0, action="complete")
    ended(ordered=this_hour, after=0, action="timeout")
    ended(ordered=this_hour, after=0, action="complete", kind=JobKind.DEPROVISION)  # not a build
    ended(ordered=now - timedelta(days=2), after=5, action="complete")  # out of the window
    # Ordered an hour before the others, the slowest of five.
    ended(ordered=two_hours_ago - timedelta(hours=1), after=3600, action="complete")

    response = admin_client.get(JOBS)

    assert response.status_code == 200
    html = response.content.decode()
    activity = response.context["overview"]["activity"]
    assert (activity.succeeded, activity.failed, activity.reached_running) == (5, 2, 5)
    chart = re.search(r'<figure class="job-activity".*?</figure>', html, re.S)
    assert chart is not None
    figure = chart.group(0)
    assert f"<title>{two_hours_ago:%H}:00 UTC: 4 succeeded, 1 failed</title>" in figure
    assert f"<title>{this_hour:%H}:00 UTC: 1 succeeded, 1 failed</title>" in figure
    assert figure.count("<title>") == 24
    # Nearest rank of 0 s, 100 s, 200 s, 300 s, 3600 s: p50 = 200 s, p95 = 3600 s.
    assert '<strong id="time-to-running-p50">3m</strong>' in figure
    assert '<strong id="time-to-running-p95">1h</strong>' in figure
    assert "<script" not in figure and "style=" not in figure
    assert "script-src 'self'" in response["Content-Security-Policy"]


def test_the_overview_chart_without_any_build(admin_client):
    response = admin_client.get(JOBS)

    activity = response.context["overview"]["activity"]
    assert (activity.succeeded, activity.failed, activity.p50, activity.p95) == (0, 0, "—", "—")
    assert 'id="job-activity"' in response.content.decode()
