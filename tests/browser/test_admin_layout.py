"""The operator console at 1280 px with the sidebar open: every list and a job page with failed
attempts stay readable (no cell narrower than its header's word, nothing cut off to the right, the
timeline's "why" wide enough to read), the admin home puts the console first, and the jobs list
and a job page refresh themselves while work is active.

With SCREENSHOT_DIR set (`SCREENSHOT_DIR=docs/screenshots .venv/bin/python -m pytest
tests/browser/test_admin_layout.py`), the layout tests also save the operator screenshots the
README links.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from provisioning import services
from provisioning.models import Agent, JobKind, JobStatus, ProvisioningJob, Step
from tests.factories import AgentFactory, JobFactory, UserFactory
from tests.fakes.runner_backend import RecordingBackend
from tests.provisioning.helpers import dispatch, enqueue, requeue_now

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTH, HEIGHT = 1280, 900
MIN_WHY_PX = 280  # the timeline's "why" column: a sentence per line, not a word

# For every table matching `selector`: each body cell whose content box is narrower than the
# longest word of its column's header (measured in the header's own font), and any table wider
# than the box that holds it (cut off or scrolled sideways).
MEASURE = """
(selector) => {
  const narrow = [], overflow = [];
  for (const table of document.querySelectorAll(selector)) {
    const box = table.parentElement.getBoundingClientRect();
    const rect = table.getBoundingClientRect();
    if (rect.right > box.right + 1 || rect.right > window.innerWidth) {
      overflow.push({table: table.id || table.className, right: rect.right, box: box.right});
    }
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach((th, column) => {
      const text = th.innerText.trim();
      if (!text) return;
      const source = th.querySelector('a, span, div.text') || th;
      const style = getComputedStyle(source);
      const word = text.split(/\\s+/).reduce((a, b) => (b.length > a.length ? b : a), '');
      const probe = document.createElement('span');
      probe.textContent = word;
      for (const p of ['font', 'letterSpacing', 'textTransform']) probe.style[p] = style[p];
      probe.style.position = 'absolute';
      probe.style.whiteSpace = 'nowrap';
      document.body.appendChild(probe);
      const need = probe.getBoundingClientRect().width;
      probe.remove();
      for (const body of table.tBodies) {
        for (const row of body.rows) {
          const cell = row.cells[column];
          if (!cell) continue;
          const cs = getComputedStyle(cell);
          const width = cell.getBoundingClientRect().width
            - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
          if (width + 0.5 < need) {
            narrow.push({table: table.id, header: text, word, need, width, row: row.rowIndex});
          }
        }
      }
    });
  }
  return {narrow, overflow};
}
"""


def ansible_report(attempt: int, lines: int = 45) -> str:
    """What a configure step's failure report looks like (the runner sends the last few KB):
    Ansible's output, then the error."""
    out = [f"PLAY [agent host] ***** attempt {attempt}", "TASK [Gathering Facts] *****"]
    for n in range(lines - 4):
        out.append(f"ok: [203.0.113.7] => (item=agent-package-{n:02d}) changed=false")
    out.append(
        'fatal: [203.0.113.7]: FAILED! => {"changed": false, "msg": "No package matching '
        "'agentd=2.4.1' is available\"}"
    )
    out.append("ansible-playbook exited 2 at task [agent : install agent package]")
    return "\n".join(out)


@dataclass
class Console:
    failed: ProvisioningJob
    building: ProvisioningJob
    ended: Agent


def console_rows(*, attempts: int = 3, quiet: bool = False) -> Console:
    """An operator's day: a job that failed three times (long Ansible reports), builds in flight
    and queued, agents running for customers with long addresses, an ended agent whose
    deprovision deleted its VM."""
    backend = RecordingBackend()
    customer = UserFactory(email="procurement.department+agents@a-very-long-company-name.example")
    agent = AgentFactory(owner=customer, name="research-assistant-eu")
    failed = enqueue(agent, max_retries=attempts - 1)
    for attempt in range(1, attempts + 1):
        run = dispatch(failed, backend)
        failed = services.job_claim(job_id=failed.pk, attempt=attempt, run=run)
        services.job_heartbeat(job_id=failed.pk, run=run, step=Step.CONFIGURE, progress=60)
        failed = services.job_fail(
            job_id=failed.pk, run=run, error=ansible_report(attempt), failed_step=Step.CONFIGURE
        )
        if failed.is_queued:
            requeue_now(failed)
    for n in range(6):
        owner = UserFactory(email=f"team-{n}.operations@customer-{n}-holdings.example")
        built = AgentFactory(owner=owner, ipv4=f"198.51.100.{n + 10}", server_id=str(4000 + n))
        done = JobFactory(
            agent=built,
            status=JobStatus.RUNNING,
            workflow_run_id=str(17761234500 + n),
            completed_at=timezone.now(),
        )
        ProvisioningJob.objects.filter(pk=done.pk).update(
            created_at=timezone.now() - timedelta(hours=3 * n + 2, minutes=17 * n)
        )
    if quiet:  # nothing in flight: the list holds still for its picture
        building = JobFactory(status=JobStatus.RUNNING, completed_at=timezone.now())
    else:
        building = JobFactory(
            status=JobStatus.PROVISIONING,
            step=Step.CREATE_SERVER,
            progress=25,
            claimed_at=timezone.now(),
            last_heartbeat_at=timezone.now(),
            workflow_run_id="17761234599",
        )
        JobFactory(status=JobStatus.QUEUED)
    ended = AgentFactory(
        ended_at=timezone.now(), end_reason="subscription deleted in Stripe", ipv4=None
    )
    JobFactory(agent=ended, status=JobStatus.RUNNING, completed_at=timezone.now())
    JobFactory(
        agent=ended,
        kind=JobKind.DEPROVISION,
        status=JobStatus.RUNNING,
        completed_at=timezone.now(),
        workflow_run_id="17761234600",
    )
    return Console(failed=failed, building=building, ended=ended)


@pytest.fixture
def operator_page(page: Any, login: Any) -> Any:
    UserFactory(username="olga", is_staff=True, is_superuser=True)
    page.set_viewport_size({"width": WIDTH, "height": HEIGHT})
    login("olga")
    return page


def shoot(page: Any, name: str) -> None:
    """Saves a 1280 px screenshot when SCREENSHOT_DIR is set (the README's pictures)."""
    folder = os.environ.get("SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def assert_readable(page: Any, selector: str) -> None:
    found = page.evaluate(MEASURE, selector)
    assert page.locator(selector).count() > 0, f"no table {selector}"
    assert not found["narrow"], f"cells narrower than their header's word: {found['narrow'][:5]}"
    assert not found["overflow"], f"tables wider than the page: {found['overflow']}"
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= WIDTH, f"the page scrolls sideways: {scroll} px wide"


def assert_sidebar_open(page: Any) -> None:
    assert page.locator("#nav-sidebar").is_visible(), "the admin's sidebar should be open"


def test_the_jobs_and_agents_lists_are_readable_at_1280_px(operator_page):
    page = operator_page
    rows = console_rows()

    page.goto(reverse("admin:provisioning_provisioningjob_changelist"))
    shoot(page, "admin-jobs")
    assert_sidebar_open(page)
    assert_readable(page, "#result_list")
    header = page.locator("#result_list thead").inner_text().lower()
    for column in ("customer", "age", "workflow run"):
        assert column in header
    customer = page.locator("#result_list td.field-customer span.job-cut").first
    assert customer.get_attribute("title") == customer.inner_text()  # cut, whole in the title
    # Picked by its run id: a row's text runs its cells together, so a short id ending in "de"
    # beside a "Provisioning" badge would also match "deprovision".
    deprovision = page.locator("#result_list tr", has_text="17761234600")
    assert deprovision.locator(".job-badge").inner_text().strip() == "Deleted"

    page.goto(reverse("admin:provisioning_agent_changelist"))
    shoot(page, "admin-agents")
    assert_readable(page, "#result_list")
    assert "ipv4" in page.locator("#result_list thead").inner_text().lower()
    ended = page.locator("#result_list tr", has_text=rows.ended.name)
    assert ended.locator("td.field-latest_job").inner_text().strip() == "Deleted"

    page.goto(reverse("admin:provisioning_agent_change", args=[rows.failed.agent_id]))
    shoot(page, "admin-agent")
    assert_readable(page, "#jobs-group table")

    page.goto(reverse("admin:provisioning_jobevent_changelist"))
    shoot(page, "admin-job-events")
    assert_readable(page, "#result_list")


def test_a_job_page_with_failed_attempts_is_readable_at_1280_px(operator_page):
    page = operator_page
    rows = console_rows()

    page.goto(reverse("admin:provisioning_provisioningjob_change", args=[rows.failed.pk]))
    shoot(page, "admin-job-failed-attempts")
    assert_sidebar_open(page)
    assert_readable(page, "#job-timeline")
    why = page.locator("#job-timeline td.why").first.bounding_box()
    assert why is not None and why["width"] >= MIN_WHY_PX
    panels = page.locator("article.job-attempt")
    assert panels.count() == 3
    latest = panels.first
    assert latest.get_attribute("id") == "attempt-3"
    assert latest.locator(".job-badge").inner_text().strip() == "Failed"
    assert "exited 2" in latest.locator(".job-attempt-error").inner_text()
    assert panels.nth(1).locator(".job-badge").inner_text().strip() == "Failed, retried"
    tail = latest.locator("pre.job-output-tail").inner_text().strip().splitlines()
    assert len(tail) == 20 and tail[-1].startswith("ansible-playbook exited 2")
    everything = latest.locator("details.job-output-all")
    assert not everything.evaluate("d => d.open")
    assert not everything.locator("pre").is_visible()
    everything.locator("summary").click()
    assert everything.locator("pre").is_visible()
    assert "PLAY [agent host] ***** attempt 3" in everything.locator("pre").inner_text()
    everything.locator("summary").click()  # closed again for the picture
    # One line per event: the reports are in the panels, so the page stays a page long.
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 4 * HEIGHT, f"the job page is {height} px long"


def test_the_admin_home_puts_the_console_first_and_stripe_last_closed(operator_page):
    page = operator_page
    page.goto(reverse("admin:index"))

    modules = page.locator("#content-main div.module").evaluate_all(
        "els => els.map(e => Array.from(e.classList).find(c => c.startsWith('app-')))"
    )
    assert modules[0] == "app-provisioning"
    assert modules[-1] == "app-djstripe"
    assert modules.index("app-billing") < modules.index("app-auth")
    first_models = page.locator("#content-main .app-provisioning th[scope=row]").all_inner_texts()
    assert first_models[:2] == ["Provisioning jobs", "Agents"]
    stripe = page.locator("#content-main .app-djstripe details")
    assert not stripe.evaluate("d => d.open")
    assert "Stripe mirror (dj-stripe)" in stripe.locator("summary").text_content()
    assert not stripe.locator("table").is_visible()
    shoot(page, "admin-home")

    # The sidebar lists them alike, and opens Stripe's tables on their own pages.
    page.goto(reverse("admin:provisioning_provisioningjob_changelist"))
    sidebar = page.locator("#nav-sidebar div.module").evaluate_all(
        "els => els.map(e => Array.from(e.classList).find(c => c.startsWith('app-')))"
    )
    assert sidebar[0] == "app-provisioning" and sidebar[-1] == "app-djstripe"
    assert not page.locator("#nav-sidebar .app-djstripe details").evaluate("d => d.open")
    page.goto(reverse("admin:djstripe_event_changelist"))
    assert page.locator("#nav-sidebar .app-djstripe details").evaluate("d => d.open")


def test_the_jobs_list_and_a_job_page_refresh_while_work_is_active(operator_page, settings):
    settings.CONSOLE_POLL_SECONDS = 1
    page = operator_page
    building = JobFactory(
        status=JobStatus.PROVISIONING,
        step=Step.CREATE_SERVER,
        claimed_at=timezone.now(),
        last_heartbeat_at=timezone.now(),
    )

    page.goto(reverse("admin:provisioning_provisioningjob_change", args=[building.pk]))
    live = page.locator("#job-live")
    assert live.get_attribute("hx-trigger") == "every 1s"
    ProvisioningJob.objects.filter(pk=building.pk).update(step=Step.CONFIGURE, progress=60)
    page.locator("#job-live .job-now-grid", has_text="configure · 60%").wait_for()
    ProvisioningJob.objects.filter(pk=building.pk).update(
        status=JobStatus.RUNNING, completed_at=timezone.now()
    )
    page.locator(".job-finished-note").wait_for()
    assert page.locator("#job-live .job-badge").first.inner_text().strip() == "Running"
    assert page.locator("#job-live").get_attribute("hx-trigger") is None  # polling stopped

    queued = JobFactory(status=JobStatus.QUEUED)
    page.goto(reverse("admin:provisioning_provisioningjob_changelist"))
    queued_card = page.locator("#job-overview a[data-status=queued] .n")
    assert queued_card.inner_text() == "1"
    later = JobFactory(status=JobStatus.QUEUED)
    page.locator("#result_list", has_text=later.short_id).wait_for()
    assert queued_card.inner_text() == "2"
    # While a row is picked for an action the rows stay put; the choice survives.
    page.locator("#result_list tr", has_text=queued.short_id).locator("input.action-select").check()
    page.evaluate(
        "window.skipped = 0; document.addEventListener('htmx:beforeRequest',"
        " e => { if (e.defaultPrevented) window.skipped += 1; })"
    )
    third = JobFactory(status=JobStatus.QUEUED)
    page.wait_for_function("() => window.skipped >= 2")  # two polls came and were skipped
    assert page.locator("#result_list").get_by_text(third.short_id).count() == 0
    assert page.locator("#result_list input.action-select:checked").count() == 1
    page.locator("#result_list input.action-select:checked").uncheck()
    page.locator("#result_list", has_text=third.short_id).wait_for()
    # Django's action checkboxes work on the refreshed rows (counter and select-all).
    page.locator("#action-toggle").check()
    assert re.search(r"\b4 of 4 selected", page.locator(".action-counter").inner_text())
    page.locator("#action-toggle").uncheck()
    ProvisioningJob.objects.filter(status=JobStatus.QUEUED).update(
        status=JobStatus.FAILED, completed_at=timezone.now()
    )
    page.locator("#job-overview:not([hx-trigger])").wait_for()  # nothing in flight: it stops
    assert page.locator("#job-overview a[data-status=queued] .n").inner_text() == "0"
