"""`make run`'s supervisor (`manage.py run_local_stack`) as a real process tree: a closed terminal
(SIGHUP), Ctrl-C or a SIGKILL of the supervisor leaves no child running and no port taken, and a
second start while one runs says so and starts nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from provisioning.management.commands import run_local_stack

# PostgreSQL only: the worker and web children need the test database's tables from another
# process (on SQLite the test database lives in this process's memory).
pytestmark = [pytest.mark.slow, pytest.mark.postgres_only, pytest.mark.django_db(transaction=True)]

MANAGE = str(Path(settings.BASE_DIR) / "manage.py")
UP_TIMEOUT = 120.0
GONE_TIMEOUT = 40.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def database_url() -> str:
    """This test database, for the children (they run outside this process)."""
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def children_of(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def ours(pid: int) -> bool:
    """Still one of the stack's processes (not a recycled pid): its command names this project."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(settings.BASE_DIR).encode() in cmdline or b"provisioning.localdev" in cmdline


def alive(pid: int) -> bool:
    return not run_local_stack._gone(pid)


def port_taken(port: int) -> bool:
    return not run_local_stack._port_free(port)


@dataclass
class Stack:
    process: subprocess.Popen[str]
    ports: list[int]
    pid_file: Path
    env: dict[str, str]
    output: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # every child seen, for the clean-up

    def wait_up(self) -> None:
        deadline = time.monotonic() + UP_TIMEOUT
        while time.monotonic() < deadline:
            if any("The local pipeline is up" in line for line in self.output):
                self.seen |= children_of(self.process.pid)
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail("the stack did not come up:\n" + "".join(self.output[-80:]))

    def wait_exit(self) -> int:
        try:
            return self.process.wait(timeout=GONE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail("the supervisor did not exit:\n" + "".join(self.output[-80:]))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, MANAGE, "run_local_stack", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    web, hetzner, oidc = free_ports(3)
    env = dict(os.environ)
    env.update(
        DJANGO_DEBUG="1",
        DATABASE_URL=database_url(),
        LOCAL_WEB_PORT=str(web),
        LOCAL_HETZNER_PORT=str(hetzner),
        LOCAL_OIDC_PORT=str(oidc),
        LOCAL_RUNNER_LOG_DIR=str(tmp_path / "runner-logs"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("DJANGO_TESTING", None)
    pid_file = tmp_path / run_local_stack.PID_FILE
    process = subprocess.Popen(
        [
            sys.executable,
            MANAGE,
            "run_local_stack",
            "--skip-webhook-setup",
            "--var-dir",
            str(tmp_path),
            "--worker-interval",
            "0.5",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # like a terminal's job: its own process group
    )
    running = Stack(process=process, ports=[web, hetzner, oidc], pid_file=pid_file, env=env)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            running.output.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield running
    finally:
        # Whatever a failing test left behind (a child outliving the supervisor is reparented,
        # so the ones seen earlier are killed too).
        for pid in children_of(process.pid) | running.seen | {process.pid}:
            if ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_gone(pids: set[int], ports: list[int]) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids) and not any(port_taken(p) for p in ports):
            return
        time.sleep(0.2)
    left = [describe(pid) for pid in pids if alive(pid)]
    taken = [port for port in ports if port_taken(port)]
    pytest.fail(f"still alive: {left}; ports still taken: {taken}")


def describe(pid: int) -> str:
    """A live process for a failure message: pid, state, what it waits in, its command."""
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        wchan = (proc / "wchan").read_text().strip() if (proc / "wchan").exists() else "?"
        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (gone while described)"
    return f"{pid} state {state} in {wchan or '-'}: {command.strip()[:200]}"


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_supervisor_stops_every_child_and_frees_the_ports(stack, signum):
    stack.wait_up()
    children = children_of(stack.process.pid)
    assert len(children) >= 4  # hetzner, oidc, web, worker
    assert all(port_taken(port) for port in stack.ports)
    assert stack.pid_file.read_text().strip() == str(stack.process.pid)

    stack.process.send_signal(signum)

    assert stack.wait_exit() == 0
    wait_gone(children, stack.ports)
    assert not stack.pid_file.exists()


def test_children_die_with_a_killed_supervisor(stack):
    stack.wait_up()
    children = children_of(stack.process.pid)

    stack.process.kill()  # SIGKILL: no handler runs; the kernel tells the children

    stack.wait_exit()
    wait_gone(children, stack.ports)


def test_a_second_start_says_one_is_running_and_starts_nothing(stack):
    stack.wait_up()
    children = children_of(stack.process.pid)

    second = stack.run("--check", "--var-dir", str(stack.pid_file.parent))

    assert second.returncode == 1
    assert f"`make run` is already running (pid {stack.process.pid})" in second.stderr
    assert children_of(stack.process.pid) == children

    stack.process.send_signal(signal.SIGHUP)
    stack.wait_exit()
    wait_gone(children, stack.ports)
    assert stack.run("--check", "--var-dir", str(stack.pid_file.parent)).returncode == 0
