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
from tests.billing.conftest import load_event
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
