"""The queue core, in process, against its ceilings on the same PostgreSQL in the same run.

Rows: enqueue vs a raw INSERT+COMMIT loop; dispatch-next with 4 concurrent dispatchers vs a plain
SKIP LOCKED loop and vs procrastinate's fetch_job; the stale sweep's find query and 10k timeouts
at 1M rows; enqueue, heartbeat and status read at 10k vs 1M rows.

Data: users, agents, jobs and one enqueue event per job made with generate_series. Row sets (by
the number `i` their ids are made from) keep each measurement's rows apart:

  A  terminal jobs (running, 1 in 33 failed)          users cycle over all
  F  fresh provisioning jobs (heartbeats, reads)      one per user, users 10001..12000
  S  stale provisioning jobs (the sweep), 1M stage    one per user, users 1..10000
  Q  queued, dispatched a moment ago (not due)        users 12001..13000
  D  due jobs for the dispatch race (then deleted)    one per user, users 13001..
  E  agents without jobs, consumed by enqueue         users 15001..20000
  U  queued, dispatched and not claimed (GitHub still  users 1..10000, older than every D job
     holds their runs), for the due query; deleted after
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench import common
from bench.common import Row

DB = common.DB_PREFIX + "bench_core"
PROCRASTINATE_DB = common.DB_PREFIX + "bench_procrastinate"
USERS = 20_000
F_LO, F_N = 2_000_001, 2_000
S_LO, S_N = 3_000_001, 10_000
Q_LO, Q_N = 4_000_001, 1_000
D_LO = 5_000_001
E_LO = 6_000_001
U_LO, U_N = 7_000_001, 10_000

JOB_COLUMNS = (
    "id, stripe_event_id, status, region, workflow_run_id, retry_count, max_retries, error, "
    "failed_step, claimed_at, last_heartbeat_at, completed_at, created_at, updated_at, kind, "
    "attempt, run_attempt, step, progress, next_attempt_at, dispatched_at, cleanup_dispatched_at, "
    "agent_id, user_id"
)


def _sql(conn: psycopg.Connection, query: str, params: Any = None) -> None:
    conn.execute(query, params)  # type: ignore[arg-type]


def gen_users(conn: psycopg.Connection) -> None:
    _sql(
        conn,
        "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, "
        "is_staff, is_active, date_joined) SELECT '!', false, 'u' || i, '', '', "
        "'u' || i || '@example.com', false, true, now() FROM generate_series(1, %s::int) i",
        (USERS,),
    )


def gen_agents(conn: psycopg.Connection, lo: int, hi: int, user_sql: str) -> None:
    _sql(
        conn,
        "INSERT INTO provisioning_agent (id, name, region, stripe_checkout_session_id, "
        "stripe_customer_id, stripe_subscription_id, server_id, server_name, ipv4, created_at, "
        "updated_at, ended_at, end_reason, owner_id) "
        "SELECT md5('agent-' || i)::uuid, 'agent ' || i, 'us-east', 'cs_test_bench_' || i, "
        "'cus_' || i, 'sub_' || i, '', '', NULL, ts, ts, NULL, '', " + user_sql + " "
        "FROM (SELECT i, now() - ((5000000 - mod(i, 5000000)) * interval '20 seconds') AS ts "
        "FROM generate_series(%s::int, %s::int) i) s",
        (lo, hi),
    )


def gen_jobs(conn: psycopg.Connection, lo: int, hi: int, kind: str) -> None:
    """Agents, jobs and each job's enqueue event for i in [lo, hi], shaped by `kind`."""
    user = {
        "A": f"1 + mod(i, {USERS})",
        "F": f"10000 + (i - {F_LO} + 1)",
        "S": f"(i - {S_LO} + 1)",
        "Q": f"12000 + (i - {Q_LO} + 1)",
        "D": f"13000 + (i - {D_LO} + 1)",
        "U": f"(i - {U_LO} + 1)",
    }[kind]
    cols = {
        "A": (
            "CASE WHEN mod(i, 33) = 0 THEN 'failed' ELSE 'running' END",
            "ts + interval '1 minute'",
            "ts + interval '4 minutes'",
            "ts + interval '5 minutes'",
            "'r' || i",
            "1",
            "'complete'",
            "100",
            "ts + interval '10 seconds'",
        ),
        "F": (
            "'provisioning'",
            "now()",
            "now()",
            "NULL",
            "'run-' || i",
            "1",
            "'configure'",
            "60",
            "now()",
        ),
        "S": (
            "'provisioning'",
            "now() - interval '2 hours'",
            "now() - interval '2 hours'",
            "NULL",
            "'run-' || i",
            "1",
            "'configure'",
            "60",
            "now() - interval '2 hours'",
        ),
        "Q": ("'queued'", "NULL", "NULL", "NULL", "'run-' || i", "NULL", "''", "NULL", "now()"),
        "D": ("'queued'", "NULL", "NULL", "NULL", "NULL", "NULL", "''", "NULL", "NULL"),
        "U": ("'queued'", "NULL", "NULL", "NULL", "'run-' || i", "NULL", "''", "NULL", "now()"),
    }[kind]
    status, claimed, beat, completed, run_id, run_attempt, step, progress, dispatched = cols
    # Paid earlier than every other set (D's oldest is ~3.2 years old): a walk in paid order
    # that did not leave them out would pass all of them before the first due job.
    ts = (
        f"now() - interval '6 years' + (i - {U_LO}) * interval '1 second'"
        if kind == "U"
        else "now() - ((5000000 - mod(i, 5000000)) * interval '20 seconds')"
    )
    gen_agents(conn, lo, hi, user)
    _sql(
        conn,
        f"INSERT INTO provisioning_provisioningjob ({JOB_COLUMNS}) "
        f"SELECT md5('job-' || i)::uuid, 'evt_bench_' || i, {status}, 'us-east', {run_id}, 0, 3, "
        f"'', '', {claimed}, {beat}, {completed}, ts, ts, 'provision', 1, {run_attempt}, {step}, "
        f"{progress}, NULL, {dispatched}, NULL, md5('agent-' || i)::uuid, {user} "
        f"FROM (SELECT i, {ts} AS ts FROM generate_series(%s::int, %s::int) i) s",
        (lo, hi),
    )
    _sql(
        conn,
        "INSERT INTO provisioning_jobevent (created_at, actor, action, from_status, to_status, "
        "attempt, workflow_run_id, step, reason, job_id) "
        "SELECT now(), 'stripe', 'enqueue', '', 'queued', 1, NULL, '', 'Stripe event evt_bench_' || i, "
        "md5('job-' || i)::uuid FROM generate_series(%s::int, %s::int) i",
        (lo, hi),
    )


def analyze(conn: psycopg.Connection) -> None:
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE")
    conn.autocommit = False


def job_count(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM provisioning_provisioningjob").fetchone()
    assert row is not None
    return int(row[0])


# ---------------------------------------------------------------------------------------------
# enqueue


@dataclass
class AgentPool:
    """Agents with no job yet (set E); each enqueue takes the next one."""

    next_i: int = E_LO
    made_to: int = E_LO - 1

    def take(self, conn: psycopg.Connection, n: int) -> list[int]:
        if self.next_i + n - 1 > self.made_to:
            hi = self.next_i + max(n, 4000) - 1
            gen_agents(conn, self.made_to + 1, hi, f"15001 + mod(i, {USERS - 15000})")
            conn.commit()
            self.made_to = hi
        taken = list(range(self.next_i, self.next_i + n))
        self.next_i += n
        return taken


def _agent_uuid(i: int) -> uuid.UUID:
    import hashlib

    return uuid.UUID(hashlib.md5(f"agent-{i}".encode()).hexdigest())  # noqa: S324 (an id, not a hash)


def enqueue_service(pool: AgentPool, conn: psycopg.Connection, n: int) -> float:
    from provisioning import services
    from provisioning.models import Agent

    ids = [_agent_uuid(i) for i in pool.take(conn, n)]
    agents = {a.pk: a for a in Agent.objects.filter(pk__in=ids)}
    ordered = [agents[i] for i in ids]
    return common.per_op(
        lambda k: services.job_enqueue(agent=ordered[k], stripe_event_id=f"evt_{uuid.uuid4().hex}"),
        n,
    )


def enqueue_raw(pool: AgentPool, conn: psycopg.Connection, n: int) -> float:
    """The same two rows (job + its enqueue event) in one transaction, with plain psycopg."""
    agent_ids = [_agent_uuid(i) for i in pool.take(conn, n)]
    owners = dict(
        conn.execute(
            "SELECT id, owner_id FROM provisioning_agent WHERE id = ANY(%s)", (agent_ids,)
        ).fetchall()
    )
    conn.commit()
    insert_job = (
        f"INSERT INTO provisioning_provisioningjob ({JOB_COLUMNS}) VALUES (%s, %s, 'queued', "
        "'us-east', NULL, 0, 3, '', '', NULL, NULL, NULL, %s, %s, 'provision', 1, NULL, '', NULL, "
        "NULL, NULL, NULL, %s, %s)"
    )
    insert_event = (
        "INSERT INTO provisioning_jobevent (created_at, actor, action, from_status, to_status, "
        "attempt, workflow_run_id, step, reason, job_id) VALUES (%s, 'stripe', 'enqueue', '', "
        "'queued', 1, NULL, '', %s, %s)"
    )

    def one(k: int) -> None:
        from datetime import UTC, datetime

        now = datetime.now(UTC)
        job_id = uuid.uuid4()
        event_id = f"evt_{uuid.uuid4().hex}"
        agent_id = agent_ids[k]
        with conn.cursor() as cur:
            cur.execute(insert_job, (job_id, event_id, now, now, agent_id, owners[agent_id]))
            cur.execute(insert_event, (now, f"Stripe event {event_id}", job_id))
        conn.commit()

    return common.per_op(one, n)


# ---------------------------------------------------------------------------------------------
# heartbeat and status read


def f_jobs(conn: psycopg.Connection) -> list[tuple[uuid.UUID, str, uuid.UUID]]:
    rows = conn.execute(
        "SELECT id, workflow_run_id, agent_id FROM provisioning_provisioningjob "
        "WHERE status = 'provisioning' AND step = 'configure' AND workflow_run_id LIKE 'run-%' "
        "AND last_heartbeat_at > now() - interval '1 hour' ORDER BY id"
    ).fetchall()
    conn.commit()
    return [(r[0], r[1], r[2]) for r in rows]


def heartbeat_service(jobs: list[tuple[uuid.UUID, str, uuid.UUID]], n: int) -> float:
    from provisioning import services

    def one(k: int) -> None:
        job_id, run_id, _ = jobs[k % len(jobs)]
        services.job_heartbeat(
            job_id=job_id, run=services.Run(run_id=run_id), step="configure", progress=60
        )

    return common.per_op(one, n)


def heartbeat_raw(
    conn: psycopg.Connection, jobs: list[tuple[uuid.UUID, str, uuid.UUID]], n: int
) -> float:
    conn.autocommit = True
    query = (
        "UPDATE provisioning_provisioningjob SET last_heartbeat_at = now(), updated_at = now(), "
        "progress = 60 WHERE id = %s AND status = 'provisioning' AND workflow_run_id = %s "
        "AND run_attempt = 1 AND step = 'configure'"
    )

    def one(k: int) -> None:
        job_id, run_id, _ = jobs[k % len(jobs)]
        conn.execute(query, (job_id, run_id))

    try:
        return common.per_op(one, n)
    finally:
        conn.autocommit = False


def status_read_service(jobs: list[tuple[uuid.UUID, str, uuid.UUID]], n: int) -> float:
    from provisioning import selectors, services

    def one(k: int) -> None:
        agent_id = jobs[k % len(jobs)][2]
        job = selectors.job_get_latest_for_agent(agent_id=agent_id)
        assert job is not None
        services.job_timeout_if_stale(job_id=job.pk)

    return common.per_op(one, n)


# ---------------------------------------------------------------------------------------------
# dispatch's due query, with and without runs waiting in GitHub's queue


def due_query(n: int) -> float:
    """Seconds per call of the query each dispatch runs for new work (selectors.job_list_due,
    the first row, locked SKIP LOCKED as _take_due locks it), in its own transaction. The
    median of three rounds of n calls."""
    from django.db import transaction
    from django.utils import timezone

    from provisioning import selectors

    def one(_: int) -> None:
        with transaction.atomic():
            job = (
                selectors.job_list_due(now=timezone.now())
                .select_for_update(skip_locked=True, of=("self",))
                .first()
            )
        assert job is not None and job.dispatched_at is None

    one(0)
    return common.median([common.per_op(one, n) for _ in range(3)])


def due_plan() -> str:
    from django.utils import timezone

    from provisioning import selectors

    qs = selectors.job_list_due(now=timezone.now()).values_list("pk", flat=True)[:1]
    return qs.explain(analyze=True, buffers=True)


def delete_set(conn: psycopg.Connection, lo: int, hi: int) -> None:
    """A generated set's jobs and their events (the agents stay, without jobs)."""
    for table, column in (
        ("provisioning_jobevent", "job_id"),
        ("provisioning_provisioningjob", "id"),
    ):
        _sql(
            conn,
            f"DELETE FROM {table} WHERE {column} IN (SELECT md5('job-' || i)::uuid "
            "FROM generate_series(%s::int, %s::int) i)",
            (lo, hi),
        )
    conn.commit()


# ---------------------------------------------------------------------------------------------
# dispatch: 4 concurrent dispatchers (processes)


def _service_dispatcher(start: Any, out: Any) -> None:
    from django.db import connection

    from provisioning import services

    backend = common.NoopBackend()
    connection.ensure_connection()
    taken: list[str] = []
    start.wait()
    t0 = time.perf_counter()
    empty = 0
    while True:
        job = services.job_dispatch_next(backend=backend)
        if job is None:
            # An empty answer does not prove the queue is empty: look again, then give up.
            empty += 1
            if empty > 3:
                break
            time.sleep(0.002)
            continue
        empty = 0
        taken.append(str(job.pk))
    out.put((t0, time.perf_counter(), taken))
    connection.close()


def _raw_dispatcher(start: Any, out: Any) -> None:
    conn = psycopg.connect(common.dsn(DB))
    prefix = os.getpid() * 10_000_000
    n = 0
    taken: list[str] = []
    start.wait()
    t0 = time.perf_counter()
    empty = 0
    while True:
        with conn.transaction():
            row = conn.execute(
                "SELECT id FROM provisioning_provisioningjob WHERE status = 'queued' "
                "AND dispatched_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now()) "
                "ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED"
            ).fetchone()
            if row is not None:
                n += 1
                conn.execute(
                    "UPDATE provisioning_provisioningjob SET dispatched_at = now(), "
                    "workflow_run_id = %s, updated_at = now() WHERE id = %s",
                    (str(prefix + n), row[0]),
                )
        if row is None:
            empty += 1
            if empty > 3:
                break
            time.sleep(0.002)
            continue
        empty = 0
        taken.append(str(row[0]))
    out.put((t0, time.perf_counter(), taken))
    conn.close()


def _procrastinate_dispatcher(start: Any, out: Any) -> None:
    from procrastinate import App, PsycopgConnector

    async def run() -> tuple[float, float, list[str]]:
        app = App(
            connector=PsycopgConnector(
                conninfo=common.dsn(PROCRASTINATE_DB), min_size=1, max_size=2
            )
        )
        async with app.open_async():
            worker_id = await app.job_manager.register_worker()
            taken: list[str] = []
            start.wait()
            t0 = time.perf_counter()
            empty = 0
            while True:
                job = await app.job_manager.fetch_job(queues=None, worker_id=worker_id)
                if job is None:
                    empty += 1
                    if empty > 3:
                        break
                    await asyncio.sleep(0.002)
                    continue
                empty = 0
                taken.append(str(job.id))
            return t0, time.perf_counter(), taken

    out.put(asyncio.run(run()))


@dataclass
class Race:
    jobs_per_s: float
    taken: int
    doubled: int
    per_worker: list[int] = field(default_factory=list)


def race(target: Callable[[Any, Any], None], workers: int = 4) -> Race:
    from django.db import connections

    connections.close_all()  # children must not share the parent's socket
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every child connect before the start
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    t0 = min(r[0] for r in results)
    t1 = max(r[1] for r in results)
    ids = Counter(i for r in results for i in r[2])
    doubled = sum(1 for c in ids.values() if c > 1)
    taken = sum(ids.values())
    return Race(
        jobs_per_s=taken / (t1 - t0) if t1 > t0 else 0.0,
        taken=taken,
        doubled=doubled,
        per_worker=[len(r[2]) for r in results],
    )


def prepare_procrastinate(n: int) -> None:
    from procrastinate import App, PsycopgConnector

    common.recreate_db(PROCRASTINATE_DB)
    app = App(connector=PsycopgConnector(conninfo=common.dsn(PROCRASTINATE_DB)))
    with app.open():
        app.schema_manager.apply_schema()
    with psycopg.connect(common.dsn(PROCRASTINATE_DB)) as conn:
        # One lock per job: procrastinate's equivalent of "one in flight per customer".
        conn.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, args) "
            "SELECT 'default', 'provision', 'user-' || i, jsonb_build_object('i', i) "
            "FROM generate_series(1, %s::int) i",
            (n,),
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE procrastinate_jobs")


# ---------------------------------------------------------------------------------------------
# the stale sweep


def stale_find_service(limit: int = 1000) -> float:
    from django.utils import timezone

    from provisioning import selectors

    def one(_: int) -> None:
        ids = selectors.job_ids_stale(now=timezone.now(), limit=limit)
        assert len(ids) == min(limit, S_N), len(ids)

    one(0)
    return common.median([common.per_op(one, 5) for _ in range(3)])


def stale_find_raw(conn: psycopg.Connection, limit: int = 1000) -> float:
    conn.autocommit = True
    query = (
        "SELECT id FROM provisioning_provisioningjob WHERE status = 'provisioning' AND ("
        "COALESCE(last_heartbeat_at, claimed_at, updated_at) < now() - %s * interval '1 second' "
        "OR claimed_at < now() - %s * interval '1 second') LIMIT %s"
    )
    from django.conf import settings

    args = (settings.JOB_TIMEOUT_SECONDS, settings.JOB_DEADLINE_SECONDS, limit)

    def one(_: int) -> None:
        rows = conn.execute(query, args).fetchall()
        assert len(rows) == min(limit, S_N)

    try:
        one(0)
        return common.median([common.per_op(one, 5) for _ in range(3)])
    finally:
        conn.autocommit = False


def stale_plan() -> str:
    from django.utils import timezone

    from provisioning import selectors

    qs = selectors.job_list_stale(now=timezone.now()).values_list("pk", flat=True)[:1000]
    return qs.explain(analyze=True, buffers=True)


def timeout_raw(conn: psycopg.Connection) -> tuple[float, int]:
    """The same per-job work as the sweep (lock, fail-path UPDATE, event, commit), raw psycopg."""
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM provisioning_provisioningjob WHERE status = 'provisioning' AND "
            "COALESCE(last_heartbeat_at, claimed_at, updated_at) < now() - interval '15 minutes'"
        ).fetchall()
    ]
    conn.commit()
    t0 = time.perf_counter()
    done = 0
    for job_id in ids:
        with conn.transaction():
            row = conn.execute(
                "SELECT status, retry_count, max_retries, attempt, COALESCE(last_heartbeat_at, "
                "claimed_at, updated_at) < now() - interval '15 minutes' FROM "
                "provisioning_provisioningjob WHERE id = %s FOR UPDATE",
                (job_id,),
            ).fetchone()
            if row is None or row[0] != "provisioning" or not row[4]:
                continue
            conn.execute(
                "UPDATE provisioning_provisioningjob SET status = 'queued', retry_count = "
                "retry_count + 1, attempt = attempt + 1, next_attempt_at = now() + interval "
                "'30 seconds', dispatched_at = NULL, step = '', progress = NULL, error = %s, "
                "failed_step = 'timeout', updated_at = now() WHERE id = %s",
                ("No heartbeat (raw ceiling)", job_id),
            )
            conn.execute(
                "INSERT INTO provisioning_jobevent (created_at, actor, action, from_status, "
                "to_status, attempt, workflow_run_id, step, reason, job_id) VALUES (now(), "
                "'system', 'timeout', 'provisioning', 'queued', %s, NULL, 'timeout', %s, %s)",
                (row[3], "No heartbeat (raw ceiling)", job_id),
            )
            done += 1
    conn.commit()
    return time.perf_counter() - t0, done


def reset_stale(conn: psycopg.Connection) -> None:
    _sql(
        conn,
        "UPDATE provisioning_provisioningjob SET status = 'provisioning', retry_count = 0, "
        "attempt = 1, next_attempt_at = NULL, dispatched_at = NULL, step = 'configure', "
        "progress = 60, error = '', failed_step = '', updated_at = now() - interval '2 hours' "
        "WHERE id IN (SELECT md5('job-' || i)::uuid FROM generate_series(%s::int, %s::int) i)",
        (S_LO, S_LO + S_N - 1),
    )
    _sql(conn, "DELETE FROM provisioning_jobevent WHERE action = 'timeout'")
    conn.commit()


def timeout_service() -> tuple[float, int]:
    from provisioning import backends, services

    backends.set_backend(common.NoopBackend())  # the sweep cancels runs after commit
    t0 = time.perf_counter()
    done = services.job_timeout_stale(limit=50_000)
    return time.perf_counter() - t0, done


# ---------------------------------------------------------------------------------------------
# profiles (where the time goes when a ratio is far below its ceiling)


def profile(fn: Callable[[], Any], top: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    # Keep the header line with totals and the table.
    keep = [ln for ln in lines if "function calls" in ln or "ncalls" in ln or ln[:1] == " "]
    return "\n".join(keep)


# ---------------------------------------------------------------------------------------------
# the whole run


@dataclass
class CoreResults:
    rows: list[Row]
    notes: list[str]
    profiles: dict[str, str]


def run(
    *,
    small: int = 10_000,
    big: int = 1_000_000,
    ops: int = 500,
    dispatch_jobs: int = 2000,
    do_profile: bool = True,
    log: Callable[[str], None] = print,
) -> CoreResults:
    rows: list[Row] = []
    notes: list[str] = []
    profiles: dict[str, str] = {}
    common.recreate_db(DB)
    common.setup_django(DB)
    conn = psycopg.connect(common.dsn(DB))
    t = time.perf_counter()
    gen_users(conn)
    gen_jobs(conn, 1, small - F_N, "A")
    gen_jobs(conn, F_LO, F_LO + F_N - 1, "F")
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE")
    conn.autocommit = False
    log(f"  {job_count(conn):,} jobs generated in {time.perf_counter() - t:.1f}s")
    pool = AgentPool()
    fresh = f_jobs(conn)

    def measure_growth_set(stage: str) -> dict[str, float]:
        out: dict[str, list[float]] = {"enq": [], "enq_raw": [], "hb": [], "hb_raw": [], "read": []}
        for _ in range(3):  # interleaved, medians: the machine is noisy
            out["enq"].append(enqueue_service(pool, conn, ops))
            out["enq_raw"].append(enqueue_raw(pool, conn, ops))
            out["hb"].append(heartbeat_service(fresh, ops * 2))
            out["hb_raw"].append(heartbeat_raw(conn, fresh, ops * 2))
            out["read"].append(status_read_service(fresh, ops))
        res = {k: common.median(v) for k, v in out.items()}
        log(f"  {stage}: " + ", ".join(f"{k} {v * 1000:.3f} ms" for k, v in res.items()))
        return res

    at_small = measure_growth_set(f"{job_count(conn):,} rows")
    rows.append(
        Row(
            "enqueue (services.job_enqueue, in process)",
            1 / at_small["enq"],
            "ops/s",
            "raw INSERT job+event, COMMIT (psycopg)",
            1 / at_small["enq_raw"],
        )
    )
    rows.append(
        Row(
            "heartbeat (services.job_heartbeat, in process)",
            1 / at_small["hb"],
            "ops/s",
            "raw fenced UPDATE, autocommit (psycopg)",
            1 / at_small["hb_raw"],
        )
    )

    # -- dispatch race ----------------------------------------------------------------------
    log(f"  dispatch race: {dispatch_jobs} due jobs, 4 processes each")
    # The jobs the enqueue rows made are not part of the race: finish them first.
    _sql(conn, "UPDATE provisioning_provisioningjob SET status = 'running' WHERE status = 'queued'")
    gen_jobs(conn, D_LO, D_LO + dispatch_jobs - 1, "D")
    conn.commit()
    analyze(conn)  # as autovacuum would after this many new rows

    # -- the due query: none dispatched, then U_N dispatched and unclaimed, paid before them ---
    due_alone = due_query(ops)
    gen_jobs(conn, U_LO, U_LO + U_N - 1, "U")
    analyze(conn)
    due_behind = due_query(ops)
    if do_profile:
        profiles[f"due query (300 calls, {U_N:,} dispatched-unclaimed)"] = profile(
            lambda: due_query(100)
        )
    notes.append(
        f"due query with {U_N:,} dispatched-unclaimed jobs paid before every due one "
        "(EXPLAIN ANALYZE, BUFFERS):\n```\n" + due_plan() + "\n```"
    )
    log(
        f"  due query: {due_alone * 1000:.3f} ms with none dispatched, "
        f"{due_behind * 1000:.3f} ms with {U_N:,} dispatched-unclaimed"
    )
    rows.append(
        Row(
            f"dispatch's due query with {U_N:,} dispatched-unclaimed jobs",
            due_behind * 1000,
            "ms",
            "same with none dispatched",
            due_alone * 1000,
            higher_is_better=False,
            ratio_override=f"{due_behind / due_alone:.2f} (growth)",
        )
    )
    delete_set(conn, U_LO, U_LO + U_N - 1)  # they would fill every slot of the race below
    analyze(conn)

    service = race(_service_dispatcher)
    _sql(
        conn,
        "UPDATE provisioning_provisioningjob SET dispatched_at = NULL, workflow_run_id = NULL "
        "WHERE status = 'queued' AND id IN (SELECT md5('job-' || i)::uuid FROM "
        "generate_series(%s::int, %s::int) i)",
        (D_LO, D_LO + dispatch_jobs - 1),
    )
    conn.commit()
    raw = race(_raw_dispatcher)
    prepare_procrastinate(dispatch_jobs)
    proc = race(_procrastinate_dispatcher)
    events = conn.execute(
        "SELECT count(*), count(DISTINCT job_id) FROM provisioning_jobevent WHERE action = 'dispatch'"
    ).fetchone()
    conn.commit()
    assert events is not None
    log(
        f"  service {service.jobs_per_s:.0f}/s taken {service.taken} doubled {service.doubled} "
        f"{service.per_worker}; raw {raw.jobs_per_s:.0f}/s taken {raw.taken} doubled {raw.doubled}; "
        f"procrastinate {proc.jobs_per_s:.0f}/s taken {proc.taken} doubled {proc.doubled}"
    )
    rows.append(
        Row(
            f"dispatch-next x4 procs ({service.taken} taken, {service.doubled} twice)",
            service.jobs_per_s,
            "jobs/s",
            f"plain SKIP LOCKED+UPDATE x4 ({raw.doubled} twice)",
            raw.jobs_per_s,
        )
    )
    rows.append(
        Row(
            "dispatch-next x4 procs",
            service.jobs_per_s,
            "jobs/s",
            f"procrastinate fetch_job x4 ({proc.doubled} twice)",
            proc.jobs_per_s,
        )
    )
    notes.append(
        f"dispatch: {dispatch_jobs} due jobs (one per customer); service dispatch events "
        f"{events[0]} for {events[1]} jobs; jobs per dispatcher {service.per_worker}; "
        f"taken twice: service {service.doubled}, raw {raw.doubled}, procrastinate {proc.doubled}"
    )
    if do_profile:
        _sql(
            conn,
            "UPDATE provisioning_provisioningjob SET dispatched_at = NULL, workflow_run_id = NULL "
            "WHERE status = 'queued' AND id IN (SELECT md5('job-' || i)::uuid FROM "
            "generate_series(%s::int, %s::int) i)",
            (D_LO, D_LO + dispatch_jobs - 1),
        )
        conn.commit()
        from provisioning import services

        backend = common.NoopBackend()
        profiles["dispatch-next (1 process, 300 jobs)"] = profile(
            lambda: [services.job_dispatch_next(backend=backend) for _ in range(300)]
        )
        profiles["enqueue (300 calls)"] = profile(lambda: enqueue_service(pool, conn, 300))
    delete_set(conn, D_LO, D_LO + dispatch_jobs - 1)

    # -- grow to 1M ---------------------------------------------------------------------------
    t = time.perf_counter()
    have = job_count(conn)
    gen_jobs(conn, S_LO, S_LO + S_N - 1, "S")
    gen_jobs(conn, Q_LO, Q_LO + Q_N - 1, "Q")
    conn.commit()
    step = 100_000
    lo = small - F_N + 1
    target_hi = lo + (big - have - S_N - Q_N) - 1
    while lo <= target_hi:
        hi = min(lo + step - 1, target_hi)
        gen_jobs(conn, lo, hi, "A")
        conn.commit()
        lo = hi + 1
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE")
    conn.autocommit = False
    big_count = job_count(conn)
    log(f"  grown to {big_count:,} jobs in {time.perf_counter() - t:.1f}s")
    fresh = f_jobs(conn)
    at_big = measure_growth_set(f"{big_count:,} rows")
    for key, label in (
        ("enq", "enqueue"),
        ("hb", "heartbeat"),
        ("read", "status read (latest job + timeout check)"),
    ):
        rows.append(
            Row(
                f"{label} at {big_count / 1e6:.1f}M rows",
                at_big[key] * 1000,
                "ms",
                f"same at {have / 1000:.0f}k rows",
                at_small[key] * 1000,
                higher_is_better=False,
                ratio_override=f"{at_big[key] / at_small[key]:.2f} (growth)",
            )
        )

    # -- stale sweep -----------------------------------------------------------------------------
    find = stale_find_service()
    find_raw = stale_find_raw(conn)
    rows.append(
        Row(
            f"stale find (job_ids_stale, 1000 of {S_N:,}) at {big_count / 1e6:.1f}M",
            find * 1000,
            "ms",
            "same SQL, raw psycopg",
            find_raw * 1000,
            higher_is_better=False,
        )
    )
    plan = stale_plan()
    notes.append("stale find plan (EXPLAIN ANALYZE, BUFFERS):\n```\n" + plan + "\n```")
    raw_s, raw_n = timeout_raw(conn)
    reset_stale(conn)
    svc_s, svc_n = timeout_service()
    log(f"  timeout: service {svc_n} in {svc_s:.1f}s, raw {raw_n} in {raw_s:.1f}s")
    rows.append(
        Row(
            f"time out {svc_n:,} stale jobs (job_timeout_stale)",
            svc_s,
            "s",
            f"raw per-job lock+UPDATE+event ({raw_n:,})",
            raw_s,
            higher_is_better=False,
        )
    )
    if do_profile:
        reset_stale(conn)
        from provisioning import services

        profiles["job_timeout_stale (1000 jobs)"] = profile(
            lambda: services.job_timeout_stale(limit=1000)
        )
    conn.close()
    return CoreResults(rows=rows, notes=notes, profiles=profiles)
