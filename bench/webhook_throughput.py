"""Webhook throughput: signed Stripe events/s through gunicorn + dj-stripe + our fulfilment, vs a
bare Django view doing the same inserts (agent + job + job event), in one run on PostgreSQL.

    .venv/bin/python bench/webhook_throughput.py [--events 400] [--threads 8] [--workers 4]
        [--database-url postgres://postgres@127.0.0.1:5432/billing_bench]

The database named in the URL is dropped and recreated. Every event is a new paid checkout
(a new agent and job each); the counts are checked in the database afterwards.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (bench/run.py does): `bench` is importable
    sys.path.insert(0, str(ROOT))
PY = sys.executable
SECRET = "whsec_benchOnlyNotSecret"
UUID = "00000000-0000-4000-8000-00000000be4c"
KEY = "sk_test_benchOnlyNotAStripeKey000000000000"


def _env(database_url: str) -> dict[str, str]:
    from bench.common import LOOPBACK_DEPLOYMENT_ENV

    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "bench.webhook.settings",
        "DJANGO_SECRET_KEY": "bench-only-not-secret",
        "DJANGO_DEBUG": "0",
        **LOOPBACK_DEPLOYMENT_ENV,
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DATABASE_URL": database_url,
        "STRIPE_SECRET_KEY": KEY,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_WEBHOOK_UUID": UUID,
        "PROVISIONING_RUNNER": "local",
    }


def _recreate_database(database_url: str) -> None:
    import psycopg

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _manage(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [PY, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout


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


def _blast(url: str, bodies: list[tuple[bytes, dict[str, str]]], threads: int) -> float:
    """POST every body from `threads` threads (one keep-alive client each); events/s."""
    chunks = [bodies[i::threads] for i in range(threads)]
    failures: list[str] = []
    barrier = threading.Barrier(threads + 1)

    def run(chunk: list[tuple[bytes, dict[str, str]]]) -> None:
        with httpx.Client(timeout=60.0) as client:
            barrier.wait()
            for body, headers in chunk:
                r = client.post(url, content=body, headers=headers)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:100]}")

    workers = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} failed deliveries, e.g. {failures[:3]}")
    return len(bodies) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn worker processes")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/"
            + os.environ.get("BENCH_DB_PREFIX", "")
            + "billing_bench",
        ),
    )
    args = parser.parse_args()
    env = _env(args.database_url)
    _recreate_database(args.database_url)
    _manage(env, "migrate", "--run-syncdb", "--no-input", "-v", "0")
    _manage(env, "setup_stripe_webhook")
    user_pk = (
        _manage(
            env,
            "shell",
            "-c",
            "from django.contrib.auth.models import User;"
            "print(User.objects.create_user('bench', 'bench@example.com', 'x').pk)",
        )
        .strip()
        .splitlines()[-1]
    )

    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.contrib.auth.models import User

    from billing import sample_events
    from provisioning.models import Agent, ProvisioningJob

    user = User.objects.get(pk=user_pk)

    def bodies(n: int, *, signed: bool) -> list[tuple[bytes, dict[str, str]]]:
        out = []
        for i in range(n):
            event = sample_events.build_checkout_event(
                "checkout.session.completed", user=user, agent_name=f"bench-{i}", region="us-east"
            )
            body = sample_events.encode(event)
            headers = {"Content-Type": "application/json"}
            if signed:
                headers["Stripe-Signature"] = sample_events.sign(body, SECRET)
            out.append((body, headers))
        return out

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
    try:
        _wait(f"{base}/healthz")
        webhook = f"{base}/stripe/webhook/{UUID}/"
        bare = f"{base}/bench/bare-webhook/"
        _blast(webhook, bodies(args.threads * 2, signed=True), args.threads)  # warm up
        _blast(bare, bodies(args.threads * 2, signed=False), args.threads)
        results = {}
        for name, url, signed in (("dj-stripe webhook", webhook, True), ("bare view", bare, False)):
            batch = bodies(args.events, signed=signed)
            before = ProvisioningJob.objects.count()
            results[name] = _blast(url, batch, args.threads)
            assert ProvisioningJob.objects.count() - before == args.events
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(
        f"PostgreSQL, gunicorn {args.workers} sync workers, {args.threads} client threads, "
        f"{args.events} new paid checkouts each (agents now {Agent.objects.count()})"
    )
    for name, rate in results.items():
        print(f"  {name:18s} {rate:8.1f} events/s")
    ratio = results["bare view"] / results["dj-stripe webhook"]
    print(f"  the bare view is {ratio:.1f}x the signed webhook")


if __name__ == "__main__":
    main()
