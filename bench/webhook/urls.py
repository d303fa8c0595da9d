"""Our URL map plus `bench/bare-webhook/`: the same inserts with nothing of dj-stripe's."""

from __future__ import annotations

import json

from django.contrib.auth import get_user_model
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from config.urls import urlpatterns as base_urlpatterns
from provisioning import services
from provisioning.models import Agent


@csrf_exempt
def bare_webhook(request: HttpRequest) -> HttpResponse:
    """Parse the event, then agent + job + job event in one transaction. No signature check,
    no trigger row, no dj-stripe Event row, no idempotency lookups beyond job_enqueue's."""
    event = json.loads(request.body)
    session = event["data"]["object"]
    with transaction.atomic():
        user = get_user_model().objects.get(pk=session["client_reference_id"])
        agent = Agent.objects.create(
            owner=user,
            name=session["metadata"]["agent_name"],
            region=session["metadata"]["region"],
            stripe_checkout_session_id=session["id"],
            stripe_customer_id=session["customer"],
            stripe_subscription_id=session["subscription"],
        )
        services.job_enqueue(agent=agent, stripe_event_id=event["id"])
    return HttpResponse("ok")


urlpatterns = [path("bench/bare-webhook/", bare_webhook), *base_urlpatterns]
