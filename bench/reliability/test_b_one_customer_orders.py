"""50 concurrent paid orders of one customer -> 50 agents reach running, never two in flight."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter

import httpx
import psycopg

from bench.reliability import checks
from bench.reliability.conftest import Sampler, figure, knob, wait_for


def test_one_customers_concurrent_orders_run_one_at_a_time(stack, make_users):
    n = knob("RELIABILITY_ORDERS", 50)
    (user,) = make_users("orders", 1)
    bodies = []
    for i in range(n):
        body = checks.encode(checks.checkout_event(user, f"order {i}"))
        bodies.append((body, checks.sign(body)))

    conn = psycopg.connect(checks.conninfo(stack.db_url), autocommit=True)

    def sample() -> tuple[int, int, int]:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'provisioning'), "
            "count(*) FILTER (WHERE status = 'running'), count(*) "
            "FROM provisioning_provisioningjob WHERE user_id = %s",
            (user.pk,),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    sampler = Sampler(sample, interval=0.02)
    sampler.start()
    statuses: list[int | str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def pay(body: bytes, header: str) -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            try:
                code: int | str = client.post(
                    stack.webhook_url,
                    content=body,
                    headers={"Content-Type": "application/json", "Stripe-Signature": header},
                ).status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
        with lock:
            statuses.append(code)

    t0 = time.monotonic()
    threads = [threading.Thread(target=pay, args=b) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        wait_for(
            f"{n} jobs of one customer to run",
            lambda: bool(sampler.results) and sampler.results[-1][1] == n,
            timeout=60 + 8 * n,
        )
    finally:
        sampler.stop()
        conn.close()
    took = time.monotonic() - t0
    jobs = checks.jobs_of_users(stack.db_url, [user.pk])
    events = checks.events_of_jobs(stack.db_url, [j["id"] for j in jobs])
    result = checks.audit(jobs, events)
    # Intervals between each claim and the end of that attempt never overlap.
    spans = []
    for evs in events.values():
        start = None
        for e in evs:
            if e["action"] == "claim":
                start = e["created_at"]
            elif start is not None and e["from_status"] == "provisioning":
                spans.append((start, e["created_at"]))
                start = None
    spans.sort()
    overlaps = sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])
    max_in_flight = max(s[0] for s in sampler.results)
    figure(
        f"[orders] {n} concurrent orders of one customer: responses {dict(Counter(statuses))}; "
        f"{len({j['agent_id'] for j in jobs})} agents; {result.by_status.get('running', 0)} running "
        f"after {took:.0f}s; {len(sampler.results)} samples, max provisioning at once "
        f"{max_in_flight}; claim..end spans {len(spans)}, overlapping {overlaps}; "
        f"sampler errors {len(sampler.errors)}; {result.summary()}"
    )
    assert all(s == 200 for s in statuses), Counter(statuses)
    assert len({j["agent_id"] for j in jobs}) == n
    assert result.by_status.get("running", 0) == n
    assert max_in_flight <= 1
    assert overlaps == 0
    assert not result.problems, result.problems
