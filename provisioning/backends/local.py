"""Run the workflow's runner code as a local subprocess (``make run``, end-to-end tests).

A "run" is ``python -m provisioning.runner run --mode ... --job-id ... --attempt ...`` with the
environment a workflow step would have: the API URL, an OIDC token request URL pointing at the
development issuer (``provisioning.localdev.oidc_issuer``), a fake Hetzner endpoint, and
``RUNNER_SIMULATE=1`` so the VM's configuration is simulated.

Runs are tracked per process (``{run_id: Popen}``). Each run also leaves ``<run_id>.pid`` beside
its log, so another process (the worker cancelling a run the web process started) can still
stop it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from django.conf import settings

from provisioning.backends.base import MODES, DispatchError, DispatchResult, RunStatus

logger = logging.getLogger(__name__)

# What a GitHub-hosted runner step inherits from the machine; everything else (Django's secret
# key, Stripe keys, ...) stays out of the runner, as it would on GitHub.
INHERITED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "SSL_CERT_FILE",
    "COVERAGE_PROCESS_START",
)
MAX_FINISHED_RUNS = 500  # finished runs remembered for get_run
TERMINATE_GRACE_SECONDS = 10.0


@dataclass
class _LocalRun:
    run_id: str
    job_id: str
    attempt: int
    mode: str
    process: subprocess.Popen[bytes]
    log_path: Path
    pid_path: Path
    state_dir: Path
    started_at: float = field(default_factory=time.time)
    cancelled: bool = False

    def status(self) -> RunStatus:
        code = self.process.poll()
        if code is None:
            return RunStatus(run_id=self.run_id, status="in_progress", conclusion=None)
        conclusion = "cancelled" if self.cancelled else "success" if code == 0 else "failure"
        return RunStatus(run_id=self.run_id, status="completed", conclusion=conclusion)


class LocalBackend:
    """Starts the runner as a detached child process per dispatch."""

    name = "local"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _LocalRun] = {}

    # -- configuration -----------------------------------------------------------------------------

    def _command(self) -> list[str]:
        override = settings.LOCAL_RUNNER_COMMAND
        if override:
            return [str(part) for part in override]
        return [sys.executable, "-m", "provisioning.runner"]

    def _log_dir(self) -> Path:
        return Path(settings.LOCAL_RUNNER_LOG_DIR)

    def _environment(self, *, run_id: str, state_dir: Path) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        issuer_url = settings.LOCAL_OIDC_ISSUER_URL.rstrip("/")
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "GITHUB_RUN_ID": run_id,
                "GITHUB_RUN_ATTEMPT": "1",
                "GITHUB_REPOSITORY": settings.GITHUB_REPOSITORY,
                "PROVISIONING_API_URL": settings.PUBLIC_BASE_URL,
                "PROVISIONING_OIDC_AUDIENCE": settings.PROVISIONING_OIDC_AUDIENCE,
                "ACTIONS_ID_TOKEN_REQUEST_URL": f"{issuer_url}/token?run_id={run_id}&run_attempt=1",
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN": settings.LOCAL_OIDC_REQUEST_TOKEN,
                "HCLOUD_TOKEN": "local-fake-token",
                "HCLOUD_API_ENDPOINT": settings.LOCAL_HETZNER_URL,
                "RUNNER_SIMULATE": "1",
                "RUNNER_HEARTBEAT_SECONDS": str(settings.LOCAL_RUNNER_HEARTBEAT_SECONDS),
                "RUNNER_STEP_SECONDS": str(settings.LOCAL_RUNNER_STEP_SECONDS),
                "RUNNER_TEMP": str(state_dir),
                "RUNNER_STATE_FILE": str(state_dir / "provision-state.json"),
            }
        )
        for setting_name, env_name in (
            ("LOCAL_RUNNER_FAIL_STEP", "RUNNER_FAIL_STEP"),
            ("LOCAL_RUNNER_KILL_AT_STEP", "RUNNER_KILL_AT_STEP"),
        ):
            value = getattr(settings, setting_name)
            if value:
                env[env_name] = str(value)
        # Anything else a test or developer wants the runner to see (e.g. faster retries).
        for name, value in dict(settings.LOCAL_RUNNER_EXTRA_ENV or {}).items():
            env[str(name)] = str(value)
        return env

    # -- RunnerBackend -----------------------------------------------------------------------------

    def dispatch(self, *, job_id: UUID, attempt: int, mode: str) -> DispatchResult:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self._reap()
        # GitHub run ids are 10-11 digit numbers; mimic them so nothing assumes small ints.
        run_id = str(10_000_000_000 + secrets.randbelow(90_000_000_000))
        log_dir = self._log_dir()
        argv = [
            *self._command(),
            "run",
            "--mode",
            mode,
            "--job-id",
            str(job_id),
            "--attempt",
            str(attempt),
        ]
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            state_dir = Path(tempfile.mkdtemp(prefix=f"runner-{run_id}-"))
            log_path = log_dir / f"{run_id}.log"
            with log_path.open("ab") as log:
                log.write(f"# run {run_id}: {' '.join(argv)}\n".encode())
                log.flush()
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(run_id=run_id, state_dir=state_dir),
                    cwd=str(settings.BASE_DIR),
                    start_new_session=True,  # its own process group: cancel stops all of it
                    close_fds=True,
                )
        except OSError as exc:
            raise DispatchError(f"could not start the local runner: {exc}") from exc

        pid_path = log_dir / f"{run_id}.pid"
        pid_path.write_text(f"{process.pid} {job_id}\n")
        run = _LocalRun(
            run_id=run_id,
            job_id=str(job_id),
            attempt=attempt,
            mode=mode,
            process=process,
            log_path=log_path,
            pid_path=pid_path,
            state_dir=state_dir,
        )
        with self._lock:
            self._runs[run_id] = run
        # Wait for the child in the background so it never lingers as a zombie.
        threading.Thread(
            target=self._wait_for, args=(run,), name=f"local-run-{run_id}", daemon=True
        ).start()
        logger.info(
            "local run %s started for job %s attempt %s (%s), log %s",
            run_id,
            job_id,
            attempt,
            mode,
            log_path,
        )
        return DispatchResult(run_id=run_id)

    def _wait_for(self, run: _LocalRun) -> None:
        code = run.process.wait()
        logger.info("local run %s exited with %s", run.run_id, code)
        run.pid_path.unlink(missing_ok=True)
        shutil.rmtree(run.state_dir, ignore_errors=True)

    def _reap(self) -> None:
        """Forget the oldest finished runs beyond MAX_FINISHED_RUNS."""
        with self._lock:
            finished = [r for r in self._runs.values() if r.process.poll() is not None]
            excess = len(finished) - MAX_FINISHED_RUNS
            if excess > 0:
                for run in sorted(finished, key=lambda r: r.started_at)[:excess]:
                    del self._runs[run.run_id]

    def cancel_run(self, *, run_id: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
        if run is not None:
            if run.process.poll() is not None:
                return  # already finished
            run.cancelled = True
            _terminate_group(run.process.pid)
            # Don't block the caller (an admin request, the worker's tick) on the runner's
            # own cleanup; kill it later if it ignores SIGTERM.
            timer = threading.Timer(TERMINATE_GRACE_SECONDS, _kill_if_running, args=(run.process,))
            timer.daemon = True
            timer.start()
            return
        self._cancel_foreign(run_id)

    def _cancel_foreign(self, run_id: str) -> None:
        """A run another process started: stop it by its pid file, if it's still that run."""
        pid_path = self._log_dir() / f"{run_id}.pid"
        try:
            pid_text, _, job_id = pid_path.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return  # unknown or finished: nothing to cancel
        if not _is_our_runner(pid, job_id):
            pid_path.unlink(missing_ok=True)
            return
        logger.info("cancelling local run %s (pid %s) started by another process", run_id, pid)
        _terminate_group(pid)

    def get_run(self, *, run_id: str) -> RunStatus | None:
        with self._lock:
            run = self._runs.get(run_id)
        if run is not None:
            return run.status()
        return self._foreign_status(run_id)

    def _foreign_status(self, run_id: str) -> RunStatus | None:
        """A run another process started: in progress while its process lives, else unknown."""
        pid_path = self._log_dir() / f"{run_id}.pid"
        try:
            pid_text, _, job_id = pid_path.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if not _is_our_runner(pid, job_id):
            return None
        return RunStatus(run_id=run_id, status="in_progress", conclusion=None)

    def find_run(self, *, job_id: UUID, attempt: int, mode: str = "provision") -> str | None:
        return None  # dispatch always knows the run id

    def run_url(self, *, run_id: str) -> str | None:
        return None

    # -- for tests and shutdown ------------------------------------------------------------------

    def log_path(self, *, run_id: str) -> Path | None:
        with self._lock:
            run = self._runs.get(run_id)
        return run.log_path if run else None

    def wait(self, *, run_id: str, timeout: float | None = None) -> int | None:
        """Block until the run exits; its exit code (None if unknown)."""
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            return None
        return run.process.wait(timeout=timeout)

    def terminate_all(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            if run.process.poll() is None:
                self.cancel_run(run_id=run.run_id)


def _terminate_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        logger.warning("not allowed to signal local run process group %s", pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _kill_if_running(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        _kill_group(process.pid)


def _is_our_runner(pid: int, job_id: str) -> bool:
    """Guards against pid reuse: the process must still carry the job id on its command line."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return job_id.encode() in args
