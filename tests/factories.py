from __future__ import annotations

from datetime import timedelta
from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from provisioning.models import Actor, Agent, JobEvent, JobStatus, ProvisioningJob


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"customer{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("correct horse battery staple")

    @factory.post_generation
    def verified_email(obj: Any, create: bool, extracted: bool | None, **_kwargs: Any) -> None:
        """A customer who can log in: allauth lets nobody in before their email is confirmed.
        `verified_email=False` leaves the address unconfirmed (as right after sign-up)."""
        if create and obj.email and extracted is not False:
            from allauth.account.models import EmailAddress

            EmailAddress.objects.update_or_create(
                user=obj, email=obj.email, defaults={"verified": True, "primary": True}
            )


class AgentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agent

    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"agent-{n}")
    region = "us-east"
    stripe_checkout_session_id = factory.Sequence(lambda n: f"cs_test_{n:024d}")


class JobFactory(factory.django.DjangoModelFactory):
    """A job row as-is (no events): for read paths. State changes in tests go through services."""

    class Meta:
        model = ProvisioningJob

    agent = factory.SubFactory(AgentFactory)
    user = factory.LazyAttribute(lambda j: j.agent.owner)
    region = factory.LazyAttribute(lambda j: j.agent.region)
    status = JobStatus.QUEUED


def backdate_row(obj: Any, create: bool, extracted: timedelta | None, **_kwargs: Any) -> None:
    """`backdate=timedelta(...)`: the row was created that long ago (created_at is set on insert
    by auto_now_add, so it is moved afterwards)."""
    if create and extracted is not None:
        obj.created_at = timezone.now() - extracted
        type(obj).objects.filter(pk=obj.pk).update(created_at=obj.created_at)


class JobEventFactory(factory.django.DjangoModelFactory):
    """One history row shaped like the services write them. For read paths (admin, retention);
    transitions in tests go through the services, which write their own events."""

    class Meta:
        model = JobEvent
        skip_postgeneration_save = True

    job = factory.SubFactory(JobFactory)
    actor = Actor.SYSTEM
    action = JobEvent.Action.DISPATCH
    attempt = factory.LazyAttribute(lambda e: e.job.attempt)
    backdate = factory.PostGeneration(backdate_row)
