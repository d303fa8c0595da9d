"""Like `stripe trigger`: a realistic Checkout event, signed with Stripe's scheme, posted to a
running server's webhook."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import test_events
from provisioning.models import Region


class Command(BaseCommand):
    help = "Post a signed checkout.session.* event for a customer to the webhook."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("type", choices=test_events.CHECKOUT_EVENT_TYPES)
        parser.add_argument("--customer", required=True, help="username of the paying customer")
        parser.add_argument("--agent-name", default="my-agent")
        parser.add_argument("--region", default=Region.US_EAST.value, choices=Region.values)
        parser.add_argument("--session-id", help="reuse a session (e.g. completed, then async)")
        parser.add_argument("--unpaid", action="store_true", help="payment_status=unpaid")
        parser.add_argument("--url", help="webhook URL (default: ours, at PUBLIC_BASE_URL)")
        parser.add_argument("--secret", help="signing secret (default: STRIPE_WEBHOOK_SECRET)")

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: options["customer"]})
        except User.DoesNotExist as exc:
            raise CommandError(f"no user {options['customer']!r}") from exc
        secret = options["secret"] or settings.STRIPE_WEBHOOK_SECRET
        if not secret:
            raise CommandError("no signing secret: set STRIPE_WEBHOOK_SECRET or pass --secret")
        event = test_events.build_checkout_event(
            options["type"],
            user=user,
            agent_name=options["agent_name"],
            region=options["region"],
            session_id=options["session_id"],
            paid=not options["unpaid"],
            livemode=settings.STRIPE_LIVE_MODE,
        )
        url = options["url"] or test_events.webhook_url()
        response = test_events.post_event(event, url=url, secret=secret)
        session_id = event["data"]["object"]["id"]
        self.stdout.write(
            f"{event['type']} {event['id']} (session {session_id}) -> {url}: "
            f"{response.status_code} {response.text[:200]}"
        )
        if response.status_code >= 300:
            raise CommandError(f"webhook answered {response.status_code}")
