"""Billing's own rows. In the webhook tests these come from signed deliveries; the factories are
for the operator's side (admin lists, resolving) where how the row arrived does not matter."""

from __future__ import annotations

import factory
from django.utils import timezone

from billing.models import (
    KnownCharge,
    UnfulfillablePayment,
    UnfulfillableReason,
    UnmatchedEndingEvent,
    UnmatchedReason,
)
from tests.factories import backdate_row


class OperatorCaseFactory(factory.django.DjangoModelFactory):
    """The fields every operator case shares. `resolved=True`: an operator already closed it."""

    class Meta:
        abstract = True
        skip_postgeneration_save = True

    class Params:
        resolved = factory.Trait(
            resolved_at=factory.LazyFunction(timezone.now),
            resolved_by=factory.SubFactory("tests.factories.UserFactory"),
            note="handled by hand",
        )

    stripe_event_id = factory.Sequence(lambda n: f"evt_test_case{n:016d}")
    detail = ""
    payload = factory.LazyAttribute(lambda c: {"id": c.stripe_event_id, "type": c.event_type})
    backdate = factory.PostGeneration(backdate_row)


class UnfulfillablePaymentFactory(OperatorCaseFactory):
    class Meta:
        model = UnfulfillablePayment

    event_type = "checkout.session.completed"
    reason = UnfulfillableReason.UNKNOWN_CUSTOMER
    checkout_session_id = factory.Sequence(lambda n: f"cs_test_case{n:020d}")
    customer_reference = "999999"
    stripe_customer_id = factory.Sequence(lambda n: f"cus_test{n:010d}")


class UnmatchedEndingEventFactory(OperatorCaseFactory):
    class Meta:
        model = UnmatchedEndingEvent

    event_type = "customer.subscription.deleted"
    reason = UnmatchedReason.NO_AGENT
    stripe_customer_id = factory.Sequence(lambda n: f"cus_test{n:010d}")
    stripe_subscription_id = factory.Sequence(lambda n: f"sub_test{n:010d}")
    stripe_object_id = factory.LazyAttribute(lambda c: c.stripe_subscription_id)


class KnownChargeFactory(factory.django.DjangoModelFactory):
    """Whose a charge is, as a `charge.*` event told us."""

    class Meta:
        model = KnownCharge

    charge_id = factory.Sequence(lambda n: f"ch_test{n:016d}")
    payment_intent_id = factory.Sequence(lambda n: f"pi_test{n:016d}")
    stripe_customer_id = factory.Sequence(lambda n: f"cus_test{n:010d}")
    stripe_subscription_id = ""
    stripe_event_id = factory.Sequence(lambda n: f"evt_test_charge{n:016d}")
