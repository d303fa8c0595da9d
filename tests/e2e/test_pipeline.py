"""End to end: a live server, the worker, the local runner as real subprocesses, the fake cloud.

Each test enqueues a job the way a payment does and watches the database until the pipeline has
moved it where it should be, then checks what is left in the fake Hetzner. PostgreSQL only:
the worker, the live server's threads and the runners' callbacks write concurrently.
"""

from __future__ import annotations

import pytest
from django.test import Client

from provisioning import services
from provisioning.models import Agent, JobEvent, JobStatus, Step
from tests.factories import AgentFactory

E2E_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "provisioning",
    "billing",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres_only,
    # Only these apps' tables are flushed after each test: flushing dj-stripe's ~70 tables too
    # would cost seconds per test.
    pytest.mark.django_db(transaction=True, available_apps=E2E_APPS),
]


def is_running(job):
    if job.status == JobStatus.FAILED:
        pytest.fail(f"job failed instead of running: {job.failed_step}: {job.error}")
    return job.status == JobStatus.RUNNING


def actions(pipeline, job, action, **filters):
    return [
        e
        for e in pipeline.events(job)
        if e.action == action and all(getattr(e, k) == v for k, v in filters.items())
    ]


def agent_api(agent: Agent) -> dict:
    client = Client()
    client.force_login(agent.owner)
    response = client.get(f"/api/v1/agents/{agent.pk}/")
    assert response.status_code == 200, response.content
    return response.json()


def test_happy_path_ends_running_with_one_vm(pipeline):
    agent = AgentFactory()
    job = services.job_enqueue(agent=agent, stripe_event_id="evt_e2e_happy")

    job = pipeline.wait_for(job, is_running, what="the job to run")

    agent.refresh_from_db()
    vms = pipeline.vms_of(job)
    assert len(vms) == 1, pipeline.dump(job)
    assert len(pipeline.cloud.servers) == 1
    (vm,) = vms
    assert vm["name"] == f"agent-{job.pk}"
    assert vm["labels"]["attempt"] == "1"
    assert agent.server_id == str(vm["id"])
    assert agent.ipv4 == vm["public_net"]["ipv4"]["ip"]
    assert (job.attempt, job.retry_count, job.progress, job.step) == (1, 0, 100, Step.COMPLETE)
    # Each step's start is on the timeline, in order. (dict.fromkeys: two heartbeats announcing
    # the same new step at once can both record it; a known cosmetic race in job_heartbeat.) The
    # runner enters its last step, "complete", before it sends `complete`: a heartbeat that lands
    # in between records that step too, so it may or may not close the list.
    steps = list(dict.fromkeys(e.step for e in actions(pipeline, job, JobEvent.Action.STEP)))
    if steps[-1:] == [Step.COMPLETE]:
        steps.pop()
    assert steps == ["create-server", "wait-ssh", "configure", "health-check"], pipeline.dump(job)
    assert len(actions(pipeline, job, JobEvent.Action.DISPATCH)) == 1
    assert len(actions(pipeline, job, JobEvent.Action.CLAIM)) == 1
    seen = agent_api(agent)
    assert seen["ipv4"] == agent.ipv4
    assert seen["job"]["status"] == "running"


def test_configure_fails_once_then_the_retry_runs(pipeline):
    pipeline.knobs(attempt=1, fail_step="configure")
    agent = AgentFactory()
    job = services.job_enqueue(agent=agent, stripe_event_id="evt_e2e_configure")

    job = pipeline.wait_for(job, is_running, what="the retried job to run")

    assert (job.attempt, job.retry_count) == (2, 1), pipeline.dump(job)
    (failure,) = actions(pipeline, job, JobEvent.Action.FAIL)
    assert (failure.attempt, failure.step) == (1, Step.CONFIGURE)
    assert (failure.from_status, failure.to_status) == (JobStatus.PROVISIONING, JobStatus.QUEUED)
    assert "PLAY RECAP" in failure.reason  # the log tail of the simulated Ansible run
    # Attempt 1 deleted the VM it made; attempt 2 made the one that is left.
    (vm,) = pipeline.vms_of(job)
    assert vm["labels"]["attempt"] == "2"
    assert [s["labels"]["attempt"] for s in pipeline.cloud.deleted_servers] == ["1"]
    agent.refresh_from_db()
    assert agent.server_id == str(vm["id"])
    assert len(actions(pipeline, job, JobEvent.Action.DISPATCH)) == 2


def test_runner_killed_mid_job_times_out_and_the_retry_adopts_its_vm(pipeline, settings):
    settings.JOB_TIMEOUT_SECONDS = 2
    pipeline.knobs(attempt=1, kill_at="configure")
    agent = AgentFactory()
    job = services.job_enqueue(agent=agent, stripe_event_id="evt_e2e_killed")

    pipeline.wait_for_timeout_then_relax(job)
    job = pipeline.wait_for(job, is_running, what="the retried job to run", timeout=60)

    assert (job.attempt, job.retry_count) == (2, 1), pipeline.dump(job)
    (timeout,) = actions(pipeline, job, JobEvent.Action.TIMEOUT)
    assert (timeout.attempt, timeout.step, timeout.actor) == (1, Step.TIMEOUT, "system")
    assert "No heartbeat" in timeout.reason
    assert not actions(pipeline, job, JobEvent.Action.FAIL)  # the killed run never reported
    # Exactly one VM: the one attempt 1 made, adopted by attempt 2, nothing deleted.
    (vm,) = pipeline.vms_of(job)
    assert len(pipeline.cloud.servers) == 1
    assert vm["labels"]["attempt"] == "1"
    assert pipeline.cloud.deleted_servers == []
    agent.refresh_from_db()
    assert agent.server_id == str(vm["id"])


def test_out_of_retries_fails_visibly_and_the_cleanup_run_deletes_the_vm(pipeline, settings):
    # Attempt 1 dies after making its VM (timed out); attempt 2 adopts that VM and fails at
    # configure, leaving it (not its own to delete). No retries left: failed, then cleanup.
    settings.JOB_TIMEOUT_SECONDS = 2
    settings.MAX_RETRIES = 1
    pipeline.knobs(attempt=1, kill_at="configure")
    pipeline.knobs(attempt=2, fail_step="configure")
    agent = AgentFactory()
    job = services.job_enqueue(agent=agent, stripe_event_id="evt_e2e_out_of_retries")
    assert job.max_retries == 1

    pipeline.wait_for_timeout_then_relax(job)
    job = pipeline.wait_for(
        job, lambda j: j.status == JobStatus.FAILED, what="the job to fail", timeout=60
    )

    assert (job.attempt, job.retry_count) == (2, 1), pipeline.dump(job)
    assert job.failed_step == Step.CONFIGURE
    assert "PLAY RECAP" in job.error and "failed=1" in job.error
    assert job.completed_at is not None
    (failure,) = actions(pipeline, job, JobEvent.Action.FAIL)
    assert (failure.attempt, failure.to_status) == (2, JobStatus.FAILED)
    seen = agent_api(agent)["job"]
    assert (seen["status"], seen["failed_step"]) == ("failed", "configure")

    pipeline.wait_until(
        lambda: bool(actions(pipeline, job, JobEvent.Action.CLEANUP)) and not pipeline.vms_of(job),
        what="the cleanup run to delete the job's VM",
        job=job,
    )
    assert len(actions(pipeline, job, JobEvent.Action.CLEANUP)) == 1
    deleted = [s for s in pipeline.cloud.deleted_servers if s["labels"]["job-id"] == str(job.pk)]
    assert [s["labels"]["attempt"] for s in deleted] == ["1"]
    assert pipeline.cloud.servers == []
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED  # cleanup changes no state
