"""The truth about the wait, on the customer's page and in `GET /api/v1/agents/<id>/`: a job
waiting its turn shows its place and an estimate; one in a retry's backoff says it is retrying
and when; one whose run GitHub holds says it waits for a build machine; otherwise both are null.

State is built through the real services, as production builds it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from provisioning import limits, services
from provisioning.models import Agent, ProvisioningJob, Step
from tests.factories import AgentFactory, UserFactory
from tests.provisioning.helpers import claimed, dispatch, enqueue

pytestmark = pytest.mark.django_db

BUILD = timedelta(seconds=limits.DEFAULT_BUILD_SECONDS)


@pytest.fixture
def customer():
    return UserFactory(username="ada")


@pytest.fixture
def agent(customer) -> Agent:
    return AgentFactory(owner=customer, name="Ada's helper")


@pytest.fixture
def page(client: Client, customer):
    client.force_login(customer)
    return lambda agent: client.get(
        reverse("dashboard:agent-detail", args=[agent.pk])
    ).content.decode()


@pytest.fixture
def api(customer):
    client = APIClient()
    client.force_login(customer)
    return lambda agent: client.get(f"/api/v1/agents/{agent.pk}/").json()


def when(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@override_settings(PROVISIONING_MAX_IN_FLIGHT=1)
def test_a_job_waiting_its_turn_shows_its_place_and_when_it_should_be_ready(
    page, api, agent, backend
):
    before = timezone.now()
    claimed(backend)  # someone else's build holds the only slot
    enqueue(AgentFactory())  # someone else paid earlier
    enqueue(agent)

    body = api(agent)
    text = page(agent)

    assert body["job"]["queue_position"] == 2
    ready = when(body["job"]["estimated_ready_at"])
    # the slot frees after the build in flight, then the order ahead takes it: three builds
    assert before + 3 * BUILD <= ready <= timezone.now() + 3 * BUILD
    assert body["message"] == (
        "Your order is in the queue: agents are built in the order they were paid for."
    )
    assert "Number 2 in the queue" in text
    assert f'Estimated ready around <time datetime="{ready.isoformat()}">' in text
    assert f"{ready:%H:%M} UTC</time>" in text


def test_a_retry_in_its_backoff_says_it_is_retrying_and_when_never_its_place(
    page, api, agent, backend, settings
):
    settings.MAX_RETRIES = 3
    job, run = claimed(backend, agent)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CREATE_SERVER)
    job.refresh_from_db()
    assert job.next_attempt_at is not None and job.next_attempt_at > timezone.now()

    body = api(agent)
    text = page(agent)

    assert body["job"]["status"] == "queued"
    assert body["job"]["queue_position"] is None
    assert when(body["job"]["estimated_ready_at"]) == job.next_attempt_at + BUILD
    assert body["message"] == (
        "Our cloud provider could not create your server, so we are trying again automatically."
    )
    assert f"Retrying at {job.next_attempt_at:%H:%M} UTC" in text
    assert "in the queue" not in text
    assert "Attempt 2, retry 1 of 3." in text


def test_a_run_github_holds_says_it_is_waiting_for_a_build_machine(page, api, agent, backend):
    job = enqueue(agent)
    dispatch(job, backend)

    body = api(agent)
    text = page(agent)

    assert body["job"]["status"] == "queued"
    assert body["job"]["queue_position"] is None
    assert body["job"]["estimated_ready_at"] is not None
    assert body["message"] == "Waiting for a build machine."
    assert "Waiting for a build machine." in text
    assert "in the queue" not in text


def test_a_dispatched_retry_waits_for_a_machine_not_for_its_backoff(page, api, agent, backend):
    job, run = claimed(backend, agent)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE)
    ProvisioningJob.objects.filter(pk=job.pk).update(next_attempt_at=None)
    dispatch(job, backend)

    text = page(agent)

    assert "Waiting for a build machine" in text
    assert "Retrying at" not in text and "in the queue" not in text


def test_a_building_or_running_agent_has_no_place_and_no_estimate(page, api, agent, backend):
    job, run = claimed(backend, agent)

    building = api(agent)
    building_text = page(agent)
    services.job_complete(job_id=job.pk, run=run, server_id="1", ipv4="203.0.113.5")
    running = api(agent)

    for body in (building, running):
        assert body["job"]["queue_position"] is None
        assert body["job"]["estimated_ready_at"] is None
    assert "Estimated ready" not in building_text
