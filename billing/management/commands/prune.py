"""Retention, safe to run from cron (e.g. hourly): prune expired used token ids and old invalid
webhook triggers; keep valid triggers, dj-stripe's events and the JobEvent audit trail."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import retention


class Command(BaseCommand):
    help = (
        "Prune used workflow token ids past expiry and invalid webhook triggers older than N "
        "days. Never touches JobEvent (the audit trail), valid triggers or dj-stripe events."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would go, delete nothing"
        )
        parser.add_argument(
            "--invalid-trigger-days",
            type=int,
            default=7,
            help="delete invalid (unverified) webhook triggers older than this (default 7)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["invalid_trigger_days"]
        if days < 0:
            raise CommandError("--invalid-trigger-days must be >= 0")
        dry_run = options["dry_run"]
        verb = "Would prune" if dry_run else "Pruned"
        for row in retention.prune(invalid_trigger_days=days, dry_run=dry_run):
            self.stdout.write(f"{verb} {row.deleted} {row.what} ({row.rule}); {row.kept} kept.")
        self.stdout.write(
            "Kept: job events (the audit trail), dj-stripe events, valid webhook triggers."
        )
