"""The Hetzner project at its server limit: the job waits without spending a retry, builds are
held back (deprovisions are not) until a server is freed, an operator lifts the hold, or the
retry interval passes; /metrics and the admin overview say so."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from provisioning import selectors, services
from provisioning.models import CapacityHold, JobEvent, JobKind, JobStatus, Step
from tests.factories import AgentFactory
from tests.provisioning.helpers import claimed, dispatch
from tests.provisioning.test_ops import samples

pytestmark = pytest.mark.django_db

LIMIT = "create server in fsn1: resource_limit_exceeded: server limit exceeded"


def at_the_limit(backend):
    job, run = claimed(backend)
    services.job_fail(
        job_id=job.pk, run=run, error=LIMIT, failed_step=Step.CREATE_SERVER, capacity=True
    )
    job.refresh_from_db()
    return job, run


def test_a_capacity_report_requeues_the_job_without_spending_a_retry(backend):
    job, run = at_the_limit(backend)

    assert (job.status, job.attempt, job.retry_count) == (JobStatus.QUEUED, 2, 0)
    assert job.next_attempt_at is None and job.dispatched_at is None
    event = JobEvent.objects.filter(job=job).order_by("-id").first()
    assert event.action == JobEvent.Action.CAPACITY_WAIT
    assert "no retry spent" in event.reason
    hold = selectors.capacity_hold_in_force(now=timezone.now())
    assert hold is not None and "resource_limit_exceeded" in hold.reason
    # Repeated by the same run (its answer was lost): nothing changes.
    again = services.job_fail(
        job_id=job.pk, run=run, error=LIMIT, failed_step=Step.CREATE_SERVER, capacity=True
    )
    assert (again.status, again.attempt, again.retry_count) == (JobStatus.QUEUED, 2, 0)


def test_while_held_builds_wait_and_deprovisions_still_go(backend):
    waiting, _run = at_the_limit(backend)
    deprovision = services.agent_end(agent_id=AgentFactory().pk, actor="stripe", reason="refund")

    taken = services.job_dispatch_due(backend=backend)

    assert taken == 1
    assert deprovision.kind == JobKind.DEPROVISION
    assert len(backend.runs_for(deprovision.pk)) == 1
    assert len(backend.runs_for(waiting.pk)) == 1  # the run that met the limit, no new one
    waiting.refresh_from_db()
    assert waiting.status == JobStatus.QUEUED and waiting.dispatched_at is None


def test_a_customers_waiting_build_does_not_keep_their_deprovision_back(backend):
    waiting, _run = at_the_limit(backend)
    other_agent = AgentFactory(owner=waiting.agent.owner)
    deprovision = services.agent_end(agent_id=other_agent.pk, actor="stripe", reason="refund")

    taken = services.job_dispatch_next(backend=backend)

    assert taken is not None and taken.pk == deprovision.pk
    assert deprovision.user_id == waiting.user_id


def test_the_hold_lapses_after_the_retry_interval(backend, settings):
    settings.CAPACITY_RETRY_SECONDS = 60
    waiting, _run = at_the_limit(backend)

    assert services.job_dispatch_next(backend=backend) is None
    later = timezone.now() + timedelta(seconds=61)
    taken = services.job_dispatch_next(backend=backend, now=later)

    assert taken is not None and taken.pk == waiting.pk


def test_a_completed_deprovision_lifts_the_hold_and_builds_go_again(backend):
    waiting, _run = at_the_limit(backend)
    deprovision = services.agent_end(agent_id=AgentFactory().pk, actor="stripe", reason="refund")
    run = dispatch(deprovision, backend)
    services.job_claim(job_id=deprovision.pk, attempt=deprovision.attempt, run=run)

    services.job_complete(job_id=deprovision.pk, run=run, server_id="", ipv4="")

    assert selectors.capacity_hold_in_force(now=timezone.now()) is None
    assert CapacityHold.objects.get().lifted_by == f"workflow:{run.run_id}"
    taken = services.job_dispatch_next(backend=backend)
    assert taken is not None and taken.pk == waiting.pk


def test_another_report_renews_the_hold_instead_of_stacking_holds(backend):
    first, first_run = claimed(backend)
    second, second_run = claimed(backend)
    for job, run in ((first, first_run), (second, second_run)):
        services.job_fail(
            job_id=job.pk, run=run, error=LIMIT, failed_step=Step.CREATE_SERVER, capacity=True
        )

    hold = CapacityHold.objects.get()
    assert hold.renewals == 1


def test_metrics_and_the_admin_overview_say_builds_are_held(client, admin_client, backend):
    assert samples(client)[("provisioning_capacity_hold", ())] == 0
    at_the_limit(backend)

    found = samples(client)
    html = admin_client.get(reverse("admin:provisioning_provisioningjob_changelist")).content

    assert found[("provisioning_capacity_hold", ())] == 1
    assert found[("provisioning_capacity_hold_seconds_left", ())] > 0
    assert b'id="capacity-hold"' in html
    assert b"Hetzner server limit" in html


def test_an_operator_lifts_the_hold_from_the_admin(admin_client, backend):
    at_the_limit(backend)
    hold = CapacityHold.objects.get()

    response = admin_client.post(
        reverse("admin:provisioning_capacityhold_changelist"),
        {"action": "lift_holds", "_selected_action": [hold.pk], "index": "0"},
        follow=True,
    )

    assert response.status_code == 200
    hold.refresh_from_db()
    assert hold.lifted_at is not None and hold.lifted_by.startswith("operator:")
    assert selectors.capacity_hold_in_force(now=timezone.now()) is None
    assert (
        b'id="capacity-hold"'
        not in admin_client.get(reverse("admin:provisioning_provisioningjob_changelist")).content
    )
