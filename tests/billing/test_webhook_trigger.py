"""The webhook's trigger row (dj-stripe's record of each delivery), now saved in the same
transaction as the event: a success leaves one processed trigger naming its event; a failure
rolls everything back yet keeps the trigger with its error, as dj-stripe's own view does."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import OperationalError
from djstripe.models import Event, WebhookEventTrigger

from billing import services
from provisioning.models import Agent, ProvisioningJob
from tests.billing.conftest import load_event, new_session_id
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def customer() -> Any:
    return UserFactory(username="ada")


def test_a_delivery_leaves_one_processed_trigger_naming_its_event(deliver, customer):
    event = load_event("checkout.session.completed__paid", user=customer)

    answer = deliver(event)

    assert answer.status_code == 200
    trigger = WebhookEventTrigger.objects.get()
    assert answer.content.decode() == str(trigger.pk)
    assert (trigger.valid, trigger.processed, trigger.event_id) == (True, True, event["id"])
    assert trigger.exception == "" and ProvisioningJob.objects.count() == 1


def test_a_failed_delivery_rolls_back_but_keeps_its_trigger_and_error(
    client, endpoint, customer, monkeypatch
):
    from tests.billing.conftest import deliver_with

    client.raise_request_exception = False
    event = load_event("checkout.session.completed__paid", user=customer)

    def database_down(purchase: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "_agent_get_or_create", database_down)
    assert deliver_with(client)(event).status_code == 500

    trigger = WebhookEventTrigger.objects.get()
    assert trigger.valid is True and trigger.processed is False and trigger.event_id is None
    assert "server closed the connection" in trigger.exception
    assert "OperationalError" in trigger.traceback
    assert not Event.objects.exists() and not Agent.objects.exists()


def test_a_forged_signature_keeps_an_invalid_trigger_and_nothing_else(deliver, customer):
    event = load_event("checkout.session.completed__paid", user=customer)

    assert deliver(event, secret="whsec_notTheRightOne").status_code == 400

    trigger = WebhookEventTrigger.objects.get()
    assert (trigger.valid, trigger.processed) == (False, False)
    assert not Event.objects.exists() and not Agent.objects.exists()


def test_a_redelivery_keeps_its_own_processed_trigger_naming_the_first_event(deliver, customer):
    event = load_event("checkout.session.completed__paid", user=customer)
    assert deliver(event).status_code == 200

    again = deliver(event)

    assert again.status_code == 200
    first, second = WebhookEventTrigger.objects.order_by("pk")
    assert answer_names(again, second)
    assert (second.valid, second.processed, second.event_id) == (True, True, event["id"])
    assert first.event_id == event["id"] and second.exception == ""
    assert Event.objects.count() == 1 and ProvisioningJob.objects.count() == 1


def answer_names(answer: Any, trigger: WebhookEventTrigger) -> bool:
    return bool(answer.content.decode() == str(trigger.pk))


def test_a_delivery_reads_no_account_or_api_key_row_once_they_are_known(deliver, customer):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    deliver(load_event("checkout.session.completed__paid", user=customer))  # learns them
    event = load_event(
        "checkout.session.completed__paid", user=customer, session_id=new_session_id()
    )

    with CaptureQueriesContext(connection) as queries:
        assert deliver(event).status_code == 200

    reads = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert not [sql for sql in reads if 'FROM "djstripe_apikey"' in sql]
    assert not [sql for sql in reads if 'FROM "djstripe_account"' in sql]
    assert not [sql for sql in reads if 'FROM "djstripe_event"' in sql]  # the INSERT decides
    assert ProvisioningJob.objects.count() == 2


def test_a_new_api_key_row_is_looked_up_again(deliver, customer, endpoint):
    from billing import webhook

    deliver(load_event("checkout.session.completed__paid", user=customer))
    assert webhook._owners and webhook._api_keys

    endpoint.djstripe_owner_account.save()

    assert not webhook._owners and not webhook._api_keys


def test_a_secret_rotated_by_another_process_is_read_again(deliver, customer, endpoint):
    from djstripe.models import WebhookEndpoint

    from billing import webhook

    assert deliver(load_event("checkout.session.completed__paid", user=customer)).status_code == 200
    assert webhook._endpoints  # kept by this process
    # setup_stripe_webhook in another process: no signal reaches this one.
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(secret="whsec_rotatedSecret")
    event = load_event(
        "checkout.session.completed__paid", user=customer, session_id=new_session_id()
    )

    assert deliver(event, secret="whsec_rotatedSecret").status_code == 200
    old = load_event("checkout.session.completed__paid", user=customer, session_id=new_session_id())
    assert deliver(old).status_code == 400
    assert ProvisioningJob.objects.count() == 2
