"""The operator console in a real browser: an operator logs in, filters failed jobs, retries one
and sees it queued with the retry in its timeline."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from provisioning import backends
from provisioning.models import JobEvent, JobStatus, Step
from tests.factories import JobFactory, UserFactory
from tests.fakes.runner_backend import RecordingBackend

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def recording_backend(settings: Any) -> Any:
    """No real runs: a retry's after-commit dispatch lands in a recording backend."""
    backend = RecordingBackend()
    backends.set_backend(backend)
    yield backend
    backends.reset_backend()


def test_an_operator_filters_failed_jobs_and_retries_one(page, login, recording_backend):
    operator = UserFactory(username="olga", is_staff=True)
    operator.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="provisioning",
            codename__in=["view_provisioningjob", "view_agent", "view_jobevent", "retry_job"],
        )
    )
    failed = JobFactory(
        status=JobStatus.FAILED,
        failed_step=Step.CONFIGURE,
        error="ansible: task [install agent] failed",
        retry_count=3,
        max_retries=3,
        attempt=4,
        completed_at=timezone.now(),
    )
    running = JobFactory(status=JobStatus.RUNNING)
    jobs_url = reverse("admin:provisioning_provisioningjob_changelist")

    login("olga", path=f"/admin/login/?next={jobs_url}")
    page.locator("#changelist-filter").get_by_role("link", name="Failed", exact=True).click()
    page.wait_for_url(re.compile(r"status__exact=failed"))
    assert page.locator("#result_list").get_by_text(running.short_id).count() == 0
    row = page.locator("#result_list tr", has_text=failed.short_id)
    row.locator("input.action-select").check()
    page.locator("select[name=action]").select_option("retry_jobs")
    page.get_by_role("button", name="Go").click()

    page.locator("ul.messagelist").get_by_text("1 retried, 0 skipped.").wait_for()
    page.goto(reverse("admin:provisioning_provisioningjob_change", args=[failed.pk]))
    assert page.locator(".job-badge").first.inner_text().strip() == "Queued"
    retry_row = page.locator("#job-timeline tr.event-retry")
    assert "operator:olga" in retry_row.inner_text()
    assert "failed → queued" in retry_row.inner_text()
    assert JobEvent.objects.filter(job=failed, action="retry", actor="operator:olga").exists()
