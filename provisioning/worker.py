"""The worker's loop: every WORKER_INTERVAL_SECONDS, one tick of independent duties.

A tick records this worker's heartbeat (WorkerBeat, for /healthz and /metrics), sweeps timed-out
jobs through the fail path (which cancels the silent run after commit), dispatches due jobs and
sends cleanup runs for failed provisions; every RUN_FINISH_POLL_SECONDS it frees the runner slots
of reported runs GitHub has ended without its webhook reaching us; every RECONCILE_INTERVAL_SECONDS it also asks the
backend (GitHub) about in-flight runs and fails jobs whose run has finished. Each duty is
guarded: one failing (GitHub down, a database hiccup) never stops the others or the loop.

Several workers at once are safe: dispatch and cleanup take rows with SKIP LOCKED, and the sweep
re-checks each job under its row lock. No duty runs inside a transaction of ours (the services
open durable ones).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import F
from django.utils import timezone

from provisioning import services
from provisioning.models import WorkerBeat

if TYPE_CHECKING:
    from provisioning.backends.base import RunnerBackend

logger = logging.getLogger(__name__)

# A worker row nobody has updated for this long belongs to a process that is gone.
BEAT_RETENTION = timedelta(days=7)

# Duties other apps add (their AppConfig.ready() calls duty_register): provisioning imports no
# app above it, so billing's Stripe catch-up is handed to the worker rather than imported by it.
# Each returns how much it did; it keeps its own interval (a no-op tick returns 0).
EXTRA_DUTIES: dict[str, Callable[[], int]] = {}


def duty_register(name: str, duty: Callable[[], int]) -> None:
    """Run `duty` on every tick after the worker's own duties (same name: replaced, not doubled)."""
    EXTRA_DUTIES[name] = duty


def _refresh_connections() -> None:
    """What Django does around each request: drop connections past CONN_MAX_AGE or broken.

    Skipped inside a transaction (a caller's atomic block, e.g. a test): closing would end it.
    """
    if not connection.in_atomic_block:
        close_old_connections()


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


@dataclass
class TickReport:
    """What one tick did: a count per duty, or the error that duty raised."""

    done: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class Worker:
    name: str = field(default_factory=default_name)
    interval: float | None = None  # None: settings.WORKER_INTERVAL_SECONDS
    backend: RunnerBackend | None = None  # None: backends.get_backend() at each use
    dispatch_limit: int = 50
    stop_event: threading.Event = field(default_factory=threading.Event)
    started_at: Any = field(default_factory=timezone.now)
    ticks: int = 0
    _last_reconcile: float | None = field(default=None, repr=False)  # time.monotonic()
    _last_finishing: float | None = field(default=None, repr=False)

    # -- one tick ------------------------------------------------------------------------------

    def duties(self) -> list[tuple[str, Callable[[], int]]]:
        return [
            ("beat", self.beat),
            ("timeout", services.job_timeout_stale),
            ("finishing", self.finishing),
            (
                "dispatch",
                lambda: services.job_dispatch_due(backend=self.backend, limit=self.dispatch_limit),
            ),
            ("cleanup", lambda: services.job_send_cleanup(backend=self.backend)),
            ("reconcile", self.reconcile),
            ("alerts", services.operator_alerts_send),
            *EXTRA_DUTIES.items(),
        ]

    def tick(self) -> TickReport:
        report = TickReport()
        _refresh_connections()
        for name, duty in self.duties():
            try:
                report.done[name] = duty()
            except Exception as exc:
                logger.exception("worker %s: duty %s failed", self.name, name)
                report.failed[name] = f"{type(exc).__name__}: {exc}"
                # A broken connection must not poison the next duty.
                _refresh_connections()
        self.ticks += 1
        if any(count for name, count in report.done.items() if name != "beat"):
            logger.info("worker %s tick %d: %s", self.name, self.ticks, report.done)
        return report

    def reconcile(self) -> int:
        """Every RECONCILE_INTERVAL_SECONDS (not every tick): ask the backend about in-flight runs.

        The interval is kept here, per process; across workers, each job's `reconciled_at` lease
        keeps a run from being asked about more than once per interval.
        """
        now = time.monotonic()
        interval = float(settings.RECONCILE_INTERVAL_SECONDS)
        if self._last_reconcile is not None and now - self._last_reconcile < interval:
            return 0
        self._last_reconcile = now
        return services.job_reconcile_runs(backend=self.backend)

    def finishing(self) -> int:
        """Every RUN_FINISH_POLL_SECONDS: free the slots of reported runs GitHub no longer lists
        (their webhook was missed) or past RUN_FINISH_GRACE_SECONDS (services/finishing.py)."""
        now = time.monotonic()
        if (
            self._last_finishing is not None
            and now - self._last_finishing < settings.RUN_FINISH_POLL_SECONDS
        ):
            return 0
        self._last_finishing = now
        return services.runs_finished_poll(backend=self.backend)

    def beat(self) -> int:
        """Upsert this worker's row; prune rows of workers long gone."""
        now = timezone.now()
        updated = WorkerBeat.objects.filter(name=self.name).update(
            last_tick_at=now, ticks=F("ticks") + 1
        )
        if not updated:
            WorkerBeat.objects.update_or_create(
                name=self.name,
                defaults={"last_tick_at": now, "ticks": 1},
                create_defaults={"last_tick_at": now, "started_at": self.started_at, "ticks": 1},
            )
            WorkerBeat.objects.filter(last_tick_at__lt=now - BEAT_RETENTION).delete()
        return 1

    # -- the loop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to exit after the current tick (signal handlers call this)."""
        self.stop_event.set()

    def run(self, *, once: bool = False) -> int:
        """Tick until stopped; returns the number of ticks. `once`: a single tick (cron, tests)."""
        interval = float(
            self.interval if self.interval is not None else settings.WORKER_INTERVAL_SECONDS
        )
        logger.info("worker %s started (interval %.1fs)", self.name, interval)
        try:
            while True:
                self.tick()
                if once or self.stop_event.wait(interval):
                    break
        finally:
            if not connection.in_atomic_block:
                connection.close()
        logger.info("worker %s stopped after %d ticks", self.name, self.ticks)
        return self.ticks
