"""`manage.py provisioning_worker`: the dispatcher and timeout sweeper loop (provisioning.worker)."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from config.checks import refuse_unsafe_production
from provisioning.worker import Worker


class Command(BaseCommand):
    help = (
        "Dispatch due provisioning jobs, time out silent ones, send cleanup runs, and record a "
        "heartbeat for /healthz, every WORKER_INTERVAL_SECONDS. SIGTERM or SIGINT finishes the "
        "current tick and exits 0. Several workers at once are safe."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="Run a single tick and exit (cron, tests)."
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help="Seconds between ticks (default: settings.WORKER_INTERVAL_SECONDS).",
        )
        parser.add_argument("--name", default=None, help="Worker name (default: host:pid).")

    def handle(self, *args: Any, **options: Any) -> None:
        refuse_unsafe_production()
        worker = Worker(interval=options["interval"])
        if options["name"]:
            worker.name = options["name"]

        def request_stop(signum: int, frame: FrameType | None) -> None:
            self.stderr.write(f"{signal.Signals(signum).name}: stopping after this tick")
            worker.stop()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        ticks = worker.run(once=options["once"])
        self.stdout.write(f"worker {worker.name} stopped after {ticks} tick(s)")
