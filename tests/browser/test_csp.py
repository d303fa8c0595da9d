"""The Content Security Policy in a real browser: every kind of page (dashboard, buy form, admin
console, sign-up, login, password reset, API docs) renders without a single violation, and Swagger UI comes from our own
static files (no CDN)."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from provisioning.models import JobStatus, Step
from tests.factories import AgentFactory, JobFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def watch(page: Any) -> tuple[list[str], list[str]]:
    """Collects CSP violations (as the page's own event reports them) and off-site requests."""
    violations: list[str] = []
    offsite: list[str] = []
    page.on(
        "console",
        lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e =>"
        " console.error('Content Security Policy violation: ' + e.violatedDirective"
        " + ' ' + e.blockedURI));"
    )
    page.on(
        "request",
        lambda req: (
            offsite.append(req.url)
            if not req.url.startswith(("http://localhost", "http://127.0.0.1", "data:"))
            else None
        ),
    )
    return violations, offsite


def visit(page: Any, path: str) -> None:
    response = page.goto(path)
    assert response is not None and response.status == 200, (
        f"{path}: {response and response.status}"
    )
    assert "content-security-policy" in response.headers, path
    page.wait_for_load_state("networkidle")


def test_the_customers_pages_pass_the_policy(page, login):
    customer = UserFactory(username="ada")
    agent = AgentFactory(owner=customer)
    JobFactory(agent=agent, user=customer, status=JobStatus.PROVISIONING, step=Step.CONFIGURE)
    violations, offsite = watch(page)

    for path in (
        reverse("account_signup"),
        reverse("account_reset_password"),
        reverse("account_email_verification_sent"),
        reverse("login"),
    ):
        visit(page, path)
    login("ada", path=reverse("login"))
    for path in (
        reverse("dashboard:agent-list"),
        reverse("dashboard:agent-detail", args=[agent.pk]),
        reverse("dashboard:agent-buy"),
    ):
        visit(page, path)
    page.wait_for_timeout(500)  # let the status block poll once (htmx)

    assert violations == []
    assert offsite == []


def test_the_operator_console_passes_the_policy(page, login):
    UserFactory(username="olga", is_staff=True, is_superuser=True)
    failed = JobFactory(
        status=JobStatus.FAILED,
        failed_step=Step.CONFIGURE,
        error="ansible: task [install agent] failed",
        completed_at=timezone.now(),
    )
    violations, offsite = watch(page)

    login("olga")
    for path in (
        reverse("admin:index"),
        reverse("admin:provisioning_provisioningjob_changelist"),
        reverse("admin:provisioning_provisioningjob_change", args=[failed.pk]),
        reverse("admin:provisioning_agent_changelist"),
        reverse("admin:provisioning_jobevent_changelist"),
    ):
        visit(page, path)

    assert violations == []
    assert offsite == []


def test_the_api_docs_render_offline_and_pass_the_policy(page):
    violations, offsite = watch(page)

    visit(page, reverse("swagger-ui"))
    page.locator(".swagger-ui .info .title").wait_for()

    assert "Agent provisioning API" in page.locator(".swagger-ui .info .title").inner_text()
    assert violations == []
    assert offsite == []


def test_only_the_docs_page_allows_inline_styles_and_no_page_allows_inline_scripts(client, db):
    docs = client.get(reverse("swagger-ui"))["Content-Security-Policy"]
    login = client.get(reverse("login"))["Content-Security-Policy"]

    assert "style-src 'self' 'unsafe-inline'" in docs
    assert "style-src 'self';" in login + ";"
    for policy in (docs, login):
        assert "script-src 'self';" in policy + ";"
