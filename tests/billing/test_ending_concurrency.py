"""Ending events at the same moment: one event delivered many times at once, and different
ending events for one agent at once, still make exactly one deprovision job.

PostgreSQL only: SQLite serialises writers, so these races cannot happen there. agent_end locks
the agent's row; the deprovision job's unique stripe_event_id backs it up.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from billing.models import KnownCharge, UnmatchedEndingEvent
from provisioning.models import Agent, JobEvent, JobKind, JobStatus, ProvisioningJob
from tests.billing.conftest import deliver_with
from tests.billing.test_ending import CHARGE, CUSTOMER, load, paid_agent

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db(transaction=True)]


def _race(events: list[dict[str, Any]]) -> list[int]:
    """Deliver every event from its own thread and client, all released at once."""
    barrier = threading.Barrier(len(events))
    statuses: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(event: dict[str, Any]) -> None:
        try:
            send = deliver_with(Client(raise_request_exception=False))
            barrier.wait(timeout=30)
            status = send(event).status_code
            with lock:
                statuses.append(status)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(e,)) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return statuses


def _one_deprovision(agent: Agent) -> ProvisioningJob:
    agent.refresh_from_db()
    assert agent.is_ended
    (job,) = ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION)
    assert job.status == JobStatus.QUEUED
    assert JobEvent.objects.filter(job=job).count() == 1  # one enqueue
    assert not UnmatchedEndingEvent.objects.exists()
    return job


@pytest.mark.parametrize(
    "fixture",
    [
        "customer.subscription.deleted__canceled",
        "charge.refunded__full",
        "charge.dispute.created__needs_response",
    ],
)
def test_one_ending_event_delivered_ten_times_at_once_makes_one_deprovision(endpoint, fixture):
    agent = paid_agent()
    KnownCharge.objects.create(charge_id=CHARGE, stripe_customer_id=CUSTOMER, stripe_event_id="e")
    event = load(fixture)

    statuses = _race([event] * 10)

    assert statuses == [200] * 10
    assert _one_deprovision(agent).stripe_event_id == event["id"]


def test_every_kind_of_ending_event_for_one_agent_at_once_makes_one_deprovision(endpoint):
    agent = paid_agent()
    KnownCharge.objects.create(charge_id=CHARGE, stripe_customer_id=CUSTOMER, stripe_event_id="e")
    events = [
        load("customer.subscription.deleted__canceled"),
        load("charge.refunded__full"),
        load("charge.dispute.created__needs_response"),
    ]

    statuses = _race(events * 4)

    assert statuses == [200] * 12
    job = _one_deprovision(agent)
    assert job.stripe_event_id in {e["id"] for e in events}


def test_an_ending_event_racing_a_build_in_flight_cancels_it_once(endpoint):
    from provisioning import services

    agent = paid_agent()
    ProvisioningJob.objects.filter(agent=agent).delete()
    build = services.job_enqueue(agent=agent, stripe_event_id="evt_build")
    events = [load("customer.subscription.deleted__canceled"), load("charge.refunded__full")]

    statuses = _race(events * 3)

    assert statuses == [200] * 6
    _one_deprovision(agent)
    build.refresh_from_db()
    assert build.status == JobStatus.FAILED
    assert JobEvent.objects.filter(job=build, action=JobEvent.Action.CANCEL).count() == 1
