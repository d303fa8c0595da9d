"""What the benchmarks share: PostgreSQL databases of their own, Django set up on one, timing, the
table.

Every database here is the benchmark's own (dropped and recreated each run) on the PostgreSQL at
PGHOST:PGPORT (127.0.0.1:5432, user postgres, trust auth by default); BENCH_DB_PREFIX, if set,
is put before each database's name.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PGHOST = os.environ.get("PGHOST", "127.0.0.1")
PGPORT = int(os.environ.get("PGPORT", "5432"))
PGUSER = os.environ.get("PGUSER", "postgres")
# Prepended to every database the benchmarks make, so runs side by side keep apart.
DB_PREFIX = os.environ.get("BENCH_DB_PREFIX", "")


def dsn(dbname: str, *, port: int | None = None) -> str:
    return f"host={PGHOST} port={port or PGPORT} user={PGUSER} dbname={dbname}"


def db_url(dbname: str, *, port: int | None = None) -> str:
    return f"postgres://{PGUSER}@{PGHOST}:{port or PGPORT}/{dbname}"


def recreate_db(dbname: str, *, port: int | None = None) -> None:
    with psycopg.connect(dsn("postgres", port=port), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
        conn.execute(f'CREATE DATABASE "{dbname}"')


def drop_db(dbname: str, *, port: int | None = None) -> None:
    with psycopg.connect(dsn("postgres", port=port), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}"')


def setup_django(dbname: str) -> None:
    """Point Django at `dbname`, set it up in this process and apply the provisioning app's
    migrations (auth, contenttypes and provisioning only: no dj-stripe, ~1 s instead of ~85 s)."""
    os.environ["DATABASE_URL"] = db_url(dbname)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault(
        "DJANGO_SECRET_KEY", "bench-only-not-secret-0123456789abcdefghijklmnopqrstuvwxyz"
    )
    os.environ["DISPATCH_ON_COMMIT"] = "0"  # the benchmark dispatches explicitly
    # The dispatch race measures the dispatch path's own cost (its in-flight count included), not
    # the capacity limit (`make launch` does that): with the limit of 20 and the dataset's
    # provisioning rows counted as in flight, no dispatcher would take anything.
    os.environ["PROVISIONING_MAX_IN_FLIGHT"] = "1000000000"
    os.environ["HETZNER_CALLS_PER_BUILD"] = "0"  # no Hetzner bound either
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "provisioning", verbosity=0, interactive=False)


class NoopBackend:
    """A runner backend that starts nothing and hands out unique run ids (per process)."""

    name = "noop"

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._prefix = os.getpid() * 10_000_000

    def dispatch(self, *, job_id: UUID, attempt: int, mode: str) -> Any:
        from provisioning.backends.base import DispatchResult

        return DispatchResult(run_id=str(self._prefix + next(self._ids)))

    def cancel_run(self, *, run_id: str) -> None:
        return None

    def get_run(self, *, run_id: str) -> None:
        return None

    def find_run(self, *, job_id: UUID, attempt: int, mode: str = "provision") -> None:
        return None

    def run_url(self, *, run_id: str) -> None:
        return None


def per_op(fn: Callable[[int], Any], n: int) -> float:
    """Seconds per call of fn(i) over i in range(n)."""
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Row:
    path: str
    figure: float | None
    unit: str
    ceiling: str  # what the figure is compared with
    ceiling_figure: float | None
    note: str = ""
    higher_is_better: bool = True
    ratio_override: str | None = None  # e.g. a growth ratio, or "pending"

    @property
    def ratio(self) -> str:
        if self.ratio_override is not None:
            return self.ratio_override
        if not self.ceiling_figure or not self.figure:
            return "-"
        r = (
            self.figure / self.ceiling_figure
            if self.higher_is_better
            else self.ceiling_figure / self.figure
        )
        return f"{r:.2f}"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "pending"
    if unit == "ms":
        return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    return f"{value:,.0f} {unit}"


def table(rows: list[Row]) -> str:
    header = ("path", "figure", "ceiling", "ceiling figure", "ratio")
    body = [
        (
            r.path,
            fmt(r.figure, r.unit) if r.figure is not None else "pending",
            r.ceiling,
            fmt(r.ceiling_figure, r.unit) if r.ceiling_figure is not None else "-",
            r.ratio,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    return "\n".join(lines)


# What a production-mode (DEBUG off) process needs to start against loopback fakes: the explicit
# loopback switch and the settings production has no defaults for (config/checks.py).
LOOPBACK_DEPLOYMENT_ENV = {
    "DJANGO_ALLOW_LOOPBACK_SERVICES": "1",
    "METRICS_TOKEN": "bench-only-metrics-token",
    "GITHUB_REPOSITORY": "example/agent-provisioning",
    "GITHUB_REPOSITORY_ID": "100000001",
}
