"""Stripe delivers at least once and sometimes twice at the same moment: the database decides.

PostgreSQL only: SQLite serialises writers, so these races cannot happen there.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from provisioning.models import Agent, JobEvent, ProvisioningJob
from tests.billing.conftest import deliver_with, load_event, new_session_id
from tests.factories import UserFactory

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db(transaction=True)]


def _race(events: list[dict[str, Any]]) -> list[int]:
    """Deliver every event from its own thread and client, all released at once."""
    barrier = threading.Barrier(len(events))
    statuses: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(event: dict[str, Any]) -> None:
        try:
            client = Client(raise_request_exception=False)
            send = deliver_with(client)
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


def test_twenty_concurrent_deliveries_of_one_new_event_make_one_agent_and_one_job(endpoint):
    customer = UserFactory(username="ada")
    event = load_event("checkout.session.completed__paid", user=customer)

    statuses = _race([event] * 20)

    assert statuses == [200] * 20
    assert Agent.objects.count() == 1
    job = ProvisioningJob.objects.get()
    assert job.stripe_event_id == event["id"]
    assert JobEvent.objects.filter(job=job).count() == 1  # one enqueue


def test_completed_and_async_succeeded_at_the_same_moment_make_one_agent_and_one_job(endpoint):
    customer = UserFactory(username="ada")
    session_id = new_session_id()
    completed = load_event("checkout.session.completed__paid", user=customer, session_id=session_id)
    succeeded = load_event(
        "checkout.session.async_payment_succeeded__paid", user=customer, session_id=session_id
    )

    statuses = _race([completed, succeeded] * 5)

    assert statuses == [200] * 10
    agent = Agent.objects.get()
    assert agent.stripe_checkout_session_id == session_id
    job = ProvisioningJob.objects.get()
    assert job.stripe_event_id in (completed["id"], succeeded["id"])
