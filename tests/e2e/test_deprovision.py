"""End to end: a signed ending event posted to the live server's webhook makes the agent's VM
disappear from the fake cloud.

The same pipeline as test_pipeline.py (live server, worker thread, the local runner as real
subprocesses, fake Hetzner): the purchase's agent runs, then `customer.subscription.deleted`
arrives through dj-stripe's real URL, signed with Stripe's scheme; the worker dispatches the
deprovision job, the runner (mode deprovision) deletes every VM labelled with the agent and
reports back, and the job ends `running` (its "done").
"""

from __future__ import annotations

from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from billing import sample_events
from billing import services as billing_services
from billing.webhook import webhook_url
from provisioning import services
from provisioning.models import Agent, JobEvent, JobKind, JobStatus, ProvisioningJob, Step
from tests.e2e.test_pipeline import E2E_APPS, is_running
from tests.factories import AgentFactory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres_only,
    # dj-stripe's tables are not flushed (seconds per test): the `webhook` fixture removes the
    # rows it made itself.
    pytest.mark.django_db(transaction=True, available_apps=E2E_APPS),
]

TEST_SECRET_KEY = "sk_test_e2eDeprovisionOnlyNotAStripeKey000"
WEBHOOK_SECRET = "whsec_e2eDeprovisionOnlyNotSecret"
WEBHOOK_UUID = "3c7f2b9e-5d41-4a8e-9f60-1b2c3d4e5f60"


@pytest.fixture
def webhook(pipeline: Any, settings: Any) -> Iterator[str]:
    """dj-stripe's endpoint recorded offline, as `make run` does; yields the webhook URL."""
    from djstripe.models import Account, APIKey, Event, WebhookEndpoint, WebhookEventTrigger

    models = [WebhookEventTrigger, Event, WebhookEndpoint, APIKey, Account]
    before = {m: set(m.objects.values_list("pk", flat=True)) for m in models}
    settings.DEBUG = False
    settings.STRIPE_LIVE_MODE = False
    settings.STRIPE_SECRET_KEY = TEST_SECRET_KEY
    settings.STRIPE_TEST_SECRET_KEY = TEST_SECRET_KEY
    settings.STRIPE_LIVE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_WEBHOOK_UUID = WEBHOOK_UUID
    billing_services.webhook_endpoint_setup(
        secret=WEBHOOK_SECRET,
        endpoint_uuid=WEBHOOK_UUID,
        url=webhook_url(WEBHOOK_UUID),
        api_key=TEST_SECRET_KEY,
        livemode=False,
        api_version=settings.STRIPE_API_VERSION,
    )
    try:
        yield webhook_url(WEBHOOK_UUID)  # PUBLIC_BASE_URL is the live server
    finally:
        for model in models:
            model.objects.exclude(pk__in=before[model]).delete()


def paid_agent() -> Agent:
    return AgentFactory(
        stripe_customer_id=sample_events.stripe_id("cus_", 14),
        stripe_subscription_id=sample_events.stripe_id("sub_"),
    )


def cancel_subscription(agent: Agent, url: str) -> dict[str, Any]:
    (event,) = sample_events.build_ending_events("customer.subscription.deleted", agent=agent)
    response = sample_events.post_event(event, url=url, secret=WEBHOOK_SECRET)
    assert response.status_code == 200, response.text
    return event


def agent_vms(pipeline: Any, agent: Agent) -> list[dict[str, Any]]:
    return [s for s in pipeline.cloud.servers if s["labels"].get("agent-id") == str(agent.pk)]


def deprovision_of(agent: Agent) -> ProvisioningJob:
    return ProvisioningJob.objects.get(agent=agent, kind=JobKind.DEPROVISION)


def is_done(job: ProvisioningJob) -> bool:
    if job.status == JobStatus.FAILED:
        pytest.fail(f"deprovision failed: {job.failed_step}: {job.error}")
    return job.status == JobStatus.RUNNING


def test_a_cancelled_subscription_deletes_the_running_agents_vm(pipeline, webhook):
    agent = paid_agent()
    bystander = paid_agent()
    build = pipeline.wait_for(
        services.job_enqueue(agent=agent, stripe_event_id="evt_e2e_paid"),
        is_running,
        what="the agent to run",
    )
    other_build = pipeline.wait_for(
        services.job_enqueue(agent=bystander, stripe_event_id="evt_e2e_paid_other"),
        is_running,
        what="the other agent to run",
    )
    assert len(agent_vms(pipeline, agent)) == 1, pipeline.dump(build)

    # What an operator types under `make run` (the command signs and posts the event).
    out = StringIO()
    call_command(
        "stripe_send_test_event",
        "customer.subscription.deleted",
        "--customer",
        agent.owner.get_username(),
        "--url",
        webhook,
        stdout=out,
    )
    assert "HTTP 200" in out.getvalue()

    job = deprovision_of(agent)
    event_id = job.stripe_event_id
    assert event_id and event_id in out.getvalue()
    job = pipeline.wait_for(job, is_done, what="the deprovision to finish")
    assert agent_vms(pipeline, agent) == [], pipeline.dump(job)
    assert [s["labels"]["agent-id"] for s in pipeline.cloud.deleted_servers] == [str(agent.pk)]
    agent.refresh_from_db()
    assert (agent.is_ended, agent.end_reason) == (True, "subscription cancelled")
    assert agent.server_id == ""
    build.refresh_from_db()
    assert build.status == JobStatus.RUNNING  # the provision's history stays as it was
    # The other customer's agent is untouched.
    assert len(agent_vms(pipeline, bystander)) == 1, pipeline.dump(other_build)
    assert not ProvisioningJob.objects.filter(agent=bystander, kind=JobKind.DEPROVISION).exists()

    # Another ending event for the same agent (here a full refund): nothing new is queued.
    (refund,) = sample_events.build_ending_events("charge.refunded", agent=agent)
    assert sample_events.post_event(refund, url=webhook, secret=WEBHOOK_SECRET).status_code == 200
    assert ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION).count() == 1


def test_an_agent_still_provisioning_is_cancelled_then_deprovisioned(pipeline, webhook, settings):
    settings.LOCAL_RUNNER_STEP_SECONDS = 6  # a long `configure`: the event lands mid-build
    agent = paid_agent()
    build = services.job_enqueue(agent=agent, stripe_event_id="evt_e2e_paid_building")
    pipeline.wait_until(
        lambda: (
            bool(agent_vms(pipeline, agent))
            and ProvisioningJob.objects.get(pk=build.pk).status == JobStatus.PROVISIONING
        ),
        what="the build to have made its VM",
        job=build,
    )

    cancel_subscription(agent, webhook)

    build.refresh_from_db()
    assert (build.status, build.failed_step) == (JobStatus.FAILED, Step.CANCELLED), pipeline.dump(
        build
    )
    job = pipeline.wait_for(deprovision_of(agent), is_done, what="the deprovision to finish")
    pipeline.wait_until(
        lambda: not agent_vms(pipeline, agent), what="no VM left for the agent", job=job
    )
    cancel = JobEvent.objects.get(job=build, action=JobEvent.Action.CANCEL)
    enqueue = JobEvent.objects.get(job=job, action=JobEvent.Action.ENQUEUE)
    assert cancel.created_at <= enqueue.created_at
    assert "subscription cancelled" in cancel.reason
    agent.refresh_from_db()
    assert agent.is_ended
    # The cancelled build never completed, and nothing built it again.
    assert not JobEvent.objects.filter(job=build, action=JobEvent.Action.COMPLETE).exists()
    assert ProvisioningJob.objects.filter(agent=agent, kind=JobKind.PROVISION).count() == 1
