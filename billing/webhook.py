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
from collections.abc import Callable
from traceback import format_exc
from typing import Any

import stripe
from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404
from django.urls import reverse
from djstripe import signals as djstripe_signals
from djstripe.enums import WebhookEndpointValidation
from djstripe.models import Account, APIKey, Event, WebhookEndpoint, WebhookEventTrigger
from djstripe.models.webhooks import get_remote_ip
from djstripe.settings import djstripe_settings
from djstripe.views import ProcessWebhookView

from billing.models import EventRecorded, WebhookEvent
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
        """dj-stripe's ProcessWebhookView.post, with the endpoint and its owner account kept per
        process: read again (in one query) when the signature does not verify with the copy."""
        if "stripe-signature" not in request.headers:
            logger.error("HTTP_STRIPE_SIGNATURE is missing")
            return HttpResponseBadRequest()
        endpoint = _endpoints.get(str(uuid))
        if endpoint is None or not _signed_for(request, endpoint):
            # Unknown to this process, or a signature its copy does not accept (the secret may
            # have been rotated by setup_stripe_webhook in another process): read it again.
            endpoint = get_object_or_404(
                WebhookEndpoint.objects.select_related("djstripe_owner_account"),
                djstripe_uuid=uuid,
            )
            _endpoints[str(uuid)] = endpoint
        trigger = _trigger_from_request(request, endpoint)
        if not trigger.valid:
            logger.error("Trigger object did not validate")
            return HttpResponseBadRequest()
        return HttpResponse(str(trigger.id))


def _trigger_from_request(request: HttpRequest, endpoint: Any) -> WebhookEventTrigger:
    """dj-stripe's WebhookEventTrigger.from_request, step for step (the same signals, the same
    validation, the same trigger row), in one transaction with one commit.

    dj-stripe inserts the trigger, commits, validates and processes in a transaction of its own,
    then updates the trigger (three commits, each waiting for a WAL flush), and reads the API key
    of the endpoint's account, and the owner account of that key, on every delivery. Here the
    trigger is written once, at the end, in the transaction that recorded the event; the key
    and the owner account are kept per process (see WebhookEvent). If validating or processing
    fails, all of it rolls back and the trigger, with the error on it, is saved alone afterwards.
    """
    try:
        body = request.body.decode(request.encoding or "utf-8")
    except UnicodeDecodeError:
        body = "(error decoding body)"
    account = endpoint.djstripe_owner_account
    trigger = WebhookEventTrigger(
        headers=dict(request.headers),
        body=body,
        remote_ip=get_remote_ip(request),
        stripe_trigger_account=account,
        webhook_endpoint=endpoint,
    )
    api_key = _api_key_cached(account) or djstripe_settings.get_default_api_key(endpoint.livemode)
    sender = WebhookEventTrigger
    try:
        try:
            with transaction.atomic():
                djstripe_signals.webhook_pre_validate.send(sender=sender, instance=trigger)
                trigger.valid = trigger.validate(secret=endpoint.secret, api_key=api_key)
                djstripe_signals.webhook_post_validate.send(
                    sender=sender, instance=trigger, valid=trigger.valid
                )
                if trigger.valid:
                    djstripe_signals.webhook_pre_process.send(sender=sender, instance=trigger)
                    trigger.event = WebhookEvent.record(trigger.json_body, api_key=api_key)
                    trigger.processed = True
                    djstripe_signals.webhook_post_process.send(
                        sender=sender, instance=trigger, api_key=api_key
                    )
                trigger.save(force_insert=True)
        except EventRecorded as recorded:
            # A redelivery: its transaction wrote nothing (the Event INSERT is its first write
            # and no receiver ran); the trigger names the event recorded before, as dj-stripe's.
            trigger.event = Event.objects.filter(id=recorded.event_id).first()
            if trigger.event is None:
                raise
            trigger.processed = True
            djstripe_signals.webhook_post_process.send(
                sender=sender, instance=trigger, api_key=api_key
            )
            trigger.save(force_insert=True)
    except Exception as error:
        lookups_forget()  # a look-up kept from a row that is gone must not fail the retry too
        trigger.exception = str(error)[
            : WebhookEventTrigger._meta.get_field("exception").max_length
        ]
        trigger.traceback = format_exc()
        djstripe_signals.webhook_processing_error.send(
            sender=sender,
            instance=trigger,
            api_key=api_key,
            exception=error,
            data=getattr(error, "http_body", ""),
        )
        _keep(trigger)
        raise
    return trigger


# Per process: the webhook endpoint row (with its account), the API key of an account
# (dj-stripe's Account.default_api_key) and the owner account of a key (dj-stripe's
# Account.get_or_retrieve_for_api_key). A key belongs to one account for good; saving or deleting
# a key, account or endpoint row in this process, or any failed delivery, clears all three.
_api_keys: dict[Any, str] = {}
_owners: dict[str, Any] = {}
_endpoints: dict[str, Any] = {}


def _signed_for(request: HttpRequest, endpoint: Any) -> bool:
    """Does the delivery's signature verify with this copy of the endpoint's secret? (dj-stripe
    checks it again, on the trigger; this only decides whether the copy is still good.)"""
    if endpoint.djstripe_validation_method != WebhookEndpointValidation.verify_signature:
        return False
    try:
        stripe.WebhookSignature.verify_header(
            request.body.decode("utf-8"),
            request.headers["Stripe-Signature"],
            endpoint.secret,
            endpoint.djstripe_tolerance,
        )
    except (stripe.SignatureVerificationError, UnicodeDecodeError):
        return False
    return True


def _api_key_cached(account: Any) -> str | None:
    if account is None:
        return None
    key = _api_keys.get(account.pk)
    if key is None:
        key = _api_keys[account.pk] = account.default_api_key
    return key


def owner_account_cached(api_key: str, find: Callable[[], Any]) -> Any:
    """The owner account of `api_key`, found by `find` once per process."""
    owner = _owners.get(api_key)
    if owner is None:
        owner = find()
        if owner is not None:
            _owners[api_key] = owner
    return owner


def lookups_forget(*args: Any, **kwargs: Any) -> None:
    _api_keys.clear()
    _owners.clear()
    _endpoints.clear()


for _model in (Account, APIKey, WebhookEndpoint):
    post_save.connect(
        lookups_forget, sender=_model, dispatch_uid=f"billing.webhook.{_model.__name__}"
    )
    post_delete.connect(
        lookups_forget, sender=_model, dispatch_uid=f"billing.webhook.del.{_model.__name__}"
    )


def _keep(trigger: WebhookEventTrigger) -> None:
    """Save a failed delivery's trigger (exception and traceback on it) after the rollback, as
    dj-stripe does: its Event row was rolled back with the rest, so the trigger names none."""
    trigger.event = None
    trigger.processed = False
    try:
        trigger.save(force_insert=True)
    except Exception:
        logger.exception("could not record the failed webhook trigger")
