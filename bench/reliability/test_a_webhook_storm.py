"""100 concurrent deliveries of one signed checkout event -> 1 agent, 1 job."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

from bench.reliability import checks
from bench.reliability.conftest import figure, knob, wait_for


def test_concurrent_deliveries_of_one_event_make_one_agent_one_job(stack, make_users):
    n = knob("RELIABILITY_STORM", 100)
    (user,) = make_users("storm", 1)
    event = checks.checkout_event(user, "storm agent")
    body = checks.encode(event)
    header = checks.sign(body)
    statuses: list[int | str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def deliver() -> None:
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
    threads = [threading.Thread(target=deliver) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    took = time.monotonic() - t0
    jobs = checks.jobs_of_users(stack.db_url, [user.pk])
    agents = {j["agent_id"] for j in jobs}
    by_status = Counter(statuses)
    figure(
        f"[storm] {n} concurrent deliveries of {event['id']} in {took:.1f}s: responses "
        f"{dict(by_status)}; agents {len(agents)}, jobs {len(jobs)}"
    )
    assert len(agents) == 1 and len(jobs) == 1, (agents, jobs)
    assert len(statuses) == n
    # Every delivery is acknowledged (or refused in a way Stripe retries, never a lost order).
    assert all(isinstance(s, int) and s < 500 for s in statuses), by_status
    # …and the order goes through.
    took = wait_for(
        "the storm's job to run",
        lambda: checks.jobs_of_users(stack.db_url, [user.pk])[0]["status"] == "running",
        timeout=120,
    )
    figure(f"[storm] the one job reached running {took:.1f}s later")
