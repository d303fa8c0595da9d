"""The Stripe webhook door: dj-stripe's view, behind one check dj-stripe lacks.

dj-stripe's trigger validation assumes the body is a JSON object (`"id" not in data`); a scalar
body (`5`, `null`, `false`) raises TypeError inside it and answers 500, which Stripe would retry
and monitoring would page on. Every real Stripe event is an object, so anything else is refused
here with 400 before dj-stripe stores or validates anything, and so is a body nested more deeply
than any event (a deeply nested array made json.loads raise RecursionError). So is a NUL character anywhere in the
headers or the body: dj-stripe stores both, PostgreSQL refuses NUL in text and jsonb (another 500),
and no Stripe event or signature ever contains one; a signature header must be ASCII.

`webhook_path` and `webhook_url` say where the door is, for the setup command and test events.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404
from django.urls import reverse
from djstripe import signals as djstripe_signals
from djstripe.models import WebhookEndpoint, WebhookEventTrigger
from djstripe.views import ProcessWebhookView

from provisioning.api.parsers import MAX_NESTING, nesting_depth

logger = logging.getLogger("djstripe.views")  # dj-stripe's view logs there

TOO_DEEP = f"The webhook body is not valid JSON or is nested deeper than {MAX_NESTING} levels."


def webhook_path(endpoint_uuid: str | None = None) -> str:
    """The path of the webhook endpoint `endpoint_uuid` (default: STRIPE_WEBHOOK_UUID)."""
    return reverse(
        "djstripe:djstripe_webhook_by_uuid",
        kwargs={"uuid": endpoint_uuid or settings.STRIPE_WEBHOOK_UUID},
    )


def webhook_url(endpoint_uuid: str | None = None) -> str:
    """The public URL Stripe posts to: PUBLIC_BASE_URL + the endpoint's path."""
    return f"{settings.PUBLIC_BASE_URL}{webhook_path(endpoint_uuid)}"


# dj-stripe ships no type information, so its view is Any to the type checker.
class StripeWebhookView(ProcessWebhookView):  # type: ignore[misc]
    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.headers.get("Stripe-Signature", "").isascii():
            return HttpResponseBadRequest("The Stripe-Signature header is malformed.")
        if (
            b"\x00" in request.body
            or b"\\u0000" in request.body.lower()
            or any("\x00" in value for value in request.headers.values())
        ):
            return HttpResponseBadRequest("The webhook request contains NUL characters.")
        try:
            payload = json.loads(request.body)
        except RecursionError:
            return HttpResponseBadRequest(TOO_DEEP)
        except (ValueError, UnicodeDecodeError):
            return HttpResponseBadRequest("The webhook body is not valid JSON.")
        if not isinstance(payload, dict):
            return HttpResponseBadRequest(
                "The webhook body must be a JSON object (a Stripe event)."
            )
        if nesting_depth(payload) > MAX_NESTING:
            return HttpResponseBadRequest(TOO_DEEP)
        return self._process(request, kwargs["uuid"])

    @staticmethod
    def _process(request: HttpRequest, uuid: Any) -> HttpResponse:
        """dj-stripe's ProcessWebhookView.post, with the endpoint's owner account read in the
        same query as the endpoint (dj-stripe reads it right after, for the trigger row), and
        the trigger saved in the same transaction as the event it processes."""
        if "stripe-signature" not in request.headers:
            logger.error("HTTP_STRIPE_SIGNATURE is missing")
            return HttpResponseBadRequest()
        endpoint = get_object_or_404(
            WebhookEndpoint.objects.select_related("djstripe_owner_account"), djstripe_uuid=uuid
        )
        # One transaction, one commit: dj-stripe saves the trigger row before and after its own
        # transaction (three commits, each waiting for a WAL flush). If processing fails, all of
        # it rolls back and the trigger dj-stripe recorded the error on is saved again, alone.
        failure = _failed_trigger.set(None)
        try:
            with transaction.atomic():
                trigger = WebhookEventTrigger.from_request(request, webhook_endpoint=endpoint)
        except Exception:
            _keep(_failed_trigger.get())
            raise
        finally:
            _failed_trigger.reset(failure)
        if not trigger.valid:
            logger.error("Trigger object did not validate")
            return HttpResponseBadRequest()
        return HttpResponse(str(trigger.id))


# The trigger dj-stripe's webhook_processing_error signal names, while this request handles it.
_failed_trigger: ContextVar[WebhookEventTrigger | None] = ContextVar("failed_trigger", default=None)


def _note_failed_trigger(sender: Any, instance: WebhookEventTrigger, **kwargs: Any) -> None:
    _failed_trigger.set(instance)


djstripe_signals.webhook_processing_error.connect(
    _note_failed_trigger, dispatch_uid="billing.webhook.failed_trigger"
)


def _keep(trigger: WebhookEventTrigger | None) -> None:
    """Save a failed delivery's trigger (exception and traceback on it) after the rollback, as
    dj-stripe does: its Event row was rolled back with the rest, so the trigger names none."""
    if trigger is None:
        return
    trigger.event = None
    trigger.processed = False
    try:
        trigger.save(force_insert=True)
    except Exception:
        logger.exception("could not record the failed webhook trigger")
