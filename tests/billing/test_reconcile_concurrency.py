"""The reconciler racing Stripe's own redeliveries: the database decides, as between two
deliveries. PostgreSQL only: SQLite serialises writers, so these races cannot happen there."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import stripe
from django.db import connection
from django.test import Client
from djstripe.models import Event

from billing import reconcile
from billing.models import StripeCatchUp
from provisioning.models import Agent, JobEvent, ProvisioningJob
from tests.billing.conftest import deliver_with, load_event, new_session_id
from tests.factories import UserFactory
from tests.fakes.stripe import FakeStripeAPI

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def fake(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> FakeStripeAPI:
    api = FakeStripeAPI()
    monkeypatch.setattr(stripe, "default_http_client", api)
    return api


def _all_at_once(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run every task in its own thread (own database connection), released together."""
    barrier = threading.Barrier(len(tasks))
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException] = []

    def run(index: int, task: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = task()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(tasks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def _delivery(event: dict[str, Any]) -> Callable[[], int]:
    def send() -> int:
        status: int = deliver_with(Client(raise_request_exception=False))(event).status_code
        return status

    return send


def _assert_one_agent_and_job_per_session(events: list[dict[str, Any]]) -> None:
    sessions = {e["data"]["object"]["id"] for e in events}
    assert Agent.objects.count() == len(sessions)
    for session_id in sessions:
        agent = Agent.objects.get(stripe_checkout_session_id=session_id)
        job = ProvisioningJob.objects.get(agent=agent)
        assert JobEvent.objects.filter(job=job).count() == 1  # one enqueue
    for event in events:
        assert Event.objects.filter(id=event["id"]).count() == 1


def test_the_reconciler_and_a_redelivery_of_the_same_event_make_one_agent_and_one_job(fake):
    customer = UserFactory(username="ada")
    events = [
        load_event("checkout.session.completed__paid", user=customer, session_id=new_session_id())
        for _ in range(6)
    ]
    tasks: list[Callable[[], Any]] = []
    for event in events:
        tasks.append(lambda e=event: reconcile.event_process(data=e))
        tasks.append(_delivery(event))

    results = _all_at_once(tasks)

    reconciled, statuses = results[0::2], results[1::2]
    assert statuses == [200] * len(events)
    _assert_one_agent_and_job_per_session(events)
    # Each event was recorded exactly once, by whichever won; only the reconciler's wins count.
    caught = set(StripeCatchUp.objects.values_list("stripe_id", flat=True))
    assert caught == {e["id"] for e, won in zip(events, reconciled, strict=True) if won}


def test_two_reconcile_runs_and_late_deliveries_at_once_make_one_agent_per_purchase(fake):
    customer = UserFactory(username="ada")
    now = int(time.time())
    events = []
    for i in range(5):
        session_id = new_session_id()
        completed = load_event(
            "checkout.session.completed__paid", user=customer, session_id=session_id
        )
        succeeded = load_event(
            "checkout.session.async_payment_succeeded__paid", user=customer, session_id=session_id
        )
        completed["created"], succeeded["created"] = now - 600 + i, now - 300 + i
        events += [fake.add_event(completed), fake.add_event(succeeded)]
    tasks: list[Callable[[], Any]] = [
        lambda: reconcile.reconcile_run(page_size=3),
        lambda: reconcile.reconcile_run(page_size=4),
    ]
    tasks += [_delivery(e) for e in events[::2]]

    results = _all_at_once(tasks)

    assert all(r.ok for r in results[:2])
    assert results[2:] == [200] * 5
    _assert_one_agent_and_job_per_session(events)
    assert ProvisioningJob.objects.count() == 5
    assert StripeCatchUp.objects.count() == sum(r.caught_up for r in results[:2])
