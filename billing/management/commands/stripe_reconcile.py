"""Catch up with Stripe now: process missed events and audit paid sessions (the worker does this
every STRIPE_RECONCILE_INTERVAL_SECONDS)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import stripe
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from billing import reconcile


class Command(BaseCommand):
    help = (
        "List Stripe events since the watermark (or --since) and process those no webhook "
        "delivered, fulfil or report paid Checkout sessions without an agent, and compare "
        "subscriptions with agents."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since",
            help="ISO 8601 time to list events from instead of the watermark (at most 30 days "
            "back), e.g. 2026-01-31T08:00:00Z",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        since = _parse_since(options.get("since"))
        try:
            report = reconcile.reconcile_run(since=since)
        except stripe.StripeError as exc:
            raise CommandError(f"Stripe refused or did not answer: {exc}") from exc
        self.stdout.write(
            f"Listed {report.listed} events: {report.caught_up} caught up, "
            f"{report.already_recorded} already recorded, {len(report.failed)} failed. "
            f"Audited {report.sessions_checked} paid sessions: {report.sessions_fulfilled} "
            f"fulfilled, {len(report.sessions_without_agent)} without agent. "
            f"Checked {report.subscriptions_checked} subscriptions: {report.agents_ended} agents "
            f"ended, {len(report.drift_cases)} billed after their agent ended. "
            f"Watermark: {report.watermark.isoformat() if report.watermark else 'none'}."
        )
        for event_id, error in report.failed.items():
            self.stderr.write(f"event {event_id} failed: {error}")
        for session_id in report.sessions_without_agent:
            self.stdout.write(f"paid session without agent: {session_id}")
        for subscription_id in report.drift_cases:
            self.stdout.write(f"billed, agent ended (operator case): {subscription_id}")
        if report.failed:
            raise CommandError(f"{len(report.failed)} events could not be processed")


def _parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parse_datetime(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise CommandError(f"--since {value!r} is not an ISO 8601 time")
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, UTC)
    if parsed > timezone.now():
        raise CommandError(f"--since {value!r} is in the future")
    return parsed
