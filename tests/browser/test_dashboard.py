"""The dashboard in a real browser, against the whole local pipeline (what `make run` starts).

A customer logs in, buys an agent through the local checkout page, and watches the agent page
(polling its htmx partial) while the local runner builds it: the progress bar moves and the page
ends on `running` with the server's address; a forced failure shows the plain-language reason.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from provisioning.models import Agent, JobEvent
from tests.browser.dashboard_fixtures import Pipeline, pipeline  # noqa: F401 - a fixture
from tests.factories import UserFactory

# PostgreSQL only: on SQLite the test database is in memory, and pytest-django's live server
# shares that one connection among its threads; with the runner's heartbeats, htmx polls and the
# worker all writing at once, SQLite's shared cache answers "database table is locked".
# Fixture order matters: `pipeline` (database work in this thread) before `page` (see Pipeline.db).
pytestmark = [
    pytest.mark.browser,
    pytest.mark.postgres_only,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]

PASSWORD = "correct horse battery staple"
IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def log_in(page: Any, base_url: str, username: str) -> None:
    page.goto(f"{base_url}/agents/")
    assert "/accounts/login/" in page.url
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="My agents").wait_for()


def buy(page: Any, *, name: str, region: str) -> None:
    page.get_by_role("link", name="Buy an agent").first.click()
    page.get_by_label("Agent name").fill(name)
    page.get_by_label("Region").select_option(region)
    page.get_by_role("button", name="Continue to payment").click()
    assert "/billing/local-checkout/" in page.url
    page.get_by_role("button", name="Pay (test mode)").click()
    page.get_by_role("heading", name="My agents").wait_for()


def open_agent(page: Any, name: str) -> None:
    page.get_by_role("link", name=name).click()
    page.get_by_role("heading", name=name).wait_for()


def diagnostics(stack: Pipeline) -> str:
    events = "\n".join(
        f"{e.created_at:%H:%M:%S.%f} {e.action} {e.from_status}->{e.to_status} {e.step} {e.reason}"
        for e in stack.db(lambda: list(JobEvent.objects.order_by("created_at", "id")))
    )
    return f"job events:\n{events}\nrunner logs:\n{stack.runner_logs()}"


# One read of the status block, so a swap between two reads can't mix two states.
SNAPSHOT_JS = """() => {
  const block = document.querySelector("section.status");
  const bar = block && block.querySelector("progress");
  return [block ? block.dataset.state : "", bar ? Number(bar.value) : null];
}"""


def watch_until_final(page: Any, *, timeout: float = 90.0) -> tuple[str, list[int]]:
    """Read the status block as htmx replaces it; the final state and every progress value seen."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state, progress = page.evaluate(SNAPSHOT_JS)
        if state == "provisioning" and progress is not None and (not seen or seen[-1] != progress):
            seen.append(progress)
        if state in ("running", "failed"):
            break
        page.wait_for_timeout(200)
    return state, seen


def test_a_customer_buys_an_agent_and_watches_it_reach_running(pipeline, page):  # noqa: F811
    pipeline.db(lambda: UserFactory(username="ada"))

    log_in(page, pipeline.base_url, "ada")
    buy(page, name="Browser agent", region="eu-central")
    open_agent(page, "Browser agent")
    state, progress_seen = watch_until_final(page)

    assert state == "running", diagnostics(pipeline)
    assert len(progress_seen) >= 2, f"progress bar never moved: {progress_seen}"
    assert progress_seen == sorted(progress_seen), f"progress went backwards: {progress_seen}"
    address = page.locator("code.ipv4").inner_text()
    assert IPV4.match(address), address
    assert pipeline.db(lambda: Agent.objects.get(name="Browser agent").ipv4) == address
    assert [s["public_net"]["ipv4"]["ip"] for s in pipeline.hetzner.servers] == [address]
    assert page.locator('[data-state="done"]').count() == 6
    assert page.locator("section.status").get_attribute("hx-trigger") is None  # polling stopped


def test_a_forced_failure_shows_the_plain_language_reason(settings, pipeline, page):  # noqa: F811
    settings.LOCAL_RUNNER_FAIL_STEP = "configure"
    settings.MAX_RETRIES = 0  # the new job's max_retries: fail at once, no automatic retry
    pipeline.db(lambda: UserFactory(username="grace"))

    log_in(page, pipeline.base_url, "grace")
    buy(page, name="Doomed agent", region="us-east")
    open_agent(page, "Doomed agent")
    state, _progress = watch_until_final(page)

    assert state == "failed", diagnostics(pipeline)
    status = page.locator("section.status")
    assert "Installing the agent software on your server failed." in status.inner_text()
    assert "Our team has been notified and we are on it." in status.inner_text()
    assert page.locator('[data-step="configure"][data-state="failed"]').count() == 1
    assert page.get_by_role("button", name="Re-provision").is_visible()
    job_error = pipeline.db(lambda: Agent.objects.get(name="Doomed agent").jobs.get().error)
    assert job_error
    assert job_error[:40] not in page.content()  # the raw error is for operators only
