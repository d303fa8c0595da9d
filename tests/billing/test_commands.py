from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from djstripe.models import Account, APIKey, WebhookEndpoint, WebhookEventTrigger

from billing import retention
from provisioning.models import Agent
from tests.billing.conftest import TEST_SECRET_KEY, WEBHOOK_SECRET, WEBHOOK_UUID, load_event
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _run(*args: Any) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_setup_stripe_webhook_records_the_endpoint_and_the_account_offline(stripe_http):
    output = _run("setup_stripe_webhook")

    endpoint = WebhookEndpoint.objects.get()
    assert str(endpoint.djstripe_uuid) == WEBHOOK_UUID
    assert endpoint.secret == WEBHOOK_SECRET
    assert endpoint.url == f"http://testserver/stripe/webhook/{WEBHOOK_UUID}/"
    assert endpoint.api_version == "2025-09-30.clover"
    assert (
        APIKey.objects.get(secret=TEST_SECRET_KEY).djstripe_owner_account == Account.objects.get()
    )
    assert "Created webhook endpoint" in output
    assert stripe_http.calls == []


def test_setup_stripe_webhook_is_idempotent_and_updates_the_secret(settings):
    _run("setup_stripe_webhook")
    settings.STRIPE_WEBHOOK_SECRET = "whsec_rotated"

    output = _run("setup_stripe_webhook")

    assert WebhookEndpoint.objects.get().secret == "whsec_rotated"
    assert (Account.objects.count(), APIKey.objects.count()) == (1, 1)
    assert "Updated webhook endpoint" in output


LIVE_KEY = "sk_live_" + "a" * 30
LIVE_ACCOUNT = {"id": "acct_1LiveAccount000", "object": "account", "country": "DE"}


def test_setup_stripe_webhook_records_a_live_keys_account_once_so_webhooks_never_fetch_it(
    settings, stripe_http
):
    settings.STRIPE_SECRET_KEY = LIVE_KEY
    stripe_http.answer("get", "/v1/account", LIVE_ACCOUNT)

    _run("setup_stripe_webhook")
    _run("setup_stripe_webhook")  # known now: no second call

    assert [c.path for c in stripe_http.calls] == ["/v1/account"]
    account = Account.objects.get()
    assert account.id == LIVE_ACCOUNT["id"]
    key = APIKey.objects.get(secret=LIVE_KEY)
    assert key.djstripe_owner_account == account and key.livemode
    assert WebhookEndpoint.objects.get().djstripe_owner_account == account
    # What dj-stripe asks inside a webhook: answered from the database.
    assert Account.get_or_retrieve_for_api_key(LIVE_KEY) == account
    assert len(stripe_http.calls) == 1


def test_a_restricted_live_key_needs_the_account_id_and_then_calls_nothing(settings, stripe_http):
    settings.STRIPE_SECRET_KEY = "rk_live_" + "b" * 30

    with pytest.raises(CommandError, match="--account-id"):
        _run("setup_stripe_webhook")
    _run("setup_stripe_webhook", "--account-id", "acct_1Restricted00")

    assert stripe_http.calls == []
    key = APIKey.objects.get(secret=settings.STRIPE_SECRET_KEY)
    assert key.djstripe_owner_account.id == "acct_1Restricted00"
    assert Account.get_or_retrieve_for_api_key(settings.STRIPE_SECRET_KEY).id == (
        "acct_1Restricted00"
    )


def test_a_live_key_whose_account_cannot_be_read_is_a_clear_command_error(settings, stripe_http):
    settings.STRIPE_SECRET_KEY = LIVE_KEY
    stripe_http.answer("get", "/v1/account", {"error": {"message": "no"}}, status=403)

    with pytest.raises(CommandError, match="--account-id"):
        _run("setup_stripe_webhook")

    assert not Account.objects.exists()


def test_setup_stripe_webhook_refuses_without_a_secret(settings):
    settings.STRIPE_WEBHOOK_SECRET = ""

    with pytest.raises(CommandError, match="STRIPE_WEBHOOK_SECRET"):
        _run("setup_stripe_webhook")


def test_prune_deletes_old_invalid_webhook_triggers_and_keeps_valid_ones(endpoint):
    def trigger(*, valid: bool, days_old: int) -> WebhookEventTrigger:
        row = WebhookEventTrigger.objects.create(
            remote_ip="127.0.0.1", headers={}, body="{}", valid=valid, webhook_endpoint=endpoint
        )
        WebhookEventTrigger.objects.filter(pk=row.pk).update(
            created=timezone.now() - timedelta(days=days_old)
        )
        return row

    old_forged = trigger(valid=False, days_old=10)
    recent_forged = trigger(valid=False, days_old=1)
    old_valid = trigger(valid=True, days_old=400)

    output = _run("prune", "--invalid-trigger-days", "7")

    remaining = set(WebhookEventTrigger.objects.values_list("pk", flat=True))
    assert remaining == {recent_forged.pk, old_valid.pk}
    assert old_forged.pk not in remaining
    assert "Pruned 1 invalid webhook triggers" in output


def test_forged_requests_leave_trigger_rows_that_the_prune_removes(deliver, settings):
    deliver({"id": "evt_forged", "livemode": False}, secret="whsec_wrong")
    assert WebhookEventTrigger.objects.filter(valid=False).count() == 1

    pruned = retention.invalid_triggers_prune(older_than=timedelta(0))

    assert (pruned.deleted, pruned.kept) == (1, 0)


@pytest.mark.django_db(transaction=True)
def test_stripe_send_test_event_posts_a_signed_event_to_a_running_server(
    live_server, settings, endpoint
):
    customer = UserFactory(username="ada")
    url = f"{live_server.url}/stripe/webhook/{WEBHOOK_UUID}/"

    output = _run(
        "stripe_send_test_event",
        "checkout.session.completed",
        "--customer",
        "ada",
        "--agent-name",
        "helper",
        "--region",
        "us-west",
        "--url",
        url,
    )

    assert "HTTP 200" in output
    agent = Agent.objects.get()
    assert (agent.owner, agent.name, agent.region) == (customer, "helper", "us-west")
    assert agent.jobs.count() == 1


def test_stripe_send_test_event_needs_a_known_customer():
    with pytest.raises(CommandError, match="no user"):
        _run("stripe_send_test_event", "checkout.session.completed", "--customer", "nobody")


def test_signatures_match_stripes_own_verifier():
    import stripe

    from billing.sample_events import encode, sign

    body = encode(load_event("checkout.session.completed__paid"))

    stripe.WebhookSignature.verify_header(body.decode(), sign(body, "whsec_x"), "whsec_x", 300)
