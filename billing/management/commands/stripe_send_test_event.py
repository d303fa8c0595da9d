"""Like `stripe trigger`: a realistic event, signed with Stripe's scheme, posted to a running
server's webhook.

Checkout events make a purchase for the customer. Ending events (`customer.subscription.deleted`,
`charge.refunded`, `charge.dispute.created`) are about the customer's latest agent (or
`--agent`), carrying the Stripe ids its purchase stored; a dispute is sent after the
`charge.succeeded` of the charge it disputes, as Stripe would have sent it at payment time.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import sample_events
from billing.webhook import webhook_url
from provisioning.models import Agent, Region


class Command(BaseCommand):
    help = (
        "Post a signed checkout.session.* event for a customer, or an ending event "
        "(subscription deleted, refund, dispute) for the customer's latest agent, to the webhook."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "type", choices=sample_events.CHECKOUT_EVENT_TYPES + sample_events.ENDING_EVENT_TYPES
        )
        parser.add_argument("--customer", required=True, help="username of the paying customer")
        parser.add_argument("--agent-name", default="my-agent")
        parser.add_argument("--region", default=Region.US_EAST.value, choices=Region.values)
        parser.add_argument("--session-id", help="reuse a session (e.g. completed, then async)")
        parser.add_argument("--unpaid", action="store_true", help="payment_status=unpaid")
        parser.add_argument(
            "--agent", help="ending events: the agent's id (default: the customer's latest agent)"
        )
        parser.add_argument(
            "--partial", action="store_true", help="charge.refunded: refund half, not all"
        )
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
        url = options["url"] or webhook_url()

        if options["type"] in sample_events.ENDING_EVENT_TYPES:
            agent = self._agent(user, options["agent"])
            events = sample_events.build_ending_events(
                options["type"],
                agent=agent,
                partial=options["partial"],
                livemode=settings.STRIPE_LIVE_MODE,
            )
            about = f"agent {agent.pk}"
        else:
            event = sample_events.build_checkout_event(
                options["type"],
                user=user,
                agent_name=options["agent_name"],
                region=options["region"],
                session_id=options["session_id"],
                paid=not options["unpaid"],
                livemode=settings.STRIPE_LIVE_MODE,
            )
            events = [event]
            about = f"session {event['data']['object']['id']}"

        for event in events:
            response = sample_events.post_event(event, url=url, secret=secret)
            body = response.text[:200].strip()
            # dj-stripe answers a delivery with the id of the trigger row it recorded.
            said = f"recorded as webhook trigger {body}" if body.isdigit() else body
            self.stdout.write(
                f"{event['type']} {event['id']} ({about}) -> {url}: "
                f"HTTP {response.status_code}" + (f", {said}" if said else "")
            )
            if response.status_code >= 300:
                raise CommandError(f"webhook answered {response.status_code}")

    def _agent(self, user: Any, agent_id: str | None) -> Agent:
        agents = Agent.objects.filter(owner=user).order_by("-created_at")
        try:
            agent = agents.filter(pk=agent_id).first() if agent_id else agents.first()
        except ValidationError as exc:
            raise CommandError(f"not an agent id: {agent_id!r}") from exc
        if agent is None:
            raise CommandError(
                f"no agent {agent_id} for {user.get_username()!r}"
                if agent_id
                else f"{user.get_username()!r} has no agent: buy one first"
            )
        return agent
