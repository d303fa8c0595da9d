"""`manage.py run_local_stack`: the whole pipeline on one machine, on loopback (`make run`).

Starts, each as a child process in its own process group:

- ``hetzner``: the fake Hetzner Cloud API (``provisioning.localdev.fake_hetzner``);
- ``oidc``: the development OIDC issuer the local runner gets its tokens from
  (``provisioning.localdev.oidc_issuer``), with the issuer URL, repository, workflow, ref and
  request token from settings, so its tokens pass the web server's verification;
- ``web``: ``manage.py runserver --noreload`` (WhiteNoise serves static files under DEBUG);
- ``worker``: ``manage.py provisioning_worker``.

Before that it runs ``manage.py setup_stripe_webhook`` (if installed) so test events verify.
Every child's output is printed with its name in front. Ctrl-C, SIGTERM or SIGHUP (the terminal
closed) stops them all (and any runner a child started) and exits 0; if a child dies on its own,
the rest are stopped and the command exits non-zero. Each child is started through
``provisioning.localdev.with_parent``, so on Linux the kernel stops it even if this process is
killed outright (SIGKILL) and cannot stop it itself.

``--check`` only says whether a stack is already running (its pid file in var/, or its ports
taken) and exits 1 if so: `make run` asks before it migrates anything.

Ports come from ``--web-port``/``--hetzner-port``/``--oidc-port``, else ``LOCAL_WEB_PORT``/
``LOCAL_HETZNER_PORT``/``LOCAL_OIDC_PORT``, else the ports in ``PUBLIC_BASE_URL``,
``LOCAL_HETZNER_URL`` and ``LOCAL_OIDC_ISSUER_URL`` (8000, 8701, 8702). The children are told
the resulting URLs through the environment, so they always agree with each other.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.management import call_command, get_commands
from django.core.management.base import BaseCommand, CommandError, CommandParser

from provisioning.management.commands.seed_demo import DEMO_LOGINS, demo_urls

HOST = "127.0.0.1"
WITH_PARENT = "provisioning.localdev.with_parent"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
PID_FILE = "run_local_stack.pid"  # in --var-dir
READY_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0
RUNNER_STOP_GRACE_SECONDS = 8.0


def _port_of(url: str, default: int) -> int:
    try:
        return urlsplit(url).port or default
    except ValueError:
        return default


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or HOST
    return urlunsplit((parts.scheme or "http", f"{host}:{port}", parts.path, "", "")).rstrip("/")


def _is_loopback(url: str) -> bool:
    return urlsplit(url).hostname in LOOPBACK_HOSTS


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


@dataclass
class Child:
    name: str
    argv: list[str]
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self.process.pid

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal_group(self, signum: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


class Command(BaseCommand):
    help = (
        "Run the local pipeline on loopback: fake Hetzner, dev OIDC issuer, web server and "
        "worker, until Ctrl-C. DEBUG only (make run)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        env = os.environ.get
        parser.add_argument("--web-port", type=int, default=env("LOCAL_WEB_PORT") or None)
        parser.add_argument("--hetzner-port", type=int, default=env("LOCAL_HETZNER_PORT") or None)
        parser.add_argument("--oidc-port", type=int, default=env("LOCAL_OIDC_PORT") or None)
        parser.add_argument(
            "--worker-interval",
            type=float,
            default=None,
            help="seconds between worker ticks (default: WORKER_INTERVAL_SECONDS)",
        )
        parser.add_argument(
            "--hetzner-action-seconds",
            type=float,
            default=float(env("LOCAL_HETZNER_ACTION_SECONDS") or 1.0),
            help="how long the fake cloud's actions (create, delete) take",
        )
        parser.add_argument(
            "--skip-webhook-setup", action="store_true", help="don't run setup_stripe_webhook"
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="only check that no stack is running (pid file, ports); exit 1 if one is",
        )
        parser.add_argument(
            "--var-dir",
            default=None,
            help="where the stack keeps its pid file, the fake cloud's state and the issuer's "
            "key (default: var/)",
        )

    # -- main ------------------------------------------------------------------------------------

    def handle(self, *args: Any, **options: Any) -> None:
        self._require_debug()
        self._out_lock = threading.Lock()
        self._output_gone = False
        self._stopping = threading.Event()
        self._signal: int | None = None
        var_dir = Path(options["var_dir"] or Path(settings.BASE_DIR) / "var")
        pid_file = var_dir / PID_FILE
        running = _running_stack(pid_file)
        if running is not None:
            raise CommandError(
                f"`make run` is already running (pid {running}): use that one, or stop it first "
                f"(Ctrl-C in its terminal, or `kill {running}`)."
            )

        web_port, hetzner_port, oidc_port = self._ports(options)
        if options["check"]:
            return
        public_url = settings.PUBLIC_BASE_URL
        if _is_loopback(public_url):
            public_url = _with_port(public_url, web_port)
        hetzner_url = f"http://{HOST}:{hetzner_port}{urlsplit(settings.LOCAL_HETZNER_URL).path}"
        issuer_url = f"http://{HOST}:{oidc_port}"
        local_runner = settings.PROVISIONING_RUNNER == "local"
        self._child_env = self._environment(public_url, hetzner_url, issuer_url, local_runner)

        if not options["skip_webhook_setup"]:
            self._setup_stripe_webhook()

        python = sys.executable
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        key_path = var_dir / "local-oidc-key.pem"
        worker_argv = [python, manage, "provisioning_worker"]
        if options["worker_interval"] is not None:
            worker_argv += ["--interval", str(options["worker_interval"])]
        children = [
            Child(
                "hetzner",
                [
                    python,
                    "-m",
                    "provisioning.localdev.fake_hetzner",
                    "--host",
                    HOST,
                    "--port",
                    str(hetzner_port),
                    "--action-seconds",
                    str(options["hetzner_action_seconds"]),
                    # A restart of `make run` keeps the VMs the agents in the database point at.
                    "--state-file",
                    str(var_dir / "fake-hetzner.json"),
                ],
                port=hetzner_port,
            ),
            Child(
                "oidc",
                [
                    python,
                    "-m",
                    "provisioning.localdev.oidc_issuer",
                    "--host",
                    HOST,
                    "--port",
                    str(oidc_port),
                    "--issuer",
                    issuer_url,
                    "--repository",
                    settings.GITHUB_REPOSITORY,
                    "--repository-id",
                    str(settings.GITHUB_REPOSITORY_ID),
                    "--workflow-file",
                    settings.GITHUB_WORKFLOW_FILE,
                    "--ref",
                    settings.GITHUB_REF,
                    "--request-token",
                    settings.LOCAL_OIDC_REQUEST_TOKEN,
                    "--audience",
                    settings.PROVISIONING_OIDC_AUDIENCE,
                    # One key across restarts: the web server's cached JWKS stays valid.
                    "--key-path",
                    str(key_path),
                ],
                port=oidc_port,
            ),
            Child(
                "web",
                [python, manage, "runserver", f"{HOST}:{web_port}", "--noreload"],
                port=web_port,
            ),
            Child("worker", worker_argv),
        ]
        self._children = children

        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        try:
            failed = self._run_children(public_url, hetzner_url, issuer_url, local_runner)
        finally:
            with contextlib.suppress(OSError):
                if pid_file.read_text().strip() == str(os.getpid()):
                    pid_file.unlink()
        if failed is not None:
            code = failed.poll()
            raise CommandError(
                f"{failed.name} exited with code {code}; stopped the rest",
                returncode=code if code and code > 0 else 1,
            )
        self._say("stopped")

    # -- settings --------------------------------------------------------------------------------

    def _require_debug(self) -> None:
        if not settings.DEBUG:
            raise CommandError(
                "run_local_stack is for local development: it runs Django's development server "
                "and loopback fakes. Run it with DJANGO_DEBUG=1 (`make run` does)."
            )

    def _ports(self, options: dict[str, Any]) -> tuple[int, int, int]:
        """The web, Hetzner and OIDC ports (option, else the configured URL, else the default),
        refusing to start if one is taken."""
        web_port = options["web_port"] or (
            _port_of(settings.PUBLIC_BASE_URL, 8000)
            if _is_loopback(settings.PUBLIC_BASE_URL)
            else 8000
        )
        hetzner_port = options["hetzner_port"] or _port_of(settings.LOCAL_HETZNER_URL, 8701)
        oidc_port = options["oidc_port"] or _port_of(settings.LOCAL_OIDC_ISSUER_URL, 8702)
        for label, port in (("web", web_port), ("hetzner", hetzner_port), ("oidc", oidc_port)):
            if not _port_free(port):
                raise CommandError(
                    f"port {port} ({label}) on {HOST} is in use: is another `make run` still "
                    f"running? Choose another with --{label}-port or LOCAL_{label.upper()}_PORT."
                )
        return web_port, hetzner_port, oidc_port

    def _environment(
        self, public_url: str, hetzner_url: str, issuer_url: str, local_runner: bool
    ) -> dict[str, str]:
        """The children's environment: the URLs chosen here, so they all agree with each other."""
        child_env = dict(os.environ)
        child_env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PUBLIC_BASE_URL": public_url,
                "LOCAL_HETZNER_URL": hetzner_url,
                "LOCAL_OIDC_ISSUER_URL": issuer_url,
            }
        )
        if local_runner:
            # The web server must trust exactly the issuer started here.
            child_env["PROVISIONING_OIDC_ISSUER"] = issuer_url
            child_env["PROVISIONING_OIDC_JWKS_URL"] = f"{issuer_url}/.well-known/jwks"
        return child_env

    def _setup_stripe_webhook(self) -> None:
        if "setup_stripe_webhook" not in get_commands():
            return
        try:
            call_command("setup_stripe_webhook", stdout=self.stdout, stderr=self.stderr)
        except Exception as exc:  # the pipeline still works without Stripe events
            self._say(f"setup_stripe_webhook failed ({exc}); test payments will be refused")

    # -- supervision -----------------------------------------------------------------------------

    def _run_children(
        self, public_url: str, hetzner_url: str, issuer_url: str, local_runner: bool
    ) -> Child | None:
        """Start the children, print the banner once all are up, supervise until a signal or a
        child's exit, then stop them all. Returns the child that failed, if one did."""
        # SIGHUP: the terminal running `make run` was closed; it stops everything like Ctrl-C.
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            failed = self._start_all()
            if failed is None and not self._stopping.is_set():
                self._banner(public_url, hetzner_url, issuer_url, local_runner)
                failed = self._supervise()
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return failed

    def _start_all(self) -> Child | None:
        """Start the children in order, waiting for each one with a port to accept connections
        before starting the next. Returns the child that died or never opened its port; stops
        early on a signal."""
        for child in self._children:
            self._start(child)
            if child.port is not None:
                failed = self._wait_ready(child, child.port)
                if failed is not None or self._stopping.is_set():
                    return failed
        return None

    # -- children --------------------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        self._say(f"starting {child.name}: {shlex.join(child.argv[1:])}")
        # Through with_parent: the kernel stops the child if this process dies without doing so.
        wrapped = [sys.executable, "-m", WITH_PARENT, str(os.getpid()), "--", *child.argv]
        process = child.process = subprocess.Popen(
            wrapped,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._child_env,
            cwd=str(settings.BASE_DIR),
            start_new_session=True,  # its own process group: stopped as a whole, not by Ctrl-C
        )
        if process.stdout is None:  # cannot happen with stdout=PIPE; keeps the type honest
            raise RuntimeError(f"{child.name} started without an output pipe")
        child.reader = threading.Thread(
            target=self._pump,
            args=(child.name, process.stdout),
            name=f"pump-{child.name}",
            daemon=True,
        )
        child.reader.start()

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        prefix = f"[{name}] "
        # Read to the end whatever happens to our own output: a child blocked on a full pipe
        # would never stop.
        for raw in iter(stream.readline, b""):
            self._write(prefix + raw.decode("utf-8", "replace").rstrip("\n") + "\n")
        stream.close()

    def _say(self, message: str) -> None:
        self._write(f"[stack] {message}\n")

    def _write(self, text: str) -> None:
        """Print, unless the terminal is gone (closed: EIO; a closed pipe: EPIPE). Then the
        shutdown goes on silently."""
        with self._out_lock:
            if self._output_gone:
                return
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except OSError:
                self._output_gone = True

    def _wait_ready(self, child: Child, port: int) -> Child | None:
        """Wait until the child accepts connections on `port`; returns the child if it died
        first."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline and not self._stopping.is_set():
            if child.poll() is not None:
                return child
            if _port_open(port):
                return None
            time.sleep(0.1)
        if self._stopping.is_set():
            return None
        self._say(f"{child.name} did not open port {port} in {READY_TIMEOUT_SECONDS:.0f}s")
        return child

    def _supervise(self) -> Child | None:
        """Until a signal (returns None) or a child's exit (returns that child)."""
        while not self._stopping.wait(0.2):
            for child in self._children:
                if child.poll() is not None:
                    self._say(f"{child.name} exited with code {child.poll()}: stopping the rest")
                    return child
        return None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping.is_set():
            return
        self._signal = signum
        self._say(f"{signal.Signals(signum).name}: stopping everything")
        self._stopping.set()

    def _shutdown(self) -> None:
        self._stopping.set()
        by_name = {c.name: c for c in self._children}
        web, worker = by_name["web"], by_name["worker"]
        # 1. No new runs: stop the worker first (remembering the runs it started), 2. then the
        # runs the worker and the web server started (they report the interruption while the
        # web server still answers), 3. then the web server and the fakes.
        runners = self._our_runners({c.pid for c in (web, worker) if c.process is not None})
        self._stop([worker])
        if web.process is not None:
            runners |= self._our_runners({web.pid})
        self._stop_runners(runners)
        self._stop([web, by_name["oidc"], by_name["hetzner"]])

    def _stop(self, children: list[Child]) -> None:
        running = [
            (c, c.process) for c in children if c.process is not None and c.process.poll() is None
        ]
        for child, _ in running:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child, process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self._say(f"{child.name} ignored SIGTERM for {STOP_GRACE_SECONDS:.0f}s: killing")
                child.signal_group(signal.SIGKILL)
                process.wait(timeout=5)
        for child in children:
            if child.reader is not None:
                child.reader.join(timeout=2)

    def _our_runners(self, parents: set[int]) -> dict[int, str]:
        """Runner subprocesses (each in its own session) that our web server or worker started:
        found by the pid files the local backend leaves in LOCAL_RUNNER_LOG_DIR, kept only if
        the process still carries its job id and its parent is one of ours."""
        log_dir = Path(settings.LOCAL_RUNNER_LOG_DIR)
        found: dict[int, str] = {}
        for pid_file in sorted(log_dir.glob("*.pid")) if log_dir.is_dir() else []:
            try:
                pid_text, _, job_id = pid_file.read_text().strip().partition(" ")
                pid = int(pid_text)
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                stat = Path(f"/proc/{pid}/stat").read_text()
            except (OSError, ValueError):
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if job_id and job_id.encode() in cmdline and ppid in parents:
                found[pid] = job_id
        return found

    def _stop_runners(self, runners: dict[int, str]) -> None:
        for pid, job_id in runners.items():
            self._say(f"stopping runner pid {pid} (job {job_id})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        groups = list(runners)
        deadline = time.monotonic() + RUNNER_STOP_GRACE_SECONDS
        while groups and time.monotonic() < deadline:
            groups = [pid for pid in groups if not _gone(pid)]
            time.sleep(0.1)
        for pid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    # -- banner ----------------------------------------------------------------------------------

    def _banner(self, public_url: str, hetzner_url: str, issuer_url: str, local: bool) -> None:
        urls = demo_urls(public_url)
        env_prefix = ["DJANGO_DEBUG=1"]
        for name in ("SQLITE_PATH", "DATABASE_URL"):
            if os.environ.get(name):
                env_prefix.append(f"{name}={shlex.quote(os.environ[name])}")
        if public_url != settings.PUBLIC_BASE_URL:
            env_prefix.append(f"PUBLIC_BASE_URL={public_url}")
        python = os.path.relpath(sys.executable, settings.BASE_DIR)
        if python.startswith(".."):
            python = sys.executable
        try_command = (
            f"{' '.join(env_prefix)} {python} manage.py stripe_send_test_event "
            "checkout.session.completed --customer demo"
        )
        logins = "\n".join(
            f"    {'operator' if login.operator else 'customer'}: "
            f"{login.username} / {login.password}"
            for login in DEMO_LOGINS
        )
        lines = [
            "",
            "=" * 78,
            "  The local pipeline is up (Ctrl-C stops everything)",
            "",
            f"  dashboard   {urls['dashboard']}",
            f"  admin       {urls['admin']}",
            f"  API docs    {urls['api docs']}",
            f"  health      {public_url}/healthz",
            f"  fake Hetzner {hetzner_url}   dev OIDC issuer {issuer_url}",
            f"  runner      {settings.PROVISIONING_RUNNER}"
            + ("" if local else "  (not local: runs go to GitHub; the local fakes are unused)"),
            "",
            "  demo logins (seed_demo):",
            logins,
            "",
            "  try (in another terminal):",
            f"    {try_command}",
            "",
            *knob_lines(),
            "  other knobs: LOCAL_RUNNER_STEP_SECONDS, JOB_TIMEOUT_SECONDS, RETRY_BACKOFF_SECONDS",
            f"  runner logs {settings.LOCAL_RUNNER_LOG_DIR}",
            "=" * 78,
            "",
        ]
        self._write("\n".join(lines) + "\n")


# Longer than this, a killed attempt's timeout is too slow to watch.
WATCHABLE_TIMEOUT_SECONDS = 120


def knob_lines() -> list[str]:
    """The banner's word on the failure knobs: which one is on and what it does, or how to
    turn one on."""
    fail = settings.LOCAL_RUNNER_FAIL_STEP
    kill = settings.LOCAL_RUNNER_KILL_AT_STEP
    timeout = settings.JOB_TIMEOUT_SECONDS
    if not (fail or kill):
        return [
            "  failure knob: none (every build succeeds). To see failures, start with",
            "    LOCAL_RUNNER_FAIL_STEP=configure, or LOCAL_RUNNER_KILL_AT_STEP=wait-ssh",
            "    JOB_TIMEOUT_SECONDS=30",
        ]
    lines = []
    if fail:
        lines.append(
            f"  failure knob ON: LOCAL_RUNNER_FAIL_STEP={fail}: every build attempt fails at "
            f"{fail}, retries, then fails for good"
        )
    if kill:
        lines.append(
            f"  failure knob ON: LOCAL_RUNNER_KILL_AT_STEP={kill}: every attempt's runner dies "
            f"at {kill}; the worker times it out after {timeout}s of silence"
        )
        if timeout > WATCHABLE_TIMEOUT_SECONDS:
            lines.append(
                f"    (JOB_TIMEOUT_SECONDS={timeout}: start with JOB_TIMEOUT_SECONDS=30 to "
                "watch it happen)"
            )
    return lines


def _running_stack(pid_file: Path) -> int | None:
    """The pid of a stack already running, from its pid file (a live process that is still a
    run_local_stack, not a recycled pid); None if there is none."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if pid == os.getpid() or b"run_local_stack" not in cmdline or _gone(pid):
        return None
    return pid


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
