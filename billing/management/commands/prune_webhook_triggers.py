"""Retention for dj-stripe's trigger rows only: forged or garbled requests still write one each.

`manage.py prune` runs this together with the rest of retention (use that one from cron)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import services


class Command(BaseCommand):
    help = "Delete invalid (unverified) webhook trigger rows older than N days; keep valid ones."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than-days", type=int, default=7)

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["older_than_days"]
        if days < 0:
            raise CommandError("--older-than-days must be >= 0")
        deleted, kept = services.webhook_trigger_prune(older_than=timedelta(days=days))
        self.stdout.write(
            f"Deleted {deleted} invalid webhook triggers older than {days} days; "
            f"{kept} recent invalid triggers kept (valid triggers are never pruned)."
        )
