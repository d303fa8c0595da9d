"""The operator's side of billing's cases: resolving them (service and admin action) and the
open/resolved listing. The rows come from factories; the webhook tests make them from events."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from billing import services
from billing.models import UnfulfillablePayment, UnmatchedEndingEvent
from tests.billing.factories import (
    KnownChargeFactory,
    UnfulfillablePaymentFactory,
    UnmatchedEndingEventFactory,
)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

CASES = [
    pytest.param(UnfulfillablePaymentFactory, "unfulfillablepayment", "payments", id="payment"),
    pytest.param(UnmatchedEndingEventFactory, "unmatchedendingevent", "events", id="ending"),
]


@pytest.mark.parametrize(("factory", "_name", "_noun"), CASES)
def test_resolving_a_case_records_who_and_a_second_resolve_changes_nothing(factory, _name, _noun):
    case = factory(note="")
    ops, other = UserFactory(username="ops"), UserFactory(username="other")

    first = services.operator_case_resolve(case=case, by=ops, note="refunded in Stripe")
    second = services.operator_case_resolve(case=case, by=other, note="made the agent by hand")

    case.refresh_from_db()
    assert (first, second) == (True, False)
    assert case.is_resolved
    assert (case.resolved_by, case.note) == (ops, "refunded in Stripe")


@pytest.mark.parametrize(("factory", "name", "noun"), CASES)
def test_the_admin_lists_open_cases_apart_and_resolves_only_open_ones(
    admin_client, admin_user, factory, name, noun
):
    open_case = factory()
    done = factory(resolved=True)
    changelist = reverse(f"admin:billing_{name}_changelist")

    def listed(**query: str) -> set[int]:
        response = admin_client.get(changelist, query)
        assert response.status_code == 200
        return {row.pk for row in response.context["cl"].result_list}

    assert listed() == {open_case.pk, done.pk}
    assert listed(state="open") == {open_case.pk}
    assert listed(state="resolved") == {done.pk}

    response = admin_client.post(
        changelist,
        {"action": "mark_resolved", "_selected_action": [open_case.pk, done.pk]},
        follow=True,
    )

    assert [str(m) for m in get_messages(response.wsgi_request)] == [f"Resolved 1 of 2 {noun}."]
    open_case.refresh_from_db()
    assert open_case.resolved_by == admin_user
    assert listed(state="open") == set()


def test_the_admin_offers_no_way_to_add_a_case(admin_client):
    for name in ("unfulfillablepayment", "unmatchedendingevent"):
        assert admin_client.get(reverse(f"admin:billing_{name}_add")).status_code == 403


def test_factories_make_rows_the_models_accept():
    old = UnfulfillablePaymentFactory(backdate=timedelta(days=3))
    charge = KnownChargeFactory()

    stored = UnfulfillablePayment.objects.get(pk=old.pk).created_at
    assert stored == old.created_at
    assert timedelta(days=3) <= timezone.now() - stored < timedelta(days=3, minutes=1)
    assert str(charge) == charge.charge_id
    assert not UnmatchedEndingEvent.objects.exists()
