"""Launch day, simulated: `make launch` (`python -m bench.launch --help`).

The real web server (gunicorn) and two real workers (`manage.py provisioning_worker`) run on
their own PostgreSQL database (LAUNCH_DATABASE_URL, dropped and recreated) with the production
GitHub backend (PROVISIONING_RUNNER=github) pointed at a loopback fake GitHub whose runner pool
has C slots (bench/launch/fake_github.py). A run that gets a slot plays the workflow with the
runner's own code (bench/launch/player.py): real OIDC tokens from the development issuer, the
real callback API, Hetzner calls against the loopback fake Hetzner (its rate limit and a server
quota).

Time is compressed by F (--factor): every duration of the server, the runner and the fakes is
divided by F, so a simulated hour is 3600 / F wall seconds. Figures are printed in simulated
time unless they say "wall".

Workload: N paid orders (signed `checkout.session.completed` webhooks to the real endpoint)
from M customers, some with 2-5 orders, sent as fast as the server takes them; each customer's
orders in the order they paid. Right after each payment the customer reads
GET /api/v1/agents/<id>/ (a session cookie) and the simulation keeps `estimated_ready_at`.
A share of first attempts fails once at a random step; the service retries them. Before the
launch, a few earlier orders are built (--warmup) so the service has recent builds to estimate
from, as on any day but its first.

Output: one table, then the machine-readable last line (`launch: key=value ...`). The exit
status is 1 when a correctness goal is missed (not drained within --max-wall, a job not running,
a run re-sent while GitHub held it, an inversion, the service's count or GitHub's own over C runs
in flight, a budget exceeded in the busiest hour); the speed goals (drain ratio, ETA error) are printed only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.common import ROOT, recreate_db
from bench.launch import measure
from bench.launch.fake_github import FakeGitHub
from bench.launch.player import Player
from bench.reliability.stack import TIMINGS, WEBHOOK_SECRET, Stack, post_signed

GITHUB_WEBHOOK_SECRET = "launch-github-webhook-secret"

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/agent_provisioning_launch"
APP_ID = "424242"
INSTALLATION_ID = "5151515"
REGIONS = (("eu-central", 0.4), ("us-east", 0.3), ("us-west", 0.15), ("ap-southeast", 0.15))

# Production durations (simulated seconds) of the parts the fakes and the runner play.
HETZNER_ACTION_SECONDS = 40.0  # a create_server action
HETZNER_LIMIT_PER_HOUR = 3600  # the project's rate limit (the fake's bucket)
RUNNER_DEFAULTS = {  # the runner's own defaults (provisioning/runner/config.py)
    "RUNNER_HEARTBEAT_SECONDS": 60.0,
    "RUNNER_HCLOUD_POLL_SECONDS": 1.0,
    "RUNNER_RETRY_BACKOFF_SECONDS": 2.0,
    "RUNNER_CLAIM_RETRY_SECONDS": 60.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.launch", description=__doc__)
    p.add_argument("--orders", type=int, default=1000, help="paid orders (N)")
    p.add_argument("--customers", type=int, default=600, help="customers (M)")
    p.add_argument("--capacity", type=int, default=20, help="GitHub runner slots (C)")
    p.add_argument("--factor", type=float, default=40.0, help="time compression (F)")
    p.add_argument(
        "--step-seconds",
        type=float,
        default=35.0,
        help="simulated seconds of each simulated VM step (wait-ssh, configure, health-check)",
    )
    p.add_argument("--fail-share", type=float, default=0.05, help="first attempts failing once")
    p.add_argument("--server-quota", type=int, default=1100, help="the Hetzner project's limit")
    p.add_argument("--github-limit", type=int, default=5000, help="GitHub's own hourly limit")
    p.add_argument(
        "--webhook-drop",
        type=float,
        default=0.02,
        help="share of GitHub's webhook deliveries lost on the way",
    )
    p.add_argument(
        "--max-wall",
        type=float,
        default=None,
        help="give up waiting for the queue to drain after this many wall seconds "
        "(default: 230 simulated minutes)",
    )
    p.add_argument("--senders", type=int, default=8, help="webhook sender threads")
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="orders built before the launch (recent history for the ETA and the limits)",
    )
    p.add_argument("--workers", type=int, default=2, help="provisioning_worker processes")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--keep", action="store_true", help="keep the logs' directory")
    p.add_argument("--record", action="store_true", help="write the run to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.max_wall is None:
        args.max_wall = 230 * 60 / args.factor
    return args


# -- the stack ----------------------------------------------------------------------------------


@dataclass
class LaunchStack(Stack):
    """The reliability suite's stack with production durations (divided by F in
    bench/launch/server_settings.py) and the GitHub backend."""

    def env(self) -> dict[str, str]:
        env = super().env()
        for name in TIMINGS:
            env.pop(name, None)
        for name in ("RELIABILITY_CHAOS_RUNNER", "RELIABILITY_RUNNER_EXTRA_ENV"):
            env.pop(name, None)
        env["LOG_LEVEL"] = "WARNING"
        return env

    def start_workers(self) -> None:
        for n in range(self.workers):
            self._spawn(
                f"worker-{n}",
                [sys.executable, "manage.py", "provisioning_worker", "--name", f"launch-{n}"],
            )


def _counting_hetzner(**kwargs: Any) -> Any:
    from provisioning.localdev.fake_hetzner import FakeHetzner
    from provisioning.localdev.fake_hetzner.errors import ApiError

    class CountingHetzner(FakeHetzner):
        """The fake Hetzner, recording when each call came and how it was answered."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.call_log: list[tuple[float, int]] = []

        def handle(
            self, method: str, path: str, query: dict[str, list[str]], body: Any
        ) -> tuple[int, Any]:
            at = time.monotonic()
            try:
                status, payload = super().handle(method, path, query, body)
            except ApiError as err:
                with self._lock:
                    self.call_log.append((at, err.status))
                raise
            with self._lock:
                self.call_log.append((at, status))
            return status, payload

    return CountingHetzner(**kwargs)


# -- the workload -------------------------------------------------------------------------------


@dataclass
class Order:
    customer: int  # index into the users
    seq: int  # 1 for the customer's first order
    region: str
    name: str


def plan_orders(n: int, m: int, rng: random.Random) -> list[Order]:
    """N orders from M customers (every customer at least one, some 2-5), in payment order: a
    customer's orders are spread over the storm but always in their own sequence."""
    counts = [1] * m
    extra = n - m
    if extra < 0:
        raise SystemExit("--orders must be at least --customers")
    while extra:
        c = rng.randrange(m)
        if counts[c] < 5:
            counts[c] += 1
            extra -= 1
    slots = [c for c, k in enumerate(counts) for _ in range(k)]
    rng.shuffle(slots)
    seen: Counter[int] = Counter()
    regions, weights = zip(*REGIONS, strict=True)
    orders = []
    for c in slots:
        seen[c] += 1
        region = rng.choices(regions, weights)[0]
        orders.append(Order(c, seen[c], region, f"launch-{c}-{seen[c]}"))
    return orders


@dataclass
class Workload:
    stack: Stack
    users: list[Any]
    cookies: list[str]
    cookie_name: str
    orders: list[Order]
    senders: int
    # results
    statuses: Counter[str] = field(default_factory=Counter)
    predictions: dict[str, tuple[float, float]] = field(default_factory=dict)
    unread: int = 0  # payments whose agent page gave no estimated_ready_at
    first_sent: float | None = None
    last_paid: float | None = None
    errors: list[str] = field(default_factory=list)
    post_seconds: list[float] = field(default_factory=list)  # each webhook delivery, wall
    read_seconds: list[float] = field(default_factory=list)  # each agent page read, wall
    paid: list[tuple[int, float]] = field(default_factory=list)  # (customer, answered at)

    def run(self) -> None:
        lanes: list[list[Order]] = [[] for _ in range(self.senders)]
        for order in self.orders:  # one lane per customer: their orders stay in sequence
            lanes[order.customer % self.senders].append(order)
        self._lock = threading.Lock()
        self.first_sent = time.time()
        threads = [threading.Thread(target=self._lane, args=(lane,)) for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _lane(self, lane: list[Order]) -> None:
        from billing import sample_events
        from provisioning.models import Agent

        with httpx.Client(timeout=60) as client:
            for order in lane:
                user = self.users[order.customer]
                event = sample_events.build_checkout_event(
                    "checkout.session.completed",
                    user=user,
                    agent_name=order.name,
                    region=order.region,
                )
                body = sample_events.encode(event)
                sent = time.time()
                status = self._deliver(client, body)
                paid = time.time()
                with self._lock:
                    self.statuses[status] += 1
                    self.last_paid = paid
                    self.post_seconds.append(paid - sent)
                    if status == "200":
                        self.paid.append((order.customer, paid))
                if status != "200":
                    continue
                session_id = event["data"]["object"]["id"]
                agent_id = (
                    Agent.objects.filter(stripe_checkout_session_id=session_id)
                    .values_list("pk", flat=True)
                    .first()
                )
                if agent_id is not None:
                    self._read_eta(client, str(agent_id), self.cookies[order.customer], paid)
        with contextlib.suppress(Exception):
            from django.db import connection

            connection.close()

    def _deliver(self, client: httpx.Client, body: bytes) -> str:
        from billing import sample_events

        for _ in range(5):  # Stripe retries a delivery that got no answer or a 5xx
            try:
                header = sample_events.sign(body, WEBHOOK_SECRET)
                code = post_signed(client, self.stack.webhook_url, body, header).status_code
            except httpx.HTTPError as exc:
                code_text = type(exc).__name__
                time.sleep(0.5)
                continue
            if code < 500:
                return str(code)
            code_text = str(code)
            time.sleep(0.5)
        return code_text

    def _read_eta(self, client: httpx.Client, agent_id: str, cookie: str, paid: float) -> None:
        try:
            started = time.time()
            response = client.get(
                f"{self.stack.base_url}/api/v1/agents/{agent_id}/",
                headers={"Cookie": f"{self.cookie_name}={cookie}"},
            )
            data = response.json()
            with self._lock:
                self.read_seconds.append(time.time() - started)
        except (httpx.HTTPError, ValueError) as exc:
            with self._lock:
                self.errors.append(f"agent read: {exc!r}")
            return
        job = data.get("job") or {}
        eta = data.get("estimated_ready_at") or job.get("estimated_ready_at")
        with self._lock:
            if eta:
                at = datetime.fromisoformat(str(eta).replace("Z", "+00:00")).timestamp()
                self.predictions[agent_id] = (paid, at)
            else:
                self.unread += 1


def make_customers(m: int, prefix: str) -> tuple[list[Any], list[str]]:
    """M users (no password) and a logged-in session for each."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    user_model = get_user_model()
    user_model.objects.bulk_create(
        [user_model(username=f"{prefix}-{i}", email=f"{prefix}-{i}@example.com") for i in range(m)]
    )
    users = list(user_model.objects.filter(username__startswith=f"{prefix}-").order_by("pk"))
    cookies = []
    for user in users:
        session = SessionStore()
        session["_auth_user_id"] = str(user.pk)
        session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
        session["_auth_user_hash"] = user.get_session_auth_hash()
        session.create()
        cookies.append(str(session.session_key))
    return users, cookies


# -- watching -----------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every 50 ms: runs GitHub holds unfinished and runs in progress; every 10th sample also the
    service's own count of runs in flight (jobs dispatched and not claimed, provisioning, and
    runs that reported and are finishing: what its limit counts), read from PostgreSQL."""

    SERVICE_IN_FLIGHT = (
        "SELECT count(*) FILTER (WHERE status = 'queued' AND dispatched_at IS NOT NULL) "
        "+ count(*) FILTER (WHERE status = 'provisioning') "
        "+ (SELECT count(*) FROM provisioning_finishingrun) FROM provisioning_provisioningjob"
    )

    def __init__(self, github: FakeGitHub, db_url: str) -> None:
        super().__init__(daemon=True, name="sampler")
        self.github = github
        self.db_url = db_url
        self.samples = 0
        self.max_unfinished = 0
        self.max_running = 0
        self.max_service = 0
        self.over: dict[int, int] = {}  # capacity -> samples with more runs unfinished at GitHub
        self.running_series: list[tuple[float, int]] = []  # (monotonic, runs in progress)
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(
            self.db_url.replace("postgres://", "postgresql://", 1), autocommit=True
        ) as conn:
            while not self._stop_event.wait(0.05):
                self.samples += 1
                running = self.github.running()
                self.running_series.append((time.monotonic(), running))
                unfinished = self.github.unfinished()
                self.max_unfinished = max(self.max_unfinished, unfinished)
                if unfinished > self.github.slots:
                    self.over[self.github.slots] = self.over.get(self.github.slots, 0) + 1
                self.max_running = max(self.max_running, running)
                if self.samples % 10 == 0:
                    row = conn.execute(self.SERVICE_IN_FLIGHT).fetchone()
                    self.max_service = max(self.max_service, int(row[0]) if row else 0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def utilization(self, start: float, end: float, capacity: int) -> float:
        """Mean runs in progress over [start, end] (monotonic), as a share of the slots."""
        inside = [n for t, n in self.running_series if start <= t <= end]
        return sum(inside) / len(inside) / capacity if inside and capacity else math.nan


def status_counts(db_url: str) -> Counter[str]:
    import psycopg

    with psycopg.connect(db_url.replace("postgres://", "postgresql://", 1)) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM provisioning_provisioningjob "
            "WHERE kind = 'provision' GROUP BY status"
        ).fetchall()
    return Counter({str(s): int(n) for s, n in rows})


def wait_drained(db_url: str, n: int, deadline: float, t0: float, factor: float) -> bool:
    """Until every one of the N jobs is running or failed, or the deadline passes."""
    last_report = 0.0
    while time.monotonic() < deadline:
        counts = status_counts(db_url)
        done = counts["running"] + counts["failed"]
        if time.monotonic() - last_report > 20:
            last_report = time.monotonic()
            wall = time.monotonic() - t0
            print(
                f"  t={wall:5.0f}s wall ({wall * factor / 60:5.1f} sim min): "
                + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                flush=True,
            )
        if sum(counts.values()) >= n and done >= n:
            return True
        time.sleep(0.5)
    return False


# -- the run ------------------------------------------------------------------------------------


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _app_key(workdir: Path) -> tuple[Path, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = workdir / "github-app.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public.decode()


@dataclass
class Outcome:
    args: argparse.Namespace
    drained: bool
    wall_seconds: float
    jobs: list[measure.JobTimes]
    workload: Workload
    github: FakeGitHub
    hetzner: Any
    sampler: Sampler
    player: Player
    server_errors: int
    settings_seen: dict[str, Any]
    cpu_self: float  # CPU seconds of this process (fakes, runs, customers) during the run
    cpu_children: float  # of the server and the workers
    cpu_parts: dict[str, float]  # CPU seconds by part: gunicorn, each worker, PostgreSQL
    marks: dict[str, float]  # where the launch began: clocks and counters after the warm-up


def simulate(args: argparse.Namespace) -> Outcome:
    factor = args.factor
    db_url = os.environ.get("LAUNCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    recreate_db(_dbname(db_url))
    workdir = Path(tempfile.mkdtemp(prefix="launch-"))
    key_path, public_pem = _app_key(workdir)

    from provisioning.localdev.oidc_issuer import DevOidcIssuer

    hetzner = _counting_hetzner(
        action_seconds=HETZNER_ACTION_SECONDS / factor,
        server_limit=args.server_quota,
        rate_limit=HETZNER_LIMIT_PER_HOUR,
        rate_refill_seconds=3600.0 / HETZNER_LIMIT_PER_HOUR / factor,
    ).start()
    issuer = DevOidcIssuer().start()
    runner_env = {k: str(v / factor) for k, v in RUNNER_DEFAULTS.items()}
    runner_env["RUNNER_STEP_SECONDS"] = str(args.step_seconds / factor)
    runner_env["RUNNER_HTTP_TIMEOUT_SECONDS"] = "30"
    player = Player(
        api_url="",  # set below, once the stack has its port
        token_request_url=f"{issuer.base_url}/token",
        token_request_token=issuer.request_token,
        hetzner_url=hetzner.url,
        env=runner_env,
        fail_share=args.fail_share,
        seed=args.seed,
    )
    github = FakeGitHub(
        app_id=APP_ID,
        installation_id=INSTALLATION_ID,
        app_public_key_pem=public_pem,
        slots=args.capacity,
        rate_limit=args.github_limit,
        window_seconds=3600.0 / factor,
        secondary_window_seconds=60.0 / factor,
        player=player,
        webhook_secret=GITHUB_WEBHOOK_SECRET,
        webhook_drop_share=args.webhook_drop,
    ).start()
    stack = LaunchStack(
        db_url=db_url,
        hetzner_url=hetzner.url,
        issuer=issuer,
        workdir=workdir / "stack",
        chaos_dir=workdir / "chaos",
        workers=args.workers,
        extra_env={
            "DJANGO_SETTINGS_MODULE": "bench.launch.server_settings",
            "LAUNCH_TIME_FACTOR": str(factor),
            "PROVISIONING_RUNNER": "github",
            "GITHUB_API_URL": github.url,
            "GITHUB_APP_ID": APP_ID,
            "GITHUB_APP_INSTALLATION_ID": INSTALLATION_ID,
            "GITHUB_APP_PRIVATE_KEY": str(key_path),
            "PROVISIONING_MAX_IN_FLIGHT": str(args.capacity),
            "GITHUB_WEBHOOK_SECRET": GITHUB_WEBHOOK_SECRET,
            # The real budgets (the reliability stack raises them for its own cases).
            "GITHUB_API_BUDGET_PER_HOUR": "4000",
            "HETZNER_API_BUDGET_PER_HOUR": str(HETZNER_LIMIT_PER_HOUR),
        },
    )
    player.api_url = stack.base_url
    github.webhook_url = f"{stack.base_url}/github/webhook/"
    os.environ.update(stack.env())
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0, interactive=False)
    settings_seen = {
        name: getattr(settings, name)
        for name in (
            "DISPATCH_CLAIM_TIMEOUT_SECONDS",
            "JOB_TIMEOUT_SECONDS",
            "HEARTBEAT_INTERVAL_SECONDS",
            "RETRY_BACKOFF_SECONDS",
            "WORKER_INTERVAL_SECONDS",
            "RECONCILE_INTERVAL_SECONDS",
            "PROVISIONING_MAX_IN_FLIGHT",
            "GITHUB_API_BUDGET_PER_HOUR",
            "HETZNER_API_BUDGET_PER_HOUR",
            "API_BUDGET_WINDOW_SECONDS",
            "RUN_FINISH_POLL_SECONDS",
            "RUN_FINISH_GRACE_SECONDS",
        )
        if hasattr(settings, name)
    }
    rng = random.Random(args.seed)
    users, cookies = make_customers(args.customers, "launch")
    workload = Workload(
        stack=stack,
        users=users,
        cookies=cookies,
        cookie_name=settings.SESSION_COOKIE_NAME,
        orders=plan_orders(args.orders, args.customers, rng),
        senders=args.senders,
    )
    # Earlier that day: a few orders, so the service has recent builds to go by (the ETA's build
    # time, the Hetzner calls per build) as it would on any day but its first.
    early_users, early_cookies = make_customers(args.warmup, "earlier")
    warmup = Workload(
        stack=stack,
        users=early_users,
        cookies=early_cookies,
        cookie_name=settings.SESSION_COOKIE_NAME,
        orders=plan_orders(args.warmup, args.warmup, rng),
        senders=args.senders,
    )
    sampler = Sampler(github, db_url)
    runner_log = (workdir / "runners.log").open("a")
    real_stderr = sys.stderr
    stack.start()
    print(
        f"launch day simulated: N={args.orders} orders from M={args.customers} customers, C={args.capacity}, "
        f"F={factor:g} (1 simulated hour = {3600 / factor:.0f} s wall); logs in {workdir}",
        flush=True,
    )
    drained = False
    marks: dict[str, float] = {}
    try:
        sys.stderr = runner_log  # the runners' step logs
        if args.warmup:
            warmup.run()
            wait_drained(db_url, args.warmup, time.monotonic() + 60, time.monotonic(), factor)
        marks = {
            "t0": time.monotonic(),
            "epoch_minus_mono": time.time() - time.monotonic(),
            "hetzner_calls": len(hetzner.call_log),
            "provision_runs": player.played.get("provision", 0),
            "github_runs": max(github.runs, default=0),
        }
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        kids0 = tree_cpu_seconds([p.pid for p in stack.procs.values()])
        parts0 = cpu_by_part(stack)
        load0 = os.getloadavg()[0]
        sampler.start()
        sender = threading.Thread(target=workload.run, name="workload")
        sender.start()
        t0 = marks["t0"]
        drained = wait_drained(db_url, args.orders + args.warmup, t0 + args.max_wall, t0, factor)
        sender.join(timeout=60)
    finally:
        wall = time.monotonic() - marks.get("t0", time.monotonic())
        sampler.stop()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        kids1 = tree_cpu_seconds([p.pid for p in stack.procs.values()])
        parts1 = cpu_by_part(stack)
        load1 = os.getloadavg()[0]
        stack.stop()
        github.wait_players(timeout=20)
        sys.stderr = real_stderr
        runner_log.close()
        github.stop()
        hetzner.stop()
        issuer.stop()
    server_errors = sum(
        1
        for name in stack_logs(workdir / "stack")
        for line in name.read_text(errors="replace").splitlines()
        if " ERROR " in line or "Traceback" in line
    )
    jobs = measure.load_jobs(db_url, [u.pk for u in users])
    if not args.keep and drained:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return Outcome(
        args=args,
        drained=drained,
        wall_seconds=wall,
        jobs=jobs,
        workload=workload,
        github=github,
        hetzner=hetzner,
        sampler=sampler,
        player=player,
        server_errors=server_errors,
        settings_seen=settings_seen,
        cpu_self=cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        cpu_children=kids1 - kids0,
        marks={**marks, "load_start": load0, "load_end": load1},
        cpu_parts={k: parts1.get(k, 0.0) - parts0.get(k, 0.0) for k in parts1},
    )


def cpu_by_part(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each stack process's tree, and of every PostgreSQL process (the
    whole cluster's: nothing else uses it here while the simulation runs)."""
    parts = {name: tree_cpu_seconds([proc.pid]) for name, proc in stack.procs.items()}
    tick = os.sysconf("SC_CLK_TCK")
    postgres = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if head.split("(", 1)[-1].startswith("postgres"):
            fields = tail.split()
            postgres += (int(fields[11]) + int(fields[12])) / tick
    parts["postgresql"] = postgres
    return parts


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds (user + system) so far of these processes and all their descendants (Linux
    /proc): the server's and the workers' share, whoever reaps them."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    wanted = set(roots)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in wanted} - wanted
        grew = bool(more)
        wanted |= more
    return sum(times.get(pid, 0.0) for pid in wanted)


def stack_logs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log")) if directory.exists() else []


# -- the table ----------------------------------------------------------------------------------


def figures(o: Outcome) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """The table's rows (figure, value, goal) and the last line's values."""
    a, f = o.args, o.args.factor
    hour = 3600.0 / f
    jobs = o.jobs
    n = a.orders
    status = Counter(j.status for j in jobs)
    builds = measure.build_seconds(jobs)
    build = measure.median(builds)
    gh = o.github
    launch_runs = [r for i, r in gh.runs.items() if i > o.marks.get("github_runs", 0)]
    run_spans = measure.run_seconds(launch_runs)
    # The floor's build time is what one build costs a runner slot: its run at GitHub, from the
    # moment a runner takes it to its end (the runner's start and claim, the steps, the report).
    # The claim-to-complete time alone leaves out work no dispatcher can skip; its floor is
    # printed too, as a stricter reference.
    run_build = measure.median(run_spans)
    floor = measure.floor_seconds(n, a.capacity, run_build)
    steps_floor = measure.floor_seconds(n, a.capacity, build)
    running_times = [j.running for j in jobs if j.running is not None]
    t_start = o.workload.first_sent or math.nan
    drain = (max(running_times) - t_start) if running_times and o.drained else math.nan
    ratio = floor / drain if drain and not math.isnan(drain) else math.nan
    steps_ratio = steps_floor / drain if drain and not math.isnan(drain) else math.nan
    # The building the slots actually did: every attempt's claim -> complete or fail, over C.
    attempts = measure.attempt_seconds(jobs)
    work_floor = sum(attempts) / a.capacity
    work_ratio = work_floor / drain if drain and not math.isnan(drain) else math.nan
    # What the arrivals allow: orders paid late, and one customer's orders one after another.
    arrival_floor = measure.arrival_floor(o.workload.paid, a.capacity, build) - t_start
    arrival_ratio = arrival_floor / drain if drain and not math.isnan(drain) else math.nan
    retries = sum(j.retry_count for j in jobs)
    gh_calls = [c for c in gh.calls if c.counted]
    gh_peak = measure.busiest_window([c.at for c in gh_calls], hour)
    gh_304 = sum(1 for c in gh.calls if c.status == 304)
    by_route = Counter(c.route for c in gh_calls)
    h_all = list(o.hetzner.call_log)
    h_peak = measure.busiest_window([t for t, _ in h_all], hour)
    h_calls = h_all[int(o.marks.get("hetzner_calls", 0)) :]  # the launch's, not the warm-up's
    h_429 = sum(1 for _, s in h_calls if s == 429)
    provision_runs = o.player.played.get("provision", 0) - int(o.marks.get("provision_runs", 0))
    per_build = len(h_calls) / provision_runs if provision_runs else math.nan
    waits = [r.started_mono - r.dispatched_mono for r in launch_runs if r.started_mono]
    handoffs = measure.handoff_seconds(launch_runs)
    shift = o.marks.get("epoch_minus_mono", 0.0)
    util = (
        o.sampler.utilization(t_start - shift, max(running_times) - shift, a.capacity)
        if running_times
        else math.nan
    )
    inv = measure.inversions(jobs)
    errs = measure.eta_errors(o.workload.predictions, jobs)
    eta = measure.median(errs)
    max_in_flight = max(gh.max_unfinished, o.sampler.max_unfinished)
    span = (o.workload.last_paid or t_start) - t_start
    budget = int(o.settings_seen.get("GITHUB_API_BUDGET_PER_HOUR", 4000))
    h_budget = int(o.settings_seen.get("HETZNER_API_BUDGET_PER_HOUR", 3600))
    planned = o.player.failures_planned
    rows = [
        ("time factor F", f"{f:g} (1 sim hour = {hour:.0f} s wall)", ""),
        (
            "orders / customers",
            f"{n} / {a.customers}; paid over {span:.1f} s wall = {span * f / 60:.1f} sim min; "
            f"webhook answers {dict(o.workload.statuses)} (median "
            f"{measure.median(o.workload.post_seconds) * 1000:.0f} ms wall; agent page read "
            f"{measure.median(o.workload.read_seconds) * 1000:.0f} ms)",
            "",
        ),
        (
            "build time (median claim→complete)",
            f"{build * f:.0f} s sim ({build:.2f} s wall, {len(builds)} builds; mean "
            f"{statistics.fmean(builds) * f if builds else math.nan:.0f} s, p95 "
            f"{_p95(builds) * f:.0f} s)",
            "",
        ),
        (
            "build time: a run at GitHub (median runner start→end, successful provision runs)",
            f"{run_build * f:.0f} s sim ({len(run_spans)} runs; mean "
            f"{statistics.fmean(run_spans) * f if run_spans else math.nan:.0f} s)",
            "",
        ),
        (
            "drain time vs floor ceil(N/C) x build",
            f"{drain * f / 60:.1f} vs {floor * f / 60:.1f} sim min: ratio {measure.fmt(ratio)}"
            if not math.isnan(drain)
            else f"not drained in {a.max_wall:.0f} s wall (floor {floor * f / 60:.1f} sim min)",
            "ratio ≥ 0.9",
        ),
        (
            "drain vs ceil(N/C) x claim→complete (the steps only)",
            f"{steps_floor * f / 60:.1f} sim min: ratio {measure.fmt(steps_ratio)}",
            "",
        ),
        (
            "drain vs the building done: Σ(claim→end of every attempt) / C",
            f"{work_floor * f / 60:.1f} sim min ({len(attempts)} attempts): ratio "
            f"{measure.fmt(work_ratio)}",
            "",
        ),
        (
            "drain vs the floor the arrivals allow",
            f"{arrival_floor * f / 60:.1f} sim min (late payments, per-customer chains): ratio "
            f"{measure.fmt(arrival_ratio)}",
            "",
        ),
        (
            "jobs running / failed / other",
            f"{status['running']} / {status['failed']} / "
            f"{len(jobs) - status['running'] - status['failed']} of {len(jobs)}",
            f"all {n} running",
        ),
        (
            "failures planned / retries spent",
            f"{len(planned)} ({dict(Counter(planned.values()))}) / {retries}",
            "",
        ),
        ("re-dispatches of runs GitHub still held", str(gh.resent_while_held), "0"),
        (
            "most runs in flight: GitHub's view (dispatched, not completed) / the service's count",
            f"{max_in_flight} / {o.sampler.max_service} (in progress at once: {gh.max_running}; "
            f"GitHub's view over C in {o.sampler.over.get(a.capacity, 0)} of "
            f"{o.sampler.samples} samples)",
            f"≤ {a.capacity}",
        ),
        (
            "wait in GitHub's queue for a runner, p50 / p95 / max",
            " / ".join(
                f"{v * f:.0f} s"
                for v in (measure.median(waits), _p95(waits), max(waits, default=0))
            )
            + f" sim ({len(launch_runs)} runs)",
            "",
        ),
        ("runner slots busy while draining (mean)", f"{measure.fmt(util * 100, 0)} %", ""),
        (
            "a slot handed on: a run's end → the next dispatch reaches GitHub, p50 / p90",
            f"{measure.median(handoffs) * f:.1f} s / {_p90(handoffs) * f:.1f} s sim "
            f"({measure.median(handoffs) * 1000:.0f} ms wall; webhook, then dispatch)",
            "",
        ),
        (
            "GitHub API calls, busiest sim hour",
            f"{gh_peak} of {len(gh_calls)} ({dict(by_route)}); 304s {gh_304}",
            f"≤ {budget}",
        ),
        ("GitHub rate-limit answers (403/429)", str(gh.rate_limited), ""),
        (
            "GitHub's webhooks: answers / lost on the way",
            f"{dict(sorted(gh.webhooks.items()))} / {gh.webhooks_dropped}",
            "",
        ),
        (
            "Hetzner calls per build / busiest sim hour",
            f"{measure.fmt(per_build, 1)} / {h_peak} ({len(h_calls)} calls, "
            f"{provision_runs} provision runs; 429s {h_429})",
            f"hour ≤ {h_budget}",
        ),
        ("per-customer order: inversions", str(inv), "0"),
        (
            "ETA error, median |pred-actual|/actual",
            f"{measure.fmt(eta)} over {len(errs)} jobs ({o.workload.unread} reads without one)",
            "≤ 0.20",
        ),
        (
            "wall / CPU (this process; server+workers) / load average / server log errors",
            f"{o.wall_seconds:.0f} s / {o.cpu_self:.0f} s; {o.cpu_children:.0f} s / "
            f"{o.marks.get('load_start', 0):.1f} → {o.marks.get('load_end', 0):.1f} / "
            f"{o.server_errors}" + (f"; player errors {len(gh.errors)}" if gh.errors else ""),
            "",
        ),
        (
            "CPU seconds by part",
            ", ".join(f"{k} {v:.0f}" for k, v in sorted(o.cpu_parts.items())),
            "",
        ),
    ]
    last = {
        "drain_ratio": measure.fmt(ratio),
        "jobs": str(len(jobs)),
        "running": str(status["running"]),
        "failed": str(status["failed"]),
        "resent_while_held": str(gh.resent_while_held),
        "max_in_flight": str(max_in_flight),
        "capacity": str(a.capacity),
        "github_calls_peak_hour": str(gh_peak),
        "github_budget": str(budget),
        "hetzner_calls_peak_hour": str(h_peak),
        "inversions": str(inv),
        "eta_error": measure.fmt(eta),
    }
    return rows, last


def _p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)] if values else math.nan


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.95 * (len(ordered) - 1))] if ordered else math.nan


def render(rows: list[tuple[str, str, str]], last: dict[str, str]) -> str:
    head = ("figure", "value", "goal")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]

    def line(cells: tuple[str, str, str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(head), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in rows]
    out.append("")
    out.append("launch: " + " ".join(f"{k}={v}" for k, v in last.items()))
    return "\n".join(out)


def record(text: str, args: argparse.Namespace, argv: list[str]) -> None:
    """Replace (or add) the "## Launch day" section of bench/RESULTS.md."""
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    heading = "## Launch day (`make launch`)"
    cmd = "make launch" + (f" LAUNCH_ARGS='{' '.join(argv)}'" if argv else "")
    section = (
        f"{heading}\n\nRun {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, command "
        f"`{cmd}`, F = {args.factor:g}, on the shared 2-core machine.\n\n```\n{text}\n```\n"
    )
    if heading in old:
        start = old.index(heading)
        nxt = old.find("\n## ", start + len(heading))
        new = old[:start] + section + (old[nxt + 1 :] if nxt != -1 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new)
    print(f"wrote {path.relative_to(ROOT)}")


def broken_promises(o: Outcome, last: dict[str, str]) -> list[str]:
    """The goals that are about correctness, not speed: any of these missed fails the run (exit
    1). The speed goals (drain ratio, ETA error) are printed, not enforced: on a shared 2-core
    machine they measure the neighbours too."""

    def num(key: str) -> float:
        return float(last[key])

    broken = []
    if not o.drained:
        broken.append(f"the queue did not drain within {o.args.max_wall:.0f} s wall")
    if num("running") != o.args.orders:
        broken.append(f"{last['running']} of {o.args.orders} orders running")
    if num("resent_while_held"):
        broken.append(f"{last['resent_while_held']} runs re-sent while GitHub held them")
    if num("inversions"):
        broken.append(f"{last['inversions']} per-customer order inversions")
    if o.sampler.max_service > o.args.capacity:
        broken.append(
            f"the service had {o.sampler.max_service} runs in flight (C = {o.args.capacity})"
        )
    if num("max_in_flight") > o.args.capacity:
        broken.append(
            f"GitHub held {last['max_in_flight']} runs unfinished at once (C = {o.args.capacity})"
        )
    if num("github_calls_peak_hour") > num("github_budget"):
        broken.append("GitHub calls in the busiest hour over the budget")
    if num("hetzner_calls_peak_hour") > HETZNER_LIMIT_PER_HOUR:
        broken.append("Hetzner calls in the busiest hour over its limit")
    return broken


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # This process plays every runner (~20 threads), the fakes' servers and the webhook senders,
    # nearly all waiting on sockets. With the interpreter's default 5 ms switch interval a thread
    # whose answer has arrived can wait that long for the GIL, and at F = 40 each wall
    # millisecond is 40 simulated ones: a delay of the harness, not of the service.
    sys.setswitchinterval(0.0005)
    outcome = simulate(args)
    rows, last = figures(outcome)
    text = render(rows, last)
    if args.record:
        record(text, args, argv)
    broken = broken_promises(outcome, last)
    for promise in broken:
        print(f"missed: {promise}", flush=True)
    print(text, flush=True)  # the machine-readable line stays the last one
    return 1 if broken else 0
