from __future__ import annotations

import factory
from django.contrib.auth import get_user_model

from provisioning.models import Agent, JobStatus, ProvisioningJob


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"customer{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("correct horse battery staple")


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
