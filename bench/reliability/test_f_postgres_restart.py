"""PostgreSQL restarted under load -> no errors outside the restart window, no lost or
duplicated transitions.

A private cluster on its own port (initdb/pg_ctl as the postgres user: they refuse root), the
schema copied from the test database (pg_dump -s), and a second stack (gunicorn, two workers,
local runners) pointed at it. "Stripe" delivers a stream of orders (retrying a failed delivery
every 0.5 s, as Stripe would), a monitor polls /healthz every 0.1 s, and the cluster is restarted
(`pg_ctl restart -m fast`) in the middle of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from bench.reliability import checks
from bench.reliability.conftest import figure, knob, wait_for
from bench.reliability.stack import Stack, free_port

GRACE_SECONDS = 5.0  # after pg_ctl says the server is up again: pools reconnect
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (ERROR|CRITICAL)")


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class FakeUser:
    def __init__(self, pk: int) -> None:
        self.pk = pk
        self.email = f"restart{pk}@example.com"

    def get_username(self) -> str:
        return f"restart{self.pk}"


class Cluster:
    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.root, self.bin = root, bin_dir
        self.data = root / "data"
        self.port = free_port()

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            timeout=timeout,
            capture_output=True,
        )

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        # Every directory above must be traversable by postgres.
        for parent in self.root.parents:
            if str(parent) in ("/", tempfile.gettempdir()):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o711)  # noqa: S103 (traverse only)
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale", "C",
        )  # fmt: skip

    def pg_ctl(self, *args: str) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"),
            "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "-w", *args,
        )  # fmt: skip


def test_postgres_restart_under_load(live_db, hetzner, issuer, workdir):
    bin_dir = _pg_bin()
    if os.geteuid() != 0 or bin_dir is None or shutil.which("runuser") is None:
        pytest.skip("needs root, runuser and a local PostgreSQL installation to run a cluster")
    orders = knob("RELIABILITY_RESTART_ORDERS", 40)
    cluster = Cluster(Path(workdir) / "pg", bin_dir)
    cluster.init()
    cluster.pg_ctl("start")
    stack: Stack | None = None
    try:
        with psycopg.connect(
            f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE restart")
        test_db = live_db.rsplit("/", 1)[1]
        schema = subprocess.run(
            ["pg_dump", "-s", "--no-owner", "-h", "127.0.0.1", "-U", "postgres", test_db],
            check=True,
            capture_output=True,
            timeout=120,
        ).stdout
        subprocess.run(
            ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(cluster.port),
             "-U", "postgres", "-d", "restart"],
            input=schema, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        url = f"postgres://postgres@127.0.0.1:{cluster.port}/restart"
        with psycopg.connect(checks.conninfo(url)) as conn:
            user_ids = [
                r[0]
                for r in conn.execute(
                    "INSERT INTO auth_user (password, is_superuser, username, first_name, "
                    "last_name, email, is_staff, is_active, date_joined) SELECT '!', false, "
                    "'restart' || i, '', '', '', false, true, now() "
                    "FROM generate_series(1, %s) i RETURNING id",
                    (max(orders // 2, 1),),
                ).fetchall()
            ]
        stack = Stack(
            db_url=url,
            hetzner_url=hetzner.url,
            issuer=issuer,
            workdir=Path(workdir) / "restart-stack",
            chaos_dir=Path(workdir) / "restart-chaos",
        )
        stack.start()
        events = [
            checks.checkout_event(FakeUser(user_ids[i % len(user_ids)]), f"restart {i}")
            for i in range(orders)
        ]
        attempts: list[tuple[float, object]] = []  # (wall time, status or error name)
        probes: list[tuple[float, object]] = []
        stop = threading.Event()

        def stripe() -> None:
            with httpx.Client(timeout=30) as client:
                give_up = time.monotonic() + 240  # a delivery refused this long is a failure
                for event in events:
                    body = checks.encode(event)
                    while not stop.is_set() and time.monotonic() < give_up:
                        try:
                            outcome: object = client.post(
                                stack.webhook_url,  # type: ignore[union-attr]
                                content=body,
                                headers={
                                    "Content-Type": "application/json",
                                    "Stripe-Signature": checks.sign(body),
                                },
                            ).status_code
                        except httpx.HTTPError as exc:
                            outcome = type(exc).__name__
                        attempts.append((time.time(), outcome))
                        if outcome == 200:
                            break
                        time.sleep(0.5)
                    time.sleep(0.4)

        def monitor() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    try:
                        outcome: object = client.get(f"{stack.base_url}/healthz").status_code  # type: ignore[union-attr]
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    probes.append((time.time(), outcome))
                    time.sleep(0.1)

        threads = [threading.Thread(target=stripe), threading.Thread(target=monitor, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(orders * 0.4 / 2)  # mid-load
        down = time.time()
        cluster.pg_ctl("restart", "-m", "fast")
        up = time.time()
        threads[0].join(timeout=600)

        def all_final() -> bool:
            jobs = checks.jobs_of_users(url, user_ids)
            return len(jobs) == orders and all(j["status"] in checks.FINAL for j in jobs)

        try:
            wait_for(
                f"{orders} jobs to finish after the restart", all_final, timeout=300, interval=1
            )
        finally:
            stop.set()
        window = (down, up + GRACE_SECONDS)

        def outside(t: float) -> bool:
            return not window[0] <= t <= window[1]

        bad_deliveries = [a for a in attempts if a[1] != 200 and outside(a[0])]
        bad_probes = [p for p in probes if p[1] != 200 and outside(p[0])]
        in_window = [a for a in attempts if a[1] != 200 and not outside(a[0])]
        log_errors: list[str] = []
        for name in ("gunicorn", "worker-0", "worker-1"):
            for line in stack.log(name).splitlines():
                m = LOG_TIME.match(line)
                if m:
                    ts = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                    ts += int(m.group(2)) / 1000
                    if outside(ts) and not (window[0] - 1 <= ts <= window[1] + 1):
                        log_errors.append(f"{name}: {line[:200]}")
        jobs = checks.jobs_of_users(url, user_ids)
        result = checks.audit(jobs, checks.events_of_jobs(url, [j["id"] for j in jobs]))
        sessions = {j["stripe_checkout_session_id"] for j in jobs}
        figure(
            f"[restart] {orders} orders; restart took {up - down:.1f}s (window with grace "
            f"{window[1] - window[0]:.1f}s); deliveries {len(attempts)} (refused in window "
            f"{len(in_window)}, outside {len(bad_deliveries)}); /healthz probes {len(probes)} "
            f"(failed outside {len(bad_probes)}); log errors outside {len(log_errors)}; "
            f"agents {len(sessions)}; {result.summary()}"
        )
        for line in log_errors[:5]:
            figure(f"[restart]   {line}")
        assert not bad_deliveries, bad_deliveries[:5]
        assert not bad_probes, bad_probes[:5]
        assert not log_errors, log_errors[:5]
        assert len(sessions) == orders and len(jobs) == orders
        assert not result.problems, result.problems
    finally:
        if stack is not None:
            stack.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster.pg_ctl("stop", "-m", "immediate")
