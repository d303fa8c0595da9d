"""Reading the outcome back from the database (plain psycopg, so it works on any cluster)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.reliability.stack import WEBHOOK_SECRET

FINAL = ("running", "failed")


def conninfo(url: str) -> str:
    return url.replace("postgres://", "postgresql://", 1)


def sign(body: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, indent=2).encode()


def checkout_event(user: Any, agent_name: str, region: str = "us-east") -> dict[str, Any]:
    from billing import sample_events

    return sample_events.build_checkout_event(
        "checkout.session.completed", user=user, agent_name=agent_name, region=region
    )


def jobs_of_users(url: str, user_ids: list[int]) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo(url), row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT j.id, j.status, j.attempt, j.retry_count, j.max_retries, j.error, "
            "j.failed_step, j.user_id, j.agent_id, j.cleanup_dispatched_at, j.stripe_event_id, "
            "a.server_id, a.stripe_checkout_session_id FROM provisioning_provisioningjob j "
            "JOIN provisioning_agent a ON a.id = j.agent_id WHERE j.user_id = ANY(%s)",
            (user_ids,),
        ).fetchall()


def events_of_jobs(url: str, job_ids: list[Any]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    with psycopg.connect(conninfo(url), row_factory=dict_row) as conn:
        for row in conn.execute(
            "SELECT job_id, action, from_status, to_status, attempt, created_at, workflow_run_id "
            "FROM provisioning_jobevent WHERE job_id = ANY(%s) ORDER BY created_at, id",
            (job_ids,),
        ):
            out[row["job_id"]].append(row)
    return out


@dataclass
class Audit:
    jobs: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # not final at the end
    completed_twice: list[str] = field(default_factory=list)
    finalised_twice: list[str] = field(default_factory=list)
    claimed_twice: list[str] = field(default_factory=list)  # two claims for one attempt
    enqueued_not_once: list[str] = field(default_factory=list)
    chain_breaks: list[str] = field(default_factory=list)  # a from_status that is not the state
    failed_without_reason: list[str] = field(default_factory=list)
    over_retries: list[str] = field(default_factory=list)
    transitions: int = 0
    attempts: Counter[int] = field(default_factory=Counter)

    @property
    def doubled(self) -> int:
        return len(self.completed_twice) + len(self.finalised_twice) + len(self.claimed_twice)

    @property
    def problems(self) -> dict[str, list[str]]:
        return {
            name: value
            for name, value in (
                ("lost", self.lost),
                ("completed twice", self.completed_twice),
                ("finalised twice", self.finalised_twice),
                ("claimed twice", self.claimed_twice),
                ("enqueued not once", self.enqueued_not_once),
                ("chain breaks", self.chain_breaks),
                ("failed without reason", self.failed_without_reason),
                ("over retries", self.over_retries),
            )
            if value
        }

    def summary(self) -> str:
        return (
            f"jobs {self.jobs} {dict(self.by_status)}, transitions {self.transitions}, "
            f"attempts {dict(sorted(self.attempts.items()))}, lost {len(self.lost)}, "
            f"doubled {self.doubled}, chain breaks {len(self.chain_breaks)}"
        )


def audit(jobs: list[dict[str, Any]], events: dict[Any, list[dict[str, Any]]]) -> Audit:
    """Every job final, reached by one unbroken chain of recorded transitions, none twice."""
    a = Audit(jobs=len(jobs))
    for job in jobs:
        jid = str(job["id"])
        a.by_status[job["status"]] += 1
        a.attempts[job["attempt"]] += 1
        evs = events.get(job["id"], [])
        if job["status"] not in FINAL:
            a.lost.append(f"{jid} {job['status']}")
        if job["status"] == "failed" and not (job["error"] and job["failed_step"]):
            a.failed_without_reason.append(jid)
        if job["retry_count"] > job["max_retries"]:
            a.over_retries.append(jid)
        actions = Counter(e["action"] for e in evs)
        if actions["enqueue"] != 1:
            a.enqueued_not_once.append(f"{jid} x{actions['enqueue']}")
        if actions["complete"] > 1:
            a.completed_twice.append(jid)
        finals = [e for e in evs if e["to_status"] in FINAL]
        if len(finals) > 1:  # no operator retries here: final means final
            a.finalised_twice.append(jid)
        claims = Counter(e["attempt"] for e in evs if e["action"] == "claim")
        if any(c > 1 for c in claims.values()):
            a.claimed_twice.append(f"{jid} {dict(claims)}")
        state = ""
        for e in evs:
            if not e["to_status"]:
                continue
            a.transitions += 1
            if (e["from_status"] or "") != state:
                a.chain_breaks.append(
                    f"{jid}: {e['action']} {e['from_status']}->{e['to_status']} in {state!r}"
                )
            state = e["to_status"]
        if state != job["status"]:
            a.chain_breaks.append(f"{jid}: events end in {state!r}, row says {job['status']!r}")
    return a
