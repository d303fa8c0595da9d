"""Ending events are checked for their Stripe mode like purchases are; a purchase naming an inactive
or staff account is not built. Both are recorded for operators and answered 200."""

from __future__ import annotations

from typing import Any

import pytest

from billing.models import (
    KnownCharge,
    UnfulfillablePayment,
    UnfulfillableReason,
    UnmatchedEndingEvent,
    UnmatchedReason,
)
from provisioning.models import Agent, ProvisioningJob
from tests.billing.conftest import load_event
from tests.billing.test_ending import CHARGE, CUSTOMER, SUBSCRIPTION, deprovisions, load, paid_agent
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def in_live_mode(event: dict[str, Any]) -> dict[str, Any]:
    event["livemode"] = True
    event["data"]["object"]["livemode"] = True
    return event


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        ("customer.subscription.deleted__canceled", {"subscription": SUBSCRIPTION}),
        ("charge.refunded__full", {"customer": CUSTOMER, "charge": CHARGE}),
    ],
)
def test_an_ending_event_from_the_other_mode_ends_nothing_and_is_kept(deliver, name, ids):
    agent = paid_agent()

    answer = deliver(in_live_mode(load(name, **ids)))

    assert answer.status_code == 200
    agent.refresh_from_db()
    assert not agent.is_ended
    assert deprovisions(agent) == []
    case = UnmatchedEndingEvent.objects.get()
    assert case.reason == UnmatchedReason.WRONG_LIVEMODE


def test_the_same_ending_event_in_our_mode_ends_the_agent(deliver):
    agent = paid_agent()

    deliver(load("customer.subscription.deleted__canceled", subscription=SUBSCRIPTION))

    agent.refresh_from_db()
    assert agent.is_ended
    assert not UnmatchedEndingEvent.objects.exists()


def test_a_charge_from_the_other_mode_is_not_remembered(deliver):
    deliver(in_live_mode(load("charge.succeeded__paid", customer=CUSTOMER, charge=CHARGE)))

    assert not KnownCharge.objects.exists()


@pytest.mark.parametrize(
    "account", [{"is_active": False}, {"is_staff": True}], ids=["inactive", "staff"]
)
def test_a_purchase_for_an_inactive_or_staff_account_is_not_built(deliver, account):
    user = UserFactory(**account)

    answer = deliver(load_event("checkout.session.completed__paid", user=user))

    assert answer.status_code == 200
    assert Agent.objects.count() == 0
    assert ProvisioningJob.objects.count() == 0
    case = UnfulfillablePayment.objects.get()
    assert case.reason == UnfulfillableReason.INELIGIBLE_CUSTOMER
