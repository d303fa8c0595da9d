"""Heartbeat throughput: `POST /api/v1/jobs/<id>/heartbeat` (OIDC token verified, DRF, serializer,
fenced UPDATE) vs a bare Django view running the same UPDATE, same gunicorn, same run, PostgreSQL.

    .venv/bin/python bench/heartbeat_throughput.py [--requests 3000] [--threads 8] [--workers 4]
        [--rounds 3] [--database-url postgres://postgres@127.0.0.1:5432/heartbeat_bench]

The database named in the URL is dropped and recreated. One provisioning job per client thread
(each its own customer, as in production: a run heartbeats its own job). Tokens come from the dev
OIDC issuer (provisioning/localdev/oidc_issuer.py) running in this process; the server fetches its
JWKS once per worker. Tokens are minted before timing (one per thread: heartbeats do not spend a
jti, and verifying a reused token costs the same as a fresh one; they are minted to outlive the
run).  The two endpoints are measured
in alternating rounds; each figure is the median round. Afterwards the database is checked: every
job still provisioning, its heartbeat refreshed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _env(database_url: str, issuer_url: str) -> dict[str, str]:
    from bench.common import LOOPBACK_DEPLOYMENT_ENV

    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "bench.heartbeat.settings",
        "DJANGO_SECRET_KEY": "bench-only-not-secret",
        "DJANGO_DEBUG": "0",
        **LOOPBACK_DEPLOYMENT_ENV,
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DATABASE_URL": database_url,
        "PROVISIONING_RUNNER": "local",
        "PROVISIONING_OIDC_ISSUER": issuer_url,
        "PROVISIONING_OIDC_JWKS_URL": f"{issuer_url}/.well-known/jwks",
        "PROVISIONING_OIDC_AUDIENCE": "agent-provisioning",
        "GITHUB_REPOSITORY": "example/agent-provisioning",
        "GITHUB_REPOSITORY_ID": "100000001",
        "GITHUB_WORKFLOW_FILE": "provision.yml",
        "GITHUB_REF": "main",
    }


def _recreate_database(database_url: str) -> None:
    import psycopg

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"server did not come up at {url}")


def _blast(targets: list[tuple[str, dict[str, str]]], per_thread: int) -> float:
    """Each thread POSTs `per_thread` heartbeats to its own (url, headers); requests/s overall."""
    failures: list[str] = []
    barrier = threading.Barrier(len(targets) + 1)

    def run(url: str, headers: dict[str, str]) -> None:
        with httpx.Client(timeout=60.0) as client:
            barrier.wait()
            for i in range(per_thread):
                r = client.post(url, json={"progress": i % 101}, headers=headers)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:120]}")

    threads = [threading.Thread(target=run, args=t) for t in targets]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} failed heartbeats, e.g. {failures[:3]}")
    return len(targets) * per_thread / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per endpoint per round")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn worker processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/"
            + os.environ.get("BENCH_DB_PREFIX", "")
            + "heartbeat_bench",
        ),
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from provisioning.localdev.oidc_issuer import DevOidcIssuer

    issuer = DevOidcIssuer(repository="example/agent-provisioning", repository_id="100000001")
    issuer.start()
    env = _env(args.database_url, issuer.issuer)
    _recreate_database(args.database_url)
    subprocess.run(
        [PY, "manage.py", "migrate", "--run-syncdb", "--no-input", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
    )

    os.environ.update(env)
    import django

    django.setup()
    from bench.common import NoopBackend
    from provisioning import services
    from provisioning.models import JobStatus, ProvisioningJob
    from provisioning.services import Run
    from tests.factories import AgentFactory

    backend = NoopBackend()
    jobs: list[tuple[str, str]] = []  # (job id, run id)
    for _ in range(args.threads):
        job = services.job_enqueue(agent=AgentFactory())
        taken = services.job_dispatch_next(backend=backend)
        assert taken is not None and taken.pk == job.pk
        run = Run(run_id=str(taken.workflow_run_id))
        services.job_claim(job_id=job.pk, attempt=1, run=run)
        jobs.append((str(job.pk), run.run_id))

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            PY, "-m", "gunicorn", "config.wsgi:application",
            "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
            "--log-level", "warning", "--keep-alive", "30",
        ],
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    api = [
        (
            f"{base}/api/v1/jobs/{jid}/heartbeat",
            {"Authorization": f"Bearer {issuer.mint(run_id=rid, exp=int(time.time()) + 3600)}"},
        )
        for jid, rid in jobs
    ]
    bare = [
        (f"{base}/bench/bare-heartbeat/{jid}", {"X-Run-Id": rid, "X-Run-Attempt": "1"})
        for jid, rid in jobs
    ]
    per_thread = max(args.requests // args.threads, 1)
    results: dict[str, list[float]] = {"api": [], "bare": []}
    try:
        _wait(f"{base}/healthz")
        # Warm up: every worker imports, connects, fetches the JWKS.
        print(f"warm-up: api {_blast(api, 50):.0f} req/s, bare {_blast(bare, 50):.0f} req/s")
        for n in range(args.rounds):
            results["api"].append(round(_blast(api, per_thread), 1))
            results["bare"].append(round(_blast(bare, per_thread), 1))
            print(f"round {n + 1}: api {results['api'][-1]}, bare {results['bare'][-1]} req/s")
    finally:
        server.terminate()
        server.wait(timeout=30)
        issuer.stop()

    rows = ProvisioningJob.objects.filter(pk__in=[j for j, _ in jobs])
    assert rows.filter(status=JobStatus.PROVISIONING).count() == len(jobs)
    api_rate, bare_rate = statistics.median(results["api"]), statistics.median(results["bare"])
    print(
        f"PostgreSQL, gunicorn {args.workers} sync workers, {args.threads} client threads "
        f"(httpx, keep-alive), {per_thread * args.threads} heartbeats per endpoint per round, "
        f"{args.rounds} alternating rounds, median round; {os.cpu_count()} CPUs shared by "
        "client, server and database"
    )
    print(f"  heartbeat API (OIDC + DRF) {api_rate:8.1f} req/s   rounds {results['api']}")
    print(f"  bare Django view           {bare_rate:8.1f} req/s   rounds {results['bare']}")
    print(f"  API / bare = {api_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
