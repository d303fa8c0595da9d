"""Billing fixtures: a webhook endpoint recorded offline, captured events, a signed delivery."""

from __future__ import annotations

import copy
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from django.test import Client

from billing import sample_events, services
from billing.webhook import webhook_path, webhook_url

FIXTURES = sample_events.PAYLOADS
TEST_SECRET_KEY = "sk_test_billingSuiteOnlyNotAStripeKey00000"
WEBHOOK_SECRET = "whsec_billingSuiteOnlyNotSecret"
WEBHOOK_UUID = "6f1c2a1e-0c6d-4d8e-9b7a-5a4f3e2d1c0b"


@pytest.fixture(autouse=True)
def stripe_settings(settings: Any) -> Any:
    """Production-like settings (DEBUG off) with test-mode Stripe values; no dispatch by default."""
    settings.DEBUG = False
    settings.STRIPE_LIVE_MODE = False
    settings.STRIPE_SECRET_KEY = TEST_SECRET_KEY
    settings.STRIPE_TEST_SECRET_KEY = TEST_SECRET_KEY
    settings.STRIPE_LIVE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_WEBHOOK_UUID = WEBHOOK_UUID
    settings.STRIPE_PRICE_ID = "price_1SxTestPrice000000000000"
    settings.STRIPE_PRICE_AMOUNT = None
    settings.STRIPE_PRICE_CURRENCY = ""
    settings.STRIPE_API_BASE = ""
    settings.BILLING_LOCAL_CHECKOUT = False
    settings.PUBLIC_BASE_URL = "http://testserver"
    settings.DISPATCH_ON_COMMIT = False  # the dispatch test turns it on with a recording backend
    return settings


@pytest.fixture
def endpoint(db: None) -> Any:
    """dj-stripe's WebhookEndpoint and the account rows, recorded the way `make run` does."""
    row, _ = services.webhook_endpoint_setup(
        secret=WEBHOOK_SECRET,
        endpoint_uuid=WEBHOOK_UUID,
        url=webhook_url(WEBHOOK_UUID),
        api_key=TEST_SECRET_KEY,
        livemode=False,
        api_version="2025-09-30.clover",
    )
    return row


def load_event(
    name: str,
    *,
    user: Any = None,
    event_id: str | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """A captured event (`billing/sample_payloads/<type>__<variant>.json`) made fresh for a test."""
    event = json.loads((FIXTURES / f"{name}.json").read_text())
    event = copy.deepcopy(event)
    event["id"] = event_id or sample_events.stripe_id("evt_")
    event["created"] = int(time.time())
    session = event["data"]["object"]
    if session_id:
        session["id"] = session_id
    if user is not None:
        session["client_reference_id"] = str(user.pk)
    return event


def new_session_id() -> str:
    return "cs_test_a1" + secrets.token_hex(20)


Deliver = Callable[..., Any]


def deliver_with(client: Client) -> Deliver:
    def deliver(
        event: dict[str, Any] | None = None,
        *,
        body: bytes | None = None,
        secret: str = WEBHOOK_SECRET,
        timestamp: int | None = None,
        signature: str | None = None,
        endpoint_uuid: str = WEBHOOK_UUID,
        headers: dict[str, str] | None = None,
        sign_body: bytes | None = None,
    ) -> Any:
        """POST through dj-stripe's real URL, signed with Stripe's scheme (unless told not to)."""
        payload = body if body is not None else sample_events.encode(event or {})
        extra = dict(headers or {})
        if signature is None:
            signature = sample_events.sign(
                sign_body if sign_body is not None else payload, secret, timestamp
            )
        if signature:
            extra["Stripe-Signature"] = signature
        return client.post(
            webhook_path(endpoint_uuid),
            data=payload,
            content_type="application/json",
            headers=extra,
        )

    return deliver


@pytest.fixture
def deliver(client: Client, endpoint: Any) -> Deliver:
    return deliver_with(client)


class DjangoClientTransport(httpx.BaseTransport):
    """httpx to the Django app in-process via the test Client (same thread, same test DB)."""

    def __init__(self, client: Client | None = None) -> None:
        self.client = client or Client()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("content-type", "host")
        }
        response = self.client.generic(
            request.method,
            request.url.raw_path.decode(),
            data=request.read(),
            content_type=request.headers.get("content-type", "application/octet-stream"),
            headers=headers,
        )
        return httpx.Response(response.status_code, content=response.content)
