"""The launch simulation's figures, computed from what the database and the fakes recorded.

Times are wall-clock epoch seconds (floats); the table converts durations to simulated time by
multiplying with the time factor.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row


@dataclass
class JobTimes:
    id: str
    user_id: int
    agent_id: str
    status: str
    created: float
    retry_count: int
    dispatched: list[float] = field(default_factory=list)
    claims: list[tuple[int, float]] = field(default_factory=list)  # (attempt, at)
    completes: list[tuple[int, float]] = field(default_factory=list)
    fails: list[tuple[int, float]] = field(default_factory=list)
    running: float | None = None

    @property
    def first_dispatch(self) -> float | None:
        return min(self.dispatched) if self.dispatched else None


def load_jobs(url: str, user_ids: Sequence[int]) -> list[JobTimes]:
    """Every job of these users, with the times of its dispatches, claims, completes and of
    becoming running (from JobEvents)."""
    conninfo = url.replace("postgres://", "postgresql://", 1)
    with psycopg.connect(conninfo, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT id, user_id, agent_id, status, retry_count, "
            "extract(epoch from created_at) AS created FROM provisioning_provisioningjob "
            "WHERE user_id = ANY(%s) AND kind = 'provision'",
            (list(user_ids),),
        ).fetchall()
        jobs = {
            str(r["id"]): JobTimes(
                id=str(r["id"]),
                user_id=int(r["user_id"]),
                agent_id=str(r["agent_id"]),
                status=str(r["status"]),
                created=float(r["created"]),
                retry_count=int(r["retry_count"]),
            )
            for r in rows
        }
        events = conn.execute(
            "SELECT job_id, action, to_status, attempt, extract(epoch from created_at) AS at "
            "FROM provisioning_jobevent WHERE job_id = ANY(%s) "
            "AND action IN ('dispatch', 'claim', 'complete', 'fail') ORDER BY created_at, id",
            ([r["id"] for r in rows],),
        ).fetchall()
    for e in events:
        job = jobs[str(e["job_id"])]
        at = float(e["at"])
        if e["action"] == "dispatch":
            job.dispatched.append(at)
        elif e["action"] == "claim":
            job.claims.append((int(e["attempt"]), at))
        elif e["action"] == "fail":
            job.fails.append((int(e["attempt"]), at))
        else:
            job.completes.append((int(e["attempt"]), at))
            if e["to_status"] == "running" and job.running is None:
                job.running = at
    return list(jobs.values())


def build_seconds(jobs: Iterable[JobTimes]) -> list[float]:
    """claim -> complete of every attempt that completed (wall seconds)."""
    out = []
    for job in jobs:
        claims = dict(job.claims)
        for attempt, done in job.completes:
            if attempt in claims:
                out.append(done - claims[attempt])
    return out


def run_seconds(runs: Iterable[Any]) -> list[float]:
    """A runner's time per build: each successful provision run's start (a runner took it) to
    its end, as the fake GitHub recorded them (monotonic seconds)."""
    return [
        r.completed_mono - r.started_mono
        for r in runs
        if r.mode == "provision"
        and r.conclusion == "success"
        and r.started_mono
        and r.completed_mono
    ]


def handoff_seconds(runs: Iterable[Any]) -> list[float]:
    """For each run that ended while more runs were still to be dispatched: the time from its
    end to the next dispatch GitHub received (monotonic seconds). With every slot busy and jobs
    waiting, that is how long a freed runner stays without work, less GitHub's own start."""
    ends = sorted(r.completed_mono for r in runs if r.completed_mono)
    sent = sorted(r.dispatched_mono for r in runs)
    out = []
    for end in ends:
        i = bisect.bisect_left(sent, end)
        if i == len(sent):
            break
        out.append(sent[i] - end)
    return out


def attempt_seconds(jobs: Iterable[JobTimes]) -> list[float]:
    """claim -> complete or fail of every attempt that ended (wall seconds)."""
    out = []
    for job in jobs:
        ends = dict(job.completes)
        ends.update(job.fails)
        for attempt, claimed in job.claims:
            if attempt in ends:
                out.append(ends[attempt] - claimed)
    return out


def inversions(jobs: Iterable[JobTimes]) -> int:
    """Pairs of one customer's orders where the later-paid one became running before the
    earlier one was dispatched (or without the earlier one ever being dispatched)."""
    by_user: dict[int, list[JobTimes]] = defaultdict(list)
    for job in jobs:
        by_user[job.user_id].append(job)
    count = 0
    for orders in by_user.values():
        orders.sort(key=lambda j: j.created)
        for i, earlier in enumerate(orders):
            for later in orders[i + 1 :]:
                if later.running is None:
                    continue
                first = earlier.first_dispatch
                if first is None or later.running < first:
                    count += 1
    return count


def eta_errors(
    predictions: dict[str, tuple[float, float]], jobs: Iterable[JobTimes]
) -> list[float]:
    """|predicted - actual| / actual per job, both measured from the moment its payment was
    answered. `predictions`: agent id -> (paid at, estimated_ready_at), wall epoch seconds."""
    out = []
    for job in jobs:
        if job.agent_id not in predictions or job.running is None:
            continue
        paid, eta = predictions[job.agent_id]
        actual = job.running - paid
        if actual <= 0:
            continue
        out.append(abs((eta - paid) - actual) / actual)
    return out


def busiest_window(times: Sequence[float], window: float) -> int:
    """The most events in any `window` seconds (sorted or not)."""
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


def arrival_floor(paid: Sequence[tuple[int, float]], capacity: int, build: float) -> float:
    """The earliest moment every order could be running, given when each was paid (epoch
    seconds): the orders paid from the k-th on need ceil((N - k + 1) / C) builds after it, and
    one customer's orders are built one after another."""
    times = sorted(t for _, t in paid)
    n = len(times)
    bound = max(
        (t + math.ceil((n - k) / capacity) * build for k, t in enumerate(times)), default=0.0
    )
    chains: dict[int, float] = {}
    for customer, t in sorted(paid, key=lambda p: p[1]):
        chains[customer] = max(chains.get(customer, 0.0), t) + build
    return max(bound, max(chains.values(), default=0.0))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def floor_seconds(n: int, capacity: int, build: float) -> float:
    return math.ceil(n / capacity) * build


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)
