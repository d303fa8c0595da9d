"""Create or update dj-stripe's WebhookEndpoint row from settings, offline. Safe to repeat."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import services
from billing.webhook import webhook_url


class Command(BaseCommand):
    help = (
        "Create/update the WebhookEndpoint from STRIPE_WEBHOOK_SECRET and STRIPE_WEBHOOK_UUID "
        "(no Stripe call). With a test key, also record the account dj-stripe would fetch."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", help="public webhook URL (default: from PUBLIC_BASE_URL)")

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
        endpoint, created = services.webhook_endpoint_setup(
            secret=secret,
            endpoint_uuid=endpoint_uuid,
            url=url,
            api_key=settings.STRIPE_SECRET_KEY,
            livemode=settings.STRIPE_LIVE_MODE,
            api_version=settings.STRIPE_API_VERSION,
        )
        account = endpoint.djstripe_owner_account
        self.stdout.write(
            f"{'Created' if created else 'Updated'} webhook endpoint {endpoint.id} at {url}"
            + (f" (account {account.id})" if account else "")
        )
