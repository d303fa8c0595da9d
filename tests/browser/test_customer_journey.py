"""A new customer's first hour in a real browser, against the whole local pipeline: sign up,
confirm the email, log in, buy an agent, watch it build and run, then cancel the subscription in
the (stand-in) customer portal and see the agent end; and a build that fails for good tells the
operators by exactly one email.

With SCREENSHOTS_DIR set (e.g. `SCREENSHOTS_DIR=docs/screenshots`), the customer's pages are
saved there at 1280 px wide: that is how the README's screenshots are made.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from django.core import mail

from provisioning.models import Agent, JobKind
from tests.browser.dashboard_fixtures import Pipeline, pipeline  # noqa: F401 - a fixture
from tests.browser.test_dashboard import buy, diagnostics, open_agent, watch_until_final
from tests.factories import UserFactory

# PostgreSQL only, like the dashboard's other pipeline tests (see test_dashboard.py).
pytestmark = [
    pytest.mark.browser,
    pytest.mark.postgres_only,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]

PASSWORD = "a long and new passphrase 7"
WIDTH = 1280


def screenshot(page: Any, name: str) -> None:
    """Save the page at 1280 px when SCREENSHOTS_DIR asks for it (the README's images)."""
    target = os.environ.get("SCREENSHOTS_DIR")
    if not target:
        return
    assert page.viewport_size["width"] == WIDTH
    Path(target).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


def wait_for_mail(count: int, *, timeout: float = 30.0) -> list[mail.EmailMessage]:
    deadline = time.monotonic() + timeout
    while len(mail.outbox) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return list(mail.outbox)


def the_link_in(message: mail.EmailMessage) -> str:
    (url,) = re.findall(r"https?://[^\s\"<>]+", message.body)
    return url


def watch_until(page: Any, state: str, *, timeout: float = 60.0) -> None:
    page.locator(f'section.status[data-state="{state}"]').wait_for(timeout=timeout * 1000)


def test_a_new_customer_signs_up_buys_an_agent_and_cancels_it(pipeline: Pipeline, page):  # noqa: F811
    # Sign up: nobody is logged in until the email address is confirmed.
    page.goto("/")
    assert "/accounts/login/" in page.url
    page.get_by_role("link", name="Create an account").click()
    page.get_by_role("heading", name="Create an account").wait_for()
    page.get_by_label("Email").fill("lin@example.com")
    page.get_by_label("Username").fill("lin")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    screenshot(page, "customer-sign-up")
    page.get_by_role("button", name="Create account").click()
    page.get_by_role("heading", name="Verify Your Email Address").wait_for()
    (confirmation,) = wait_for_mail(1)
    assert confirmation.to == ["lin@example.com"]
    page.goto("/agents/")
    assert "/accounts/login/" in page.url  # not logged in yet

    # Confirm, then log in (by email address).
    page.goto(the_link_in(confirmation))
    page.get_by_role("button", name="Confirm").click()
    page.get_by_role("heading", name="Log in").wait_for()
    page.get_by_label("Username or email").fill("lin@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="My agents").wait_for()

    # Buy (the price is on the buy page), then watch it build.
    page.get_by_role("link", name="Buy an agent").first.click()
    assert "per month" in page.locator(".price").inner_text()
    page.get_by_label("Agent name").fill("First agent")
    screenshot(page, "customer-buy")
    page.get_by_role("button", name="Continue to payment").click()
    page.get_by_role("button", name="Pay (test mode)").click()
    page.get_by_role("heading", name="My agents").wait_for()
    assert "Payment received" in page.locator(".messages").inner_text()
    open_agent(page, "First agent")
    watch_until(page, "provisioning")
    screenshot(page, "customer-agent-building")
    state, _progress = watch_until_final(page)
    assert state == "running", diagnostics(pipeline)
    reach = page.locator(".reach").inner_text()
    address = page.locator("code.ipv4").inner_text()
    assert f"http://{address}:8080/healthz" in reach
    screenshot(page, "customer-agent-running")
    page.get_by_role("link", name="← My agents").click()
    page.locator('section.status[data-state="running"]').wait_for()
    screenshot(page, "customer-dashboard-running")

    # Manage subscription → cancel in the portal → the agent ends, and its server goes.
    open_agent(page, "First agent")
    page.get_by_role("button", name="Manage subscription").click()
    page.get_by_role("heading", name="Your subscription").wait_for()
    page.get_by_role("button", name="Cancel subscription").click()
    page.get_by_role("heading", name="First agent").wait_for()
    status = page.locator("section.status")
    assert status.get_attribute("data-state") == "ended"
    assert "This agent has ended: subscription cancelled." in status.inner_text()
    assert page.locator("ol.steps").count() == 0  # the end, not six build steps "done"
    assert page.get_by_role("button", name="Manage subscription").count() == 0
    screenshot(page, "customer-agent-ended")
    agent = pipeline.db(lambda: Agent.objects.get(name="First agent"))
    assert agent.is_ended
    deadline = time.monotonic() + 60
    while pipeline.hetzner.servers and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pipeline.hetzner.servers == [], diagnostics(pipeline)
    kinds = pipeline.db(lambda: sorted(agent.jobs.values_list("kind", flat=True)))
    assert kinds == sorted([JobKind.PROVISION, JobKind.DEPROVISION])


def test_a_build_that_fails_for_good_sends_the_operators_one_email(settings, pipeline, page):  # noqa: F811
    settings.LOCAL_RUNNER_FAIL_STEP = "configure"
    settings.MAX_RETRIES = 0  # fail for good at the first failure
    settings.OPERATOR_ALERT_EMAILS = ["ops@example.test"]
    pipeline.db(lambda: UserFactory(username="grace"))

    page.goto("/accounts/login/")
    page.get_by_label("Username or email").fill("grace")
    page.get_by_label("Password").fill("correct horse battery staple")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="My agents").wait_for()
    buy(page, name="Doomed agent", region="us-east")
    open_agent(page, "Doomed agent")
    state, _progress = watch_until_final(page)
    assert state == "failed", diagnostics(pipeline)

    job = pipeline.db(lambda: Agent.objects.get(name="Doomed agent").jobs.get())
    (alert,) = wait_for_mail(1)
    time.sleep(2.0)  # several more worker ticks: nothing more is sent
    assert len(mail.outbox) == 1
    assert alert.to == ["ops@example.test"]
    assert str(job.pk) in alert.body
