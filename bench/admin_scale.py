"""The operator console at 1,000,000 jobs: server time of the jobs list, its filters and search.

    .venv/bin/python bench/admin_scale.py [--rows 1000000] [--fresh] [--runs 7]

Uses its own PostgreSQL database `bench_admin` on PGHOST:PGPORT (127.0.0.1:5432, user postgres),
created on first use and reused while it holds the requested number of jobs (`--fresh` rebuilds
it). Loading is set-based SQL (generate_series) into the migrated schema, with the console's
PostgreSQL-only indexes (migration 0004) built afterwards on the full tables, then VACUUM ANALYZE.

Each case is a GET through Django's test Client as a staff superuser, timed with
time.perf_counter() around the whole request (middleware, queries, template rendering): server
time, without a network. Reported: median and slowest of --runs after 2 warm-ups, the number of
SQL queries and their total time, and the process's CPU time per request (what the request costs
when the machine is busy with other work). Budget: 300 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

DBNAME = common.DB_PREFIX + "bench_admin"
BUDGET_MS = 300.0
USERS = 200_000

# The loaded jobs (i = 1 is the newest, one job every 20 s going back):
#   i <= 3000, i % 3 = 0   provisioning (one in ten silent for 40 min: stale)
#   i <= 20000, i % 3 = 1  queued
#   i % 16 = 5             failed, at one of six steps
#   otherwise              running
#   i % 50 = 0             deprovision jobs
LOAD_SQL = """
CREATE TEMP TABLE umap AS
    SELECT id, substr(username, 5)::int AS u FROM auth_user WHERE username ~ '^user[0-9]+$';
CREATE UNIQUE INDEX ON umap (u);

INSERT INTO provisioning_agent (id, owner_id, name, region, stripe_checkout_session_id,
    stripe_customer_id, stripe_subscription_id, server_id, server_name, ipv4, created_at,
    updated_at, ended_at, end_reason)
SELECT md5('agent' || i)::uuid, umap.id,
       (ARRAY['support','sales','research','ops','docs','triage','billing','hr'])[1 + i % 8]
           || '-bot-' || substr(md5('n' || i), 1, 8),
       (ARRAY['us-east','us-west','eu-central','ap-southeast'])[1 + i % 4],
       'cs_bench_' || i, '', '', '', '', NULL, ts, ts,
       CASE WHEN i % 97 = 0 THEN ts + interval '30 days' END,
       CASE WHEN i % 97 = 0 THEN 'subscription deleted' ELSE '' END
FROM generate_series(1, {rows}) i
JOIN umap ON umap.u = 1 + i % {users}
CROSS JOIN LATERAL (SELECT now() - i * interval '20 seconds' AS ts) t;

INSERT INTO provisioning_provisioningjob (id, agent_id, user_id, stripe_event_id, status, region,
    workflow_run_id, retry_count, max_retries, error, failed_step, claimed_at, last_heartbeat_at,
    completed_at, created_at, updated_at, kind, attempt, run_attempt, step, progress,
    next_attempt_at, dispatched_at, cleanup_dispatched_at)
SELECT md5('job' || i)::uuid, md5('agent' || i)::uuid, umap.id, 'evt_bench_' || i, s.status,
       (ARRAY['us-east','us-west','eu-central','ap-southeast'])[1 + i % 4],
       CASE WHEN s.status <> 'queued' THEN (20000000000 + i)::text END,
       CASE s.status WHEN 'failed' THEN 3 WHEN 'running' THEN i % 3 ELSE 0 END, 3,
       CASE WHEN s.status = 'failed'
            THEN 'bench failure ' || i || E'\\nansible: task failed, exit 2' ELSE '' END,
       CASE WHEN s.status = 'failed' THEN (ARRAY['create-server','wait-ssh','configure',
            'health-check','timeout','cancelled'])[1 + (i / 16) % 6] ELSE '' END,
       CASE WHEN s.status <> 'queued' THEN now() - interval '10 minutes'
                                           - (i % 10 = 0)::int * interval '40 minutes' END,
       CASE WHEN s.status <> 'queued' THEN now() - interval '30 seconds'
                                           - (i % 10 = 0)::int * interval '40 minutes' END,
       CASE WHEN s.status IN ('running', 'failed') THEN ts + interval '6 minutes' END,
       ts, ts + interval '6 minutes',
       CASE WHEN i % 50 = 0 THEN 'deprovision' ELSE 'provision' END,
       CASE s.status WHEN 'failed' THEN 4 WHEN 'running' THEN 1 + i % 3 ELSE 1 END,
       CASE WHEN s.status <> 'queued' THEN 1 END,
       CASE s.status WHEN 'running' THEN 'complete' WHEN 'provisioning' THEN 'configure'
                     ELSE '' END,
       CASE s.status WHEN 'running' THEN 100 WHEN 'provisioning' THEN 40 END,
       NULL, NULL,
       CASE WHEN s.status = 'failed' THEN ts + interval '7 minutes' END
FROM generate_series(1, {rows}) i
JOIN umap ON umap.u = 1 + i % {users}
CROSS JOIN LATERAL (SELECT now() - i * interval '20 seconds' AS ts) t
CROSS JOIN LATERAL (SELECT CASE
    WHEN i <= 3000 AND i % 3 = 0 THEN 'provisioning'
    WHEN i <= 20000 AND i % 3 = 1 THEN 'queued'
    WHEN i % 16 = 5 THEN 'failed'
    ELSE 'running' END AS status) s;
"""


def loaded_rows() -> int:
    import psycopg

    try:
        with psycopg.connect(common.dsn(DBNAME)) as conn:
            row = conn.execute("SELECT count(*) FROM provisioning_provisioningjob").fetchone()
            return int(row[0]) if row else 0
    except psycopg.Error:
        return -1


def setup(rows: int, fresh: bool) -> None:
    present = -1 if fresh else loaded_rows()
    if present != rows:
        print(f"creating database {DBNAME} and loading {rows:,} jobs …", flush=True)
        common.recreate_db(DBNAME)
    os.environ.update(
        {
            "DATABASE_URL": common.db_url(DBNAME),
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DJANGO_TESTING": "1",  # plain static storage: no collectstatic manifest needed
            "DJANGO_ALLOWED_HOSTS": "testserver,localhost",
            "DJANGO_SECURE_SSL_REDIRECT": "0",
            "LOG_LEVEL": "WARNING",
        }
    )
    os.environ.setdefault(
        "DJANGO_SECRET_KEY", "bench-only-not-secret-0123456789abcdefghijklmnopqrstuvwxyz"
    )
    import django

    django.setup()
    from django.core.management import call_command

    if present == rows:
        call_command("migrate", "auth", verbosity=0)
        call_command("migrate", "sessions", verbosity=0)
        call_command("migrate", "axes", verbosity=0)  # the admin login records its attempts
        call_command("migrate", "account", verbosity=0)
        call_command("migrate", "provisioning", verbosity=0)
        print(f"reusing {DBNAME}: {rows:,} jobs already loaded", flush=True)
        return
    t0 = time.perf_counter()
    # The schema without the console's search indexes; they are built on the full tables below.
    call_command("migrate", "auth", verbosity=0)
    call_command("migrate", "sessions", verbosity=0)
    call_command("migrate", "axes", verbosity=0)  # the admin login records its attempts
    call_command("migrate", "account", verbosity=0)
    call_command("migrate", "provisioning", "0003", verbosity=0)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name,"
            " email, is_staff, is_active, date_joined)"
            " SELECT '!', false, 'user' || u, '', '', 'user' || u || '@' ||"
            " (ARRAY['example.com','mail.test','corp.example'])[1 + u %% 3], false, true,"
            " now() - interval '400 days' FROM generate_series(1, %s) u",
            [USERS],
        )
        cursor.execute(LOAD_SQL.format(rows=int(rows), users=USERS))
    loaded = time.perf_counter() - t0
    call_command("migrate", "provisioning", verbosity=0)  # 0004: trigram and filter indexes
    indexed = time.perf_counter() - t0 - loaded
    import psycopg

    with psycopg.connect(common.dsn(DBNAME), autocommit=True) as conn:
        for table in ("auth_user", "provisioning_agent", "provisioning_provisioningjob"):
            conn.execute(f"VACUUM ANALYZE {table}")
    print(
        f"loaded in {loaded:.0f}s, indexes {indexed:.0f}s, "
        f"vacuum {time.perf_counter() - t0 - loaded - indexed:.0f}s",
        flush=True,
    )


def cases(rows: int) -> list[tuple[str, str, dict[str, str], str | None]]:
    """(label, url, query, a job id that must appear on the page)."""
    import hashlib
    import uuid

    from django.urls import reverse
    from django.utils import timezone

    def job_id(i: int) -> str:
        return str(uuid.UUID(hashlib.md5(f"job{i}".encode()).hexdigest()))  # noqa: S324

    def agent_fragment(i: int) -> str:
        return hashlib.md5(f"n{i}".encode()).hexdigest()[:8]  # noqa: S324

    def nth(fraction: float) -> int:  # a job i that exists at any --rows
        return max(1, int(rows * fraction))

    a, b, c, d, e = nth(0.123457), nth(0.234567), nth(0.654321), nth(0.765432), nth(0.777777)
    jobs = reverse("admin:provisioning_provisioningjob_changelist")
    agents = reverse("admin:provisioning_agent_changelist")
    today = str(timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0))
    return [
        ("jobs: unfiltered", jobs, {}, job_id(1)),
        ("jobs: status = failed", jobs, {"status__exact": "failed"}, job_id(5)),
        ("jobs: status = running", jobs, {"status__exact": "running"}, job_id(2)),
        ("jobs: status = queued", jobs, {"status__exact": "queued"}, job_id(1)),
        ("jobs: status = provisioning", jobs, {"status__exact": "provisioning"}, job_id(3)),
        ("jobs: stale", jobs, {"stale": "yes"}, job_id(30)),
        ("jobs: failed step = timeout", jobs, {"failed_step__exact": "timeout"}, None),
        ("jobs: kind = deprovision", jobs, {"kind__exact": "deprovision"}, job_id(50)),
        ("jobs: region = eu-central", jobs, {"region__exact": "eu-central"}, job_id(2)),
        ("jobs: created today", jobs, {"created_at__gte": today}, None),
        ("jobs: page 100", jobs, {"p": "100"}, None),
        ("jobs: search job id", jobs, {"q": job_id(a)}, job_id(a)),
        ("jobs: search short id", jobs, {"q": job_id(b)[:8]}, job_id(b)),
        ("jobs: search Stripe event", jobs, {"q": f"evt_bench_{c}"}, job_id(c)),
        ("jobs: search run id", jobs, {"q": str(20_000_000_000 + d)}, job_id(d)),
        ("jobs: search email", jobs, {"q": "user4242@example.com"}, job_id(4241)),
        ("jobs: search agent name", jobs, {"q": agent_fragment(e)}, job_id(e)),
        ("jobs: search common text", jobs, {"q": "sales-bot"}, job_id(1)),
        ("jobs: search no match", jobs, {"q": "nobody-at-all"}, None),
        ("agents: unfiltered", agents, {}, None),
        ("agents: search name", agents, {"q": agent_fragment(e)}, None),
        ("events: unfiltered", reverse("admin:provisioning_jobevent_changelist"), {}, None),
    ]


class QueryTimer:
    """connection.execute_wrapper: adds each query's time and count to the current run's slot."""

    def __init__(self, sql_ms: list[float], counts: list[int]) -> None:
        self.sql_ms, self.counts = sql_ms, counts

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        t = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.sql_ms[-1] += (time.perf_counter() - t) * 1000
            self.counts[-1] += 1


def measure(runs: int, rows: int) -> list[dict[str, Any]]:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(
        username="bench-operator",
        defaults={"is_staff": True, "is_superuser": True, "email": "ops@bench.example"},
    )
    client = Client()
    client.force_login(user)
    results = []
    for label, url, query, expect in cases(rows):
        sql_ms: list[float] = []
        query_counts: list[int] = []
        times: list[float] = []
        cpu: list[float] = []
        timer = QueryTimer(sql_ms, query_counts)

        body = ""
        for run in range(runs + 2):
            sql_ms.append(0.0)
            query_counts.append(0)
            with connection.execute_wrapper(timer):
                t0, c0 = time.perf_counter(), time.process_time()
                response = client.get(url, query)
                elapsed = (time.perf_counter() - t0) * 1000
                used = (time.process_time() - c0) * 1000
            if response.status_code != 200:
                raise SystemExit(f"{label}: HTTP {response.status_code} {response.get('Location')}")
            if run >= 2:
                times.append(elapsed)
                cpu.append(used)
            body = response.content.decode()
        if expect and expect[:8] not in body:
            raise SystemExit(f"{label}: expected job {expect[:8]} on the page")
        median = statistics.median(times)
        results.append(
            {
                "label": label,
                "median_ms": median,
                "max_ms": max(times),
                "queries": query_counts[-1],
                "sql_ms": statistics.median(sql_ms[2:]),
                "cpu_ms": statistics.median(cpu),
                "ok": median < BUDGET_MS,
            }
        )
        print(f"  {label:32} {median:7.1f} ms", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--fresh", action="store_true", help="drop and reload the database")
    args = parser.parse_args()
    setup(args.rows, args.fresh)
    results = measure(args.runs, args.rows)
    print()
    print(f"Operator console at {args.rows:,} jobs (server time, median of {args.runs})")
    print()
    print("| case | median | slowest | queries | SQL | Django CPU | budget |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        print(
            f"| {r['label']} | {r['median_ms']:.1f} ms | {r['max_ms']:.1f} ms | {r['queries']}"
            f" | {r['sql_ms']:.1f} ms | {r['cpu_ms']:.1f} ms | {'ok' if r['ok'] else 'OVER'} |"
        )
    load = os.getloadavg()[0]
    print()
    print(
        f"SQL: wall time of the queries; Django CPU: this process's CPU time per request "
        f"(middleware, ORM, templates). Load average during the run: {load:.1f} on "
        f"{os.cpu_count()} CPUs: wall times above include waiting for a CPU."
    )
    print()
    print(
        json.dumps(
            [
                {
                    "path": f"admin {r['label']} ({args.rows:,} jobs)",
                    "figure": round(r["median_ms"], 1),
                    "unit": "ms",
                    "ceiling": f"{BUDGET_MS:.0f} ms budget",
                    "ceiling_figure": BUDGET_MS,
                    "higher_is_better": False,
                }
                for r in results
            ]
        )
    )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
