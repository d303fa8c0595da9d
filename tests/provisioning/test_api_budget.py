"""The GitHub API budget every process shares (services/budget.py), GitHub faked at the wire:
when it is spent work waits and nothing fails; GitHub's rate-limit answers stop every process;
reconciliation lists runs instead of asking per job; /metrics shows it all."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.db.models import F
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from provisioning import selectors, services
from provisioning.backends.base import UNFINISHED_RUN_STATUSES, BudgetSpent
from provisioning.backends.github import GitHubBackend
from provisioning.models import ApiBudget, ApiCallCount, JobEvent, JobStatus, ProvisioningJob, Step
from provisioning.services import Run
from provisioning.services.budget import api_budget_draw, api_budget_wait, budget_shape
from tests.factories import AgentFactory
from tests.fakes.github import RATE_LIMIT_RESET_SECONDS, SECONDARY_RETRY_AFTER_SECONDS
from tests.provisioning.helpers import enqueue

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def wire_calls(fake_github) -> int:
    """Requests that reached GitHub and count against its limit (a 304 does not)."""
    return len(fake_github.requests) - fake_github.not_modified


def window_passes(settings) -> None:
    """A whole window goes by: the bucket refills (what time does to it)."""
    ApiBudget.objects.update(
        refilled_at=F("refilled_at") - timedelta(seconds=settings.API_BUDGET_WINDOW_SECONDS)
    )


# --- the bucket itself -----------------------------------------------------------------------------


def test_no_window_long_stretch_sees_more_than_the_budget(settings):
    settings.GITHUB_API_BUDGET_PER_HOUR = 100
    settings.API_BUDGET_WINDOW_SECONDS = 60
    start = timezone.now()
    taken: list[float] = []
    # Someone asks every 0.1 s for three windows; record when a draw succeeded.
    for tenth in range(1800):
        at = start + timedelta(seconds=tenth / 10)
        if api_budget_draw(purpose="test", now=at) == 0.0:
            taken.append(tenth / 10)

    most = max(sum(1 for t in taken if s <= t < s + 60) for s in [x / 10 for x in range(1200)])
    assert most <= 100
    assert len(taken) >= 2 * 95  # and it is not stingy: about the budget per window
    counts = ApiCallCount.objects.get(budget="github", purpose="test")
    assert (counts.calls, counts.refused) == (len(taken), 1800 - len(taken))


# --- dispatch waits when the budget is spent -----------------------------------------------------


def test_a_spent_budget_leaves_jobs_queued_untouched_and_dispatch_resumes_after_the_window(
    fake_github, settings
):
    settings.GITHUB_API_BUDGET_PER_HOUR = 60  # a bucket of 3: a token and two dispatches
    jobs = [enqueue(AgentFactory()) for _ in range(5)]
    events_before = JobEvent.objects.count()

    assert services.job_dispatch_due() == 2
    assert services.job_dispatch_due() == 0  # spent: nothing taken, nothing sent, nothing written
    assert wire_calls(fake_github) == 3

    waiting = ProvisioningJob.objects.filter(pk__in=[j.pk for j in jobs[2:]])
    assert all(
        (j.status, j.dispatched_at, j.next_attempt_at, j.retry_count, j.attempt)
        == (JobStatus.QUEUED, None, None, 0, 1)
        for j in waiting
    )
    assert JobEvent.objects.count() == events_before + 2  # the two DISPATCH events only
    assert not JobEvent.objects.filter(action=JobEvent.Action.DISPATCH_FAILED).exists()
    assert [j.pk for j in selectors.job_list_waiting(now=timezone.now())] == [
        j.pk for j in jobs[2:]
    ]

    window_passes(settings)

    assert services.job_dispatch_due() == 3  # the bucket holds 3 again; the token is cached
    assert ProvisioningJob.objects.filter(dispatched_at__isnull=True).count() == 0


def test_a_budget_spent_between_the_take_and_the_call_gives_the_job_back(
    fake_github, settings, monkeypatch
):
    job = enqueue(AgentFactory())
    # This dispatcher looked and saw requests left; another process spent them before its call.
    monkeypatch.setattr("provisioning.services.dispatch.api_budget_wait", lambda: 0.0)
    api_budget_draw(purpose="elsewhere")
    ApiBudget.objects.update(tokens=0.0, refilled_at=timezone.now())

    assert services.job_dispatch_next() is None

    job.refresh_from_db()
    assert (job.dispatched_at, job.next_attempt_at, job.retry_count) == (None, None, 0)
    assert fake_github.requests == []
    assert not JobEvent.objects.filter(job=job).exclude(action=JobEvent.Action.ENQUEUE).exists()
    assert ApiCallCount.objects.get(purpose="token").refused == 1


def test_a_resend_check_refused_by_the_budget_asks_again_later(fake_github, settings):
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    old = timezone.now() - timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)
    ProvisioningJob.objects.filter(pk=job.pk).update(dispatched_at=old)
    sent = len(fake_github.requests)
    backend = fake_github.backend(shared_budget=True)

    def spent(**_kwargs: object) -> None:
        raise BudgetSpent("spent", retry_after=30)

    backend.get_run = spent  # type: ignore[method-assign]
    assert services.job_dispatch_next(backend=backend) is None

    job.refresh_from_db()
    assert job.dispatched_at == old  # still due for its check, nothing re-sent
    assert len(fake_github.requests) == sent
    assert len(fake_github.dispatches) == 1


# --- GitHub's own rate-limit answers stop every process -------------------------------------------


@pytest.mark.parametrize(
    ("secondary", "wait"),
    [(False, RATE_LIMIT_RESET_SECONDS), (True, SECONDARY_RETRY_AFTER_SECONDS)],
)
@pytest.mark.parametrize("status", [403, 429])
def test_a_rate_limit_answer_blocks_every_backend_until_githubs_reset(
    fake_github, settings, secondary, wait, status
):
    one = GitHubBackend.from_settings(transport=fake_github.transport)
    other = GitHubBackend.from_settings(transport=fake_github.transport)  # another process's
    enqueue(AgentFactory())
    fake_github.rate_limit_next(status=status, secondary=secondary)

    assert services.job_dispatch_due(backend=one) == 1  # the token request met the limit
    sent = len(fake_github.requests)

    row = ApiBudget.objects.get(name="github")
    assert row.blocked_until is not None
    assert wait - 5 <= (row.blocked_until - timezone.now()).total_seconds() <= wait + 1
    with pytest.raises(BudgetSpent):
        other.get_run(run_id="1")
    assert len(fake_github.requests) == sent  # nothing reached GitHub
    enqueue(AgentFactory())
    assert services.job_dispatch_due(backend=other) == 0
    assert services.job_reconcile_runs(backend=other) == 0
    assert len(fake_github.requests) == sent


def _wait_seen_by_another_process() -> float:
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings');"
        "django.setup();"
        "from provisioning.services.budget import api_budget_wait; print(api_budget_wait())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url, "DJANGO_TESTING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_githubs_reset_is_honoured_by_another_process(fake_github):
    enqueue(AgentFactory())
    fake_github.rate_limit_next(status=403)  # x-ratelimit-remaining: 0 with x-ratelimit-reset

    services.job_dispatch_due()

    seen = _wait_seen_by_another_process()
    assert RATE_LIMIT_RESET_SECONDS - 10 <= seen <= RATE_LIMIT_RESET_SECONDS


# --- reconcile with list calls --------------------------------------------------------------------


def in_flight(fake_github, count: int, settings) -> list[tuple[ProvisioningJob, Run]]:
    settings.PROVISIONING_MAX_IN_FLIGHT = count
    settings.HETZNER_CALLS_PER_BUILD = 0
    jobs = [enqueue(AgentFactory()) for _ in range(count)]
    assert services.job_dispatch_due(limit=count) == count
    out = []
    for job in jobs:
        job.refresh_from_db()
        run = Run(run_id=job.workflow_run_id)
        services.job_claim(job_id=job.pk, attempt=1, run=run)
        services.job_heartbeat(job_id=job.pk, run=run, step=Step.CONFIGURE, progress=40)
        fake_github.set_run(run.run_id, status="in_progress")
        out.append((job, run))
    long_ago = timezone.now() - timedelta(seconds=settings.RECONCILE_INTERVAL_SECONDS + 5)
    ProvisioningJob.objects.filter(pk__in=[j.pk for j, _ in out]).update(claimed_at=long_ago)
    return out


def reconcile_round_calls(fake_github) -> int:
    before = wire_calls(fake_github)
    services.job_reconcile_runs()
    return wire_calls(fake_github) - before


@pytest.mark.parametrize("jobs", [3, 150])
def test_a_reconcile_round_costs_the_same_calls_for_3_or_150_jobs(fake_github, settings, jobs):
    """150 runs in progress: two pages of `in_progress`, one page of each other status."""
    flying = in_flight(fake_github, jobs, settings)
    finished_job, finished_run = flying[0]
    fake_github.set_run(finished_run.run_id, status="completed", conclusion="failure")

    calls = reconcile_round_calls(fake_github)

    pages = len(UNFINISHED_RUN_STATUSES) + (1 if jobs > 100 else 0)
    assert calls == pages + 1  # the lists, and one GET for the run missing from them
    finished_job.refresh_from_db()
    assert finished_job.status == JobStatus.QUEUED  # failed through the fail path, retry left
    assert ProvisioningJob.objects.filter(status=JobStatus.PROVISIONING).count() == jobs - 1
    assert not ProvisioningJob.objects.filter(
        status=JobStatus.PROVISIONING, reconciled_at__isnull=True
    ).exists()


def test_an_unchanged_list_costs_nothing_the_next_round(fake_github, settings):
    in_flight(fake_github, 3, settings)
    reconcile_round_calls(fake_github)
    ProvisioningJob.objects.update(reconciled_at=None)  # due again
    tokens_before = ApiBudget.objects.get(name="github").tokens

    assert reconcile_round_calls(fake_github) == 0  # every page answered 304
    assert fake_github.not_modified == len(UNFINISHED_RUN_STATUSES)
    # Each 304's request was given back (a little refill may have come on top).
    assert ApiBudget.objects.get(name="github").tokens >= tokens_before


def test_reconcile_skips_its_round_while_the_budget_is_spent(fake_github, settings):
    flying = in_flight(fake_github, 2, settings)
    ApiBudget.objects.update(tokens=0.0, refilled_at=timezone.now())
    sent = len(fake_github.requests)

    assert services.job_reconcile_runs() == 0

    assert len(fake_github.requests) == sent
    for job, _run in flying:
        job.refresh_from_db()
        assert job.reconciled_at is None  # still due for the next round
    assert api_budget_wait() > 0


# --- /metrics ---------------------------------------------------------------------------------------


def metric_samples(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_metrics_show_capacity_runs_held_by_github_and_the_budget(client, fake_github, settings):
    settings.PROVISIONING_MAX_IN_FLIGHT = 2
    settings.HETZNER_CALLS_PER_BUILD = 0
    held, _other, _waiting = (enqueue(AgentFactory()) for _ in range(3))
    services.job_dispatch_due()
    held.refresh_from_db()
    fake_github.set_run(held.workflow_run_id, status="queued")
    old = timezone.now() - timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)
    ProvisioningJob.objects.filter(pk=held.pk).update(dispatched_at=old)
    services.job_dispatch_due()  # asks GitHub: still queued, so it waits and is not re-sent

    m = metric_samples(client)

    assert m[("provisioning_runs_in_flight", ())] == 2
    assert m[("provisioning_max_in_flight", ())] == 2
    assert m[("provisioning_jobs_waiting_for_capacity", ())] == 1
    assert m[("provisioning_runs_waiting_for_machine", ())] == 1
    shape = budget_shape()
    assert 0 < m[("provisioning_github_api_budget_remaining", ())] <= shape.capacity - 3
    assert m[("provisioning_github_api_blocked_seconds", ())] == 0
    assert m[("provisioning_github_api_calls_total", (("purpose", "dispatch"),))] == 2
    assert m[("provisioning_github_api_calls_total", (("purpose", "get_run"),))] == 1
    assert m[("provisioning_github_api_calls_total", (("purpose", "token"),))] == 1
    assert m[("provisioning_github_api_calls_refused_total", (("purpose", "dispatch"),))] == 0
