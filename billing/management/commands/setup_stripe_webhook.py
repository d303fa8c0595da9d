"""Create or update dj-stripe's WebhookEndpoint row from settings, and record the Stripe account
dj-stripe would otherwise fetch inside the first webhook. Safe to repeat."""

from __future__ import annotations

import uuid
from typing import Any

import stripe
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import services
from billing.webhook import webhook_url


class Command(BaseCommand):
    help = (
        "Create/update the WebhookEndpoint from STRIPE_WEBHOOK_SECRET and STRIPE_WEBHOOK_UUID "
        "and record the account dj-stripe would otherwise fetch inside a webhook: a test key's "
        "local stand-in; a live key's --account-id, else the account the key reads (one "
        "GET /v1/account now). A restricted live key needs --account-id."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", help="public webhook URL (default: from PUBLIC_BASE_URL)")
        parser.add_argument(
            "--account-id",
            default="",
            help="the Stripe account (acct_…) of STRIPE_SECRET_KEY; needed for a restricted live key",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        secret = settings.STRIPE_WEBHOOK_SECRET
        endpoint_uuid = settings.STRIPE_WEBHOOK_UUID
        if not secret or not endpoint_uuid:
            raise CommandError("Set STRIPE_WEBHOOK_SECRET and STRIPE_WEBHOOK_UUID first.")
        try:
            endpoint_uuid = str(uuid.UUID(endpoint_uuid))
        except ValueError as exc:
            raise CommandError(f"STRIPE_WEBHOOK_UUID is not a UUID: {endpoint_uuid!r}") from exc
        url = options["url"] or webhook_url(endpoint_uuid)
        account_id = options["account_id"].strip()
        if account_id and not account_id.startswith("acct_"):
            raise CommandError(f"--account-id must be an acct_… id, not {account_id!r}")
        try:
            endpoint, created = services.webhook_endpoint_setup(
                secret=secret,
                endpoint_uuid=endpoint_uuid,
                url=url,
                api_key=settings.STRIPE_SECRET_KEY,
                livemode=settings.STRIPE_LIVE_MODE,
                api_version=settings.STRIPE_API_VERSION,
                account_id=account_id,
            )
        except services.AccountUnknown as exc:
            raise CommandError(f"STRIPE_SECRET_KEY: {exc} with --account-id") from exc
        except stripe.StripeError as exc:
            raise CommandError(
                f"could not read the account of STRIPE_SECRET_KEY ({exc.user_message or exc}); "
                "pass it with --account-id"
            ) from exc
        account = endpoint.djstripe_owner_account
        self.stdout.write(
            f"{'Created' if created else 'Updated'} webhook endpoint {endpoint.id} at {url}"
            + (f" (account {account.id})" if account else "")
        )
