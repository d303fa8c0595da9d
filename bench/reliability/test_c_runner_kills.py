"""Runs killed at a random step -> every job ends running or failed with a reason, within its
retries, none finalised twice, one VM per running agent, none left for failed ones."""

from __future__ import annotations

import time
from collections import Counter

import httpx

from bench.reliability import checks
from bench.reliability.conftest import chaos, figure, knob, wait_for


def test_runs_killed_at_random_steps(stack, make_users, hetzner):
    n = knob("RELIABILITY_KILL_RUNS", 100)
    users = make_users("kill", n)
    ids = [u.pk for u in users]
    wave = knob("RELIABILITY_KILL_WAVE", 50)  # orders in flight at once: runners share 2 cores
    redeliveries = 0
    t0 = time.monotonic()
    with chaos(stack) as chaos_dir, httpx.Client(timeout=60) as client:
        for start in range(0, n, wave):
            batch = users[start : start + wave]
            for i, user in enumerate(batch, start):
                body = checks.encode(checks.checkout_event(user, f"kill {i}"))
                for _ in range(20):  # as Stripe would: redeliver until acknowledged
                    try:
                        r = client.post(
                            stack.webhook_url,
                            content=body,
                            headers={
                                "Content-Type": "application/json",
                                "Stripe-Signature": checks.sign(body),
                            },
                        )
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    redeliveries += 1
                    time.sleep(1)
            batch_ids = [u.pk for u in batch]

            def all_final(batch_ids: list[int] = batch_ids) -> bool:
                jobs = checks.jobs_of_users(stack.db_url, batch_ids)
                return len(jobs) == len(batch_ids) and all(
                    j["status"] in checks.FINAL for j in jobs
                )

            wait_for(
                f"wave {start // wave + 1} of chaotic jobs", all_final, timeout=420, interval=1
            )
    took = time.monotonic() - t0
    jobs = checks.jobs_of_users(stack.db_url, ids)
    failed = [str(j["id"]) for j in jobs if j["status"] == "failed"]

    def vms_of(job_id: str) -> list[dict]:
        return [s for s in hetzner.servers if s["labels"].get("job-id") == job_id]

    # Cleanup runs for failed jobs are sent by the worker; give them time to delete.
    wait_for(
        "cleanup of failed jobs' VMs",
        lambda: all(not vms_of(f) for f in failed),
        timeout=120,
        interval=1,
    )
    events = checks.events_of_jobs(stack.db_url, [j["id"] for j in jobs])
    result = checks.audit(jobs, events)
    wrong_vms = []
    for j in jobs:
        vms = vms_of(str(j["id"]))
        if j["status"] == "running" and (len(vms) != 1 or str(vms[0]["id"]) != str(j["server_id"])):
            wrong_vms.append((str(j["id"]), j["server_id"], [v["id"] for v in vms]))
        if j["status"] == "failed" and vms:
            wrong_vms.append((str(j["id"]), "failed", [v["id"] for v in vms]))
    decisions = (chaos_dir / "decisions.log").read_text().splitlines()
    ours = {str(j["id"]) for j in jobs}
    mine = [d.split() for d in decisions if d.split()[0] in ours]
    kills = Counter(d[3] for d in mine if d[3] != "-")
    figure(
        f"[kills] {n} jobs, {len(mine)} provision runs, {sum(kills.values())} killed "
        f"{dict(kills)}; after {took:.0f}s: {result.summary()}; failed with reasons "
        f"{Counter(j['failed_step'] for j in jobs if j['status'] == 'failed')}; "
        f"VM mismatches {len(wrong_vms)}; completed twice {len(result.completed_twice)}; "
        f"webhook redeliveries {redeliveries}"
    )
    assert len(mine) >= n
    assert not result.problems, result.problems
    assert not wrong_vms, wrong_vms[:5]
