"""A run that has reported keeps its runner slot until GitHub says the run ended: GitHub's
`workflow_run` webhook frees it, a list call finds the ones whose webhook was missed, and a grace
bound frees the rest. Refused deliveries change nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from provisioning import selectors, services
from provisioning.backends.base import UNFINISHED_RUN_STATUSES
from provisioning.models import (
    ApiBudget,
    FinishingRun,
    JobEvent,
    JobKind,
    JobStatus,
    ProvisioningJob,
    Step,
)
from provisioning.services import Run
from tests.factories import AgentFactory, JobFactory
from tests.fakes.runner_backend import RecordingBackend
from tests.provisioning.helpers import enqueue

pytestmark = pytest.mark.django_db

SECRET = "test-webhook-secret"


@pytest.fixture
def webhook_secret(settings):
    settings.GITHUB_WEBHOOK_SECRET = SECRET
    return SECRET


@pytest.fixture
def one_slot(settings):
    settings.PROVISIONING_MAX_IN_FLIGHT = 1


def claimed(fake_github) -> tuple[ProvisioningJob, Run]:
    """A job dispatched to the fake GitHub, claimed by its run, which is at `configure`."""
    job = enqueue(AgentFactory())
    assert services.job_dispatch_next() is not None
    job.refresh_from_db()
    run = Run(run_id=job.workflow_run_id)
    services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    services.job_heartbeat(job_id=job.pk, run=run, step=Step.CONFIGURE, progress=60)
    job.refresh_from_db()
    return job, run


def built(fake_github, *, outcome: str = "complete") -> tuple[ProvisioningJob, Run]:
    """A job dispatched to the fake GitHub, claimed, and reported by its run (`outcome`)."""
    job, run = claimed(fake_github)
    if outcome == "complete":
        services.job_complete(job_id=job.pk, run=run, server_id="42", ipv4="192.0.2.10")
    else:
        services.job_fail(job_id=job.pk, run=run, error="ansible failed", failed_step="configure")
    job.refresh_from_db()
    return job, run


def deliver(client, payload: dict, *, event: str = "workflow_run", secret: str | None = SECRET):
    body = json.dumps(payload).encode()
    headers = {"HTTP_X_GITHUB_EVENT": event, "HTTP_X_GITHUB_DELIVERY": "d-1"}
    if secret is not None:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["HTTP_X_HUB_SIGNATURE_256"] = f"sha256={digest}"
    return client.post(
        reverse("github-webhook"), data=body, content_type="application/json", **headers
    )


def run_completed(
    run_id: str,
    repository: str,
    *,
    action: str = "completed",
    conclusion: str = "success",
    run_attempt: object = 1,
) -> dict:
    run = {"id": int(run_id), "status": "completed", "conclusion": conclusion}
    if run_attempt is not None:
        run["run_attempt"] = run_attempt
    return {"action": action, "workflow_run": run, "repository": {"full_name": repository}}


def list_calls(fake_github) -> int:
    path = f"/repos/{fake_github.repository}/actions/workflows/{fake_github.workflow_file}/runs"
    return sum(1 for r in fake_github.requests if r.method == "GET" and r.url.path == path)


# --- the slot stays taken until GitHub says the run ended -------------------------------------


@pytest.mark.parametrize("outcome", ["complete", "fail"])
def test_a_reported_run_keeps_its_slot_until_githubs_webhook_says_it_ended(
    fake_github, client, webhook_secret, one_slot, outcome
):
    first, run = built(fake_github, outcome=outcome)
    assert FinishingRun.objects.filter(run_id=run.run_id, job=first).exists()
    waiting = enqueue(AgentFactory())

    assert selectors.job_count_in_flight(now=timezone.now()) == 1
    assert services.job_dispatch_next() is None  # GitHub still runs the first one's last steps
    waiting.refresh_from_db()
    assert waiting.dispatched_at is None

    answer = deliver(client, run_completed(run.run_id, fake_github.repository))
    assert answer.status_code == 200, answer.content
    assert answer.json()["code"] == "released"
    assert not FinishingRun.objects.exists()
    assert services.job_dispatch_next() == waiting


def test_a_repeated_report_records_the_run_once(fake_github):
    job, run = built(fake_github)
    again = services.job_complete(job_id=job.pk, run=run, server_id="42", ipv4="192.0.2.10")
    assert again.status == JobStatus.RUNNING
    assert FinishingRun.objects.filter(run_id=run.run_id).count() == 1


def test_a_workflow_job_completed_webhook_frees_the_slot_too(fake_github, client, webhook_secret):
    _, run = built(fake_github)
    payload = {
        "action": "completed",
        "workflow_job": {"id": 999, "run_id": int(run.run_id), "status": "completed"},
        "repository": {"full_name": fake_github.repository},
    }
    answer = deliver(client, payload, event="workflow_job")
    assert answer.status_code == 200
    assert answer.json()["code"] == "released"
    assert not FinishingRun.objects.exists()
    repeat = deliver(client, payload, event="workflow_job")  # GitHub redelivers at times
    assert repeat.status_code == 200
    assert repeat.json()["code"] == "nothing_held"


def test_a_backend_whose_runs_end_with_their_report_frees_the_slot_at_once(settings):
    settings.PROVISIONING_MAX_IN_FLIGHT = 1
    backend = RecordingBackend()
    job = enqueue(AgentFactory())
    assert services.job_dispatch_next(backend=backend) == job
    job.refresh_from_db()
    run = Run(run_id=job.workflow_run_id)
    services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    from provisioning import backends

    backends.set_backend(backend)
    try:
        services.job_complete(job_id=job.pk, run=run, server_id="1", ipv4="192.0.2.1")
    finally:
        backends.reset_backend()
    assert not FinishingRun.objects.exists()
    nxt = enqueue(AgentFactory())
    assert services.job_dispatch_next(backend=backend) == nxt


# --- a run that ended without its report: its job takes the fail path at once ----------------


def test_a_run_that_ended_without_reporting_fails_its_job_at_once(
    fake_github, client, webhook_secret
):
    job, run = claimed(fake_github)  # then the runner is killed: no fail call ever comes
    before = job.events.count()

    answer = deliver(
        client, run_completed(run.run_id, fake_github.repository, conclusion="failure")
    )

    assert answer.status_code == 200, answer.content
    assert answer.json()["code"] == "failed"
    job.refresh_from_db()
    assert (job.status, job.retry_count, job.attempt) == (JobStatus.QUEUED, 1, 2)
    assert job.failed_step == Step.CONFIGURE
    assert f"run {run.run_id} completed (failure) while the job was still provisioning" in job.error
    event = job.events.order_by("-id").first()
    assert job.events.count() == before + 1
    assert (event.actor, event.from_status, event.to_status) == (
        "system",
        JobStatus.PROVISIONING,
        JobStatus.QUEUED,
    )
    assert event.workflow_run_id == run.run_id
    assert "GitHub's workflow_run webhook" in event.reason
    assert not FinishingRun.objects.exists()  # GitHub said it ended: nothing to wait for
    assert not job.events.filter(action=JobEvent.Action.NOTE).exists()  # not also a re-send

    again = deliver(client, run_completed(run.run_id, fake_github.repository, conclusion="failure"))
    assert again.json()["code"] == "nothing_held"  # a redelivery: the job moved on already
    job.refresh_from_db()
    assert (job.status, job.attempt, job.events.count()) == (JobStatus.QUEUED, 2, before + 1)


@pytest.mark.parametrize("run_attempt", [2, None, "1", True, 0])
def test_another_or_an_unknown_attempt_of_the_run_changes_nothing(
    fake_github, client, webhook_secret, run_attempt
):
    job, run = claimed(fake_github)
    payload = run_completed(run.run_id, fake_github.repository, run_attempt=run_attempt)
    answer = deliver(client, payload)
    assert answer.status_code == 200
    assert answer.json()["code"] == "nothing_held"
    job.refresh_from_db()
    assert (job.status, job.attempt, job.workflow_run_id) == (
        JobStatus.PROVISIONING,
        1,
        run.run_id,
    )


def test_a_run_that_ended_before_its_claim_is_re_sent_at_once(
    fake_github, client, webhook_secret, settings
):
    job = enqueue(AgentFactory())
    assert services.job_dispatch_next() == job
    job.refresh_from_db()
    first_run, dispatched_at = job.workflow_run_id, job.dispatched_at
    assert services.job_dispatch_next() is None  # inside the claim window: not re-sent
    fake_github.set_run(first_run, status="completed", conclusion="failure")  # died at checkout

    answer = deliver(client, run_completed(first_run, fake_github.repository, conclusion="failure"))

    assert answer.status_code == 200, answer.content
    assert answer.json()["code"] == "resend"
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED and job.workflow_run_id == first_run
    window = timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS)
    assert job.dispatched_at <= timezone.now() - window < dispatched_at
    note = job.events.get(action=JobEvent.Action.NOTE)
    assert note.actor == "system" and note.workflow_run_id == first_run
    assert f"run {first_run} completed (failure) before it claimed the job" in note.reason

    assert services.job_dispatch_next() == job  # the re-send, as after the window
    job.refresh_from_db()
    assert job.workflow_run_id not in (None, first_run)
    assert job.attempt == 1 and job.retry_count == 0  # no retry spent: it never started
    assert f"replaces unclaimed run {first_run}" in job.events.order_by("-id").first().reason

    again = deliver(client, run_completed(first_run, fake_github.repository, conclusion="failure"))
    assert again.json()["code"] == "nothing_held"  # the job runs on another run now


def test_a_run_still_held_by_github_is_not_re_sent_even_if_a_webhook_says_it_ended(
    fake_github, client, webhook_secret
):
    """The webhook only makes the re-send due; the dispatcher asks GitHub first, as always."""
    job = enqueue(AgentFactory())
    assert services.job_dispatch_next() == job
    job.refresh_from_db()
    run_id = job.workflow_run_id
    assert deliver(client, run_completed(run_id, fake_github.repository)).json()["code"] == "resend"
    fake_github.set_run(run_id, status="queued", conclusion=None)  # a re-run GitHub started

    assert services.job_dispatch_next() == job
    job.refresh_from_db()
    assert job.workflow_run_id == run_id  # kept waiting for it
    assert "Waiting for a build machine" in job.events.order_by("-id").first().reason


def test_a_workflow_job_completed_alone_does_not_fail_the_job(fake_github, client, webhook_secret):
    job, run = claimed(fake_github)
    payload = {
        "action": "completed",
        "workflow_job": {"id": 7, "run_id": int(run.run_id), "conclusion": "failure"},
        "repository": {"full_name": fake_github.repository},
    }
    assert deliver(client, payload, event="workflow_job").json()["code"] == "nothing_held"
    job.refresh_from_db()
    assert job.status == JobStatus.PROVISIONING


def test_a_run_that_reported_is_not_failed_by_its_end(fake_github, client, webhook_secret):
    job, run = built(fake_github)
    answer = deliver(
        client, run_completed(run.run_id, fake_github.repository, conclusion="success")
    )
    assert answer.json()["code"] == "released"
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING


# --- deliveries that change nothing -------------------------------------------------------------


def test_without_a_webhook_secret_the_endpoint_does_not_exist(fake_github, client, settings):
    settings.GITHUB_WEBHOOK_SECRET = ""
    _, run = built(fake_github)
    answer = deliver(client, run_completed(run.run_id, fake_github.repository))
    assert answer.status_code == 404
    assert FinishingRun.objects.filter(run_id=run.run_id).exists()


@pytest.mark.parametrize(
    ("secret", "status", "code"),
    [(None, 401, "unsigned"), ("another-secret", 403, "bad_signature")],
)
def test_unsigned_or_wrongly_signed_deliveries_are_refused(
    fake_github, client, webhook_secret, secret, status, code
):
    _, run = built(fake_github)
    answer = deliver(client, run_completed(run.run_id, fake_github.repository), secret=secret)
    assert answer.status_code == status
    assert answer.json()["code"] == code
    assert answer.json()["detail"]
    assert FinishingRun.objects.filter(run_id=run.run_id).exists()


def test_a_tampered_body_is_refused(fake_github, client, webhook_secret):
    _, run = built(fake_github)
    body = json.dumps(run_completed(run.run_id, fake_github.repository)).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    tampered = body.replace(b'"success"', b'"failure"')
    answer = client.post(
        reverse("github-webhook"),
        data=tampered,
        content_type="application/json",
        HTTP_X_GITHUB_EVENT="workflow_run",
        HTTP_X_HUB_SIGNATURE_256=signature,
    )
    assert answer.status_code == 403
    assert FinishingRun.objects.filter(run_id=run.run_id).exists()


@pytest.mark.parametrize("payload", [[1, 2], "text", 5, None])
def test_a_body_that_is_not_a_json_object_is_a_400(fake_github, client, webhook_secret, payload):
    _, run = built(fake_github)
    answer = deliver(client, payload)
    assert answer.status_code == 400
    assert answer.json()["code"] == "parse_error"
    assert FinishingRun.objects.filter(run_id=run.run_id).exists()


def test_a_run_id_that_is_not_one_is_a_400(fake_github, client, webhook_secret):
    built(fake_github)
    payload = {"action": "completed", "workflow_run": {"id": "12; DROP"}}
    answer = deliver(client, payload)
    assert answer.status_code == 400
    assert "workflow_run.id" in answer.json()["errors"]
    assert FinishingRun.objects.count() == 1


@pytest.mark.parametrize(
    ("event", "action", "repository"),
    [
        ("workflow_run", "in_progress", None),  # not the end
        ("workflow_run", "requested", None),
        ("push", "completed", None),  # not a run's event
        ("workflow_run", "completed", "someone/else"),  # another repository's run
    ],
)
def test_other_events_are_acknowledged_and_ignored(
    fake_github, client, webhook_secret, event, action, repository
):
    _, run = built(fake_github)
    payload = run_completed(run.run_id, repository or fake_github.repository, action=action)
    answer = deliver(client, payload, event=event)
    assert answer.status_code == 200
    assert answer.json()["code"] == "ignored"
    assert FinishingRun.objects.filter(run_id=run.run_id).exists()


def test_a_skipped_job_of_the_run_does_not_free_its_slot(fake_github, client, webhook_secret):
    _, run = built(fake_github)
    payload = {
        "action": "completed",
        "workflow_job": {"run_id": int(run.run_id), "name": "reap", "conclusion": "skipped"},
        "repository": {"full_name": fake_github.repository},
    }
    answer = deliver(client, payload, event="workflow_job")
    assert answer.status_code == 200
    assert answer.json()["code"] == "ignored"
    assert FinishingRun.objects.filter(run_id=run.run_id).exists()


def test_a_ping_is_answered(client, webhook_secret):
    answer = deliver(client, {"zen": "Keep it logically awesome.", "hook_id": 1}, event="ping")
    assert answer.status_code == 200
    assert answer.json()["code"] == "pong"


# --- missed webhooks: the worker lists; nothing heard: the grace bound ----------------------------


def reported_ago(run: Run, seconds: float) -> None:
    FinishingRun.objects.filter(run_id=run.run_id).update(
        reported_at=timezone.now() - timedelta(seconds=seconds)
    )


def test_a_missed_webhook_is_made_up_for_by_listing_githubs_unfinished_runs(fake_github, settings):
    _, ended = built(fake_github)
    _, still_going = built(fake_github, outcome="fail")
    _, just_reported = built(fake_github)
    reported_ago(ended, settings.RUN_FINISH_POLL_SECONDS + 1)
    reported_ago(still_going, settings.RUN_FINISH_POLL_SECONDS + 1)
    fake_github.set_run(ended.run_id, status="completed", conclusion="success")
    fake_github.set_run(still_going.run_id, status="in_progress")  # deleting its VM
    fake_github.set_run(just_reported.run_id, status="completed", conclusion="success")
    before = list_calls(fake_github)

    assert services.runs_finished_poll() == 1

    assert list_calls(fake_github) - before == len(UNFINISHED_RUN_STATUSES)
    left = set(FinishingRun.objects.values_list("run_id", flat=True))
    # the recent one is left to its webhook: not asked about yet
    assert left == {still_going.run_id, just_reported.run_id}


# --- cleanup runs: in flight until GitHub says they ended, the cleanup window at most -----------


def cleanup_sent(fake_github) -> ProvisioningJob:
    """A provision failed for good whose cleanup run has been sent to the fake GitHub."""
    job = JobFactory(
        status=JobStatus.FAILED,
        kind=JobKind.PROVISION,
        claimed_at=timezone.now(),
        completed_at=timezone.now(),
    )
    assert services.job_send_cleanup() == 1
    job.refresh_from_db()
    assert job.cleanup_run_id and job.cleanup_finished_at is None
    return job


def test_a_cleanup_run_keeps_its_slot_until_githubs_webhook_says_it_ended(
    fake_github, client, webhook_secret, one_slot
):
    failed = cleanup_sent(fake_github)
    waiting = enqueue(AgentFactory())
    assert selectors.job_count_in_flight(now=timezone.now()) == 1
    assert services.job_dispatch_next() is None  # the cleanup run holds the only slot

    answer = deliver(client, run_completed(failed.cleanup_run_id, fake_github.repository))

    assert answer.json()["code"] == "released"
    failed.refresh_from_db()
    assert failed.cleanup_finished_at is not None and failed.status == JobStatus.FAILED
    note = failed.events.get(action=JobEvent.Action.NOTE)
    assert note.workflow_run_id == failed.cleanup_run_id and "has ended" in note.reason
    assert selectors.job_count_in_flight(now=timezone.now()) == 0
    assert services.job_dispatch_next() == waiting

    again = deliver(client, run_completed(failed.cleanup_run_id, fake_github.repository))
    assert again.json()["code"] == "nothing_held"
    assert failed.events.filter(action=JobEvent.Action.NOTE).count() == 1


def test_a_cleanup_run_whose_webhook_was_missed_is_found_by_listing(fake_github, settings):
    ended, still_going, recent = (cleanup_sent(fake_github) for _ in range(3))
    past_poll = timezone.now() - timedelta(seconds=settings.RUN_FINISH_POLL_SECONDS + 1)
    ProvisioningJob.objects.filter(pk__in=[ended.pk, still_going.pk]).update(
        cleanup_dispatched_at=past_poll
    )
    fake_github.set_run(ended.cleanup_run_id, status="completed", conclusion="success")
    fake_github.set_run(still_going.cleanup_run_id, status="queued")  # waits for a runner
    fake_github.set_run(recent.cleanup_run_id, status="completed", conclusion="success")

    assert services.runs_finished_poll() == 1

    finished = dict(ProvisioningJob.objects.values_list("pk", "cleanup_finished_at"))
    assert finished[ended.pk] is not None
    assert finished[still_going.pk] is None  # still holds its slot
    assert finished[recent.pk] is None  # left to its webhook: not asked about yet
    assert selectors.job_count_in_flight(now=timezone.now()) == 2


def test_a_cleanup_run_stops_counting_after_the_window_whatever_github_says(fake_github, settings):
    job = cleanup_sent(fake_github)
    later = timezone.now() + timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)
    assert selectors.job_count_in_flight(now=timezone.now()) == 1
    assert selectors.job_count_in_flight(now=later) == 0
    job.refresh_from_db()
    assert job.cleanup_finished_at is None  # nobody said it ended; it just stops counting


def test_nothing_overdue_costs_no_call(fake_github):
    built(fake_github)
    before = list_calls(fake_github)
    assert services.runs_finished_poll() == 0
    assert list_calls(fake_github) == before
    assert FinishingRun.objects.count() == 1


def test_with_the_budget_spent_nothing_is_asked_and_the_grace_bound_frees_the_slot(
    fake_github, settings, one_slot
):
    _, run = built(fake_github)
    reported_ago(run, settings.RUN_FINISH_POLL_SECONDS + 1)
    ApiBudget.objects.update(tokens=0, refilled_at=timezone.now())
    before = len(fake_github.requests)

    assert services.runs_finished_poll() == 0
    assert len(fake_github.requests) == before
    assert FinishingRun.objects.count() == 1
    assert selectors.job_count_in_flight(now=timezone.now()) == 1

    # Past the grace bound it no longer counts, even before the worker deletes it...
    later = timezone.now() + timedelta(seconds=settings.RUN_FINISH_GRACE_SECONDS + 1)
    assert selectors.job_count_in_flight(now=later) == 0
    # ...and the worker's duty deletes it.
    assert services.runs_finished_poll(now=later) == 1
    assert not FinishingRun.objects.exists()


def test_the_worker_frees_slots_before_it_dispatches(fake_github, settings, one_slot):
    from provisioning.worker import Worker

    _, run = built(fake_github)
    reported_ago(run, settings.RUN_FINISH_POLL_SECONDS + 1)
    fake_github.set_run(run.run_id, status="completed", conclusion="success")
    waiting = enqueue(AgentFactory())

    report = Worker(name="test-worker").tick()

    assert report.done["finishing"] == 1
    assert report.done["dispatch"] == 1
    waiting.refresh_from_db()
    assert waiting.dispatched_at is not None


def test_metrics_count_finishing_runs_among_the_runs_in_flight(fake_github, client, settings):
    from tests.provisioning.test_api_budget import metric_samples

    built(fake_github)
    built(fake_github, outcome="fail")
    held = enqueue(AgentFactory())
    services.job_dispatch_next()  # a third, dispatched and not claimed
    held.refresh_from_db()
    assert held.dispatched_at is not None

    m = metric_samples(client)

    assert m[("provisioning_runs_finishing", ())] == 2
    assert m[("provisioning_runs_in_flight", ())] == 3


# --- runs the service cancels keep their runner until GitHub has stopped them -------------------


def claimed_job(fake_github) -> tuple[ProvisioningJob, Run]:
    job = enqueue(AgentFactory())
    services.job_dispatch_next()
    job.refresh_from_db()
    run = Run(run_id=job.workflow_run_id)
    services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    return job, run


@pytest.mark.parametrize("how", ["sweep", "one job", "operator"])
def test_a_run_the_service_cancels_keeps_its_slot_until_github_says_it_stopped(
    fake_github, client, webhook_secret, settings, django_capture_on_commit_callbacks, how
):
    from provisioning.models import Actor

    job, run = claimed_job(fake_github)
    silent = timezone.now() - timedelta(seconds=settings.JOB_TIMEOUT_SECONDS + 5)
    ProvisioningJob.objects.filter(pk=job.pk).update(last_heartbeat_at=silent, updated_at=silent)

    with django_capture_on_commit_callbacks(execute=True):
        if how == "sweep":
            assert services.job_timeout_stale() == 1
        elif how == "one job":
            assert services.job_timeout_if_stale(job_id=job.pk)
        else:
            services.job_cancel(job_id=job.pk, actor=Actor.operator("ops"))

    assert fake_github.cancelled == [run.run_id]
    assert list(FinishingRun.objects.values_list("run_id", "job_id")) == [(run.run_id, job.pk)]
    assert selectors.job_count_in_flight(now=timezone.now()) == 1  # GitHub is stopping it

    answer = deliver(client, run_completed(run.run_id, fake_github.repository))
    assert answer.json()["code"] == "released"
    assert selectors.job_count_in_flight(now=timezone.now()) == 0
