"""`Runner`: one attempt's state and its steps (claim, create-server, wait-ssh, configure,
health-check, complete, the deletions) plus the failure path that cleans up after them.

The safety rules these steps follow are listed in `pipeline`'s docstring; the functions there
chain the steps in one process, the CLI's per-step commands call them one at a time.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

from . import remote
from .api import ApiError, ApiUnavailable, CallbackApi
from .config import ConfigError, Settings, private_temp_dir
from .heartbeat import heartbeat_loop
from .hetzner import CapacityExhausted, Cloud, Vm
from .outcomes import EXIT_KILLED, Cancelled, ClaimRefused, Fenced, StepFailed
from .state import RunState

TAIL_CHARS = 3000

PROGRESS = {
    "claim": 5,
    "create-server": 20,
    "wait-ssh": 50,
    "configure": 60,
    "health-check": 90,
    "complete": 100,
}


class Runner:
    """`sleep` and `clock` pace every wait (simulated steps, SSH and health polling, Hetzner
    polling, API retries); the defaults are real time, tests pass a fake clock. Left at None,
    `sleep` waits on the fence event, so a refused heartbeat ends the wait at once."""

    def __init__(
        self,
        settings: Settings,
        state: RunState,
        *,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.state = state
        self._pause = sleep
        self._clock = clock
        self._step_lines: deque[str] = deque(maxlen=400)
        self._fenced = threading.Event()
        self._fence_reason = ""
        self._api: CallbackApi | None = None
        self._cloud: Cloud | None = None
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._workdir: Path | None = None

    # -- plumbing -------------------------------------------------------------------------
    def log(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {self.state.step}: {message}"
        self._step_lines.append(line)
        print(line, file=sys.stderr, flush=True)

    @property
    def api(self) -> CallbackApi:
        if self._api is None:
            self._api = CallbackApi(
                self.settings,
                self.state.job_id,
                log=self.log,
                sleep=self._pause or time.sleep,
                clock=self._clock,
            )
        return self._api

    @property
    def cloud(self) -> Cloud:
        if self._cloud is None:
            self._cloud = Cloud(
                self.settings,
                sleep=self._pause or time.sleep,
                clock=self._clock,
                on_request=self.state.count_hetzner_call,
                log=self.log,
            )
        return self._cloud

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = private_temp_dir()
        return self._workdir

    @property
    def known_hosts(self) -> Path:
        """The VM's host key, beside the state file ($RUNNER_TEMP in a workflow run).

        Each workflow step is its own process with its own workdir: a known_hosts there would be
        forgotten after wait-ssh, and configure would accept whatever key it met next. Beside the
        state file, the key wait-ssh learned is the only one later steps trust.
        """
        return self.settings.state_file.with_name(
            self.settings.state_file.stem.lstrip(".") + ".known_hosts"
        )

    def close(self) -> None:
        self.stop_heartbeat()
        if self._api is not None:
            self._api.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def checkpoint(self) -> None:
        """Raise Fenced if the heartbeat (thread or separate process) was refused."""
        reason = self._fence_reason if self._fenced.is_set() else self.state.fenced_reason()
        if reason:
            raise Fenced(reason)

    def sleep(self, seconds: float) -> None:
        if self._pause is None:
            self._fenced.wait(seconds)
        else:
            self._pause(seconds)
        self.checkpoint()

    def enter_step(self, step: str, progress: int | None = None) -> None:
        if self.settings.kill_at_step == step:
            print(f"RUNNER_KILL_AT_STEP={step}: exiting abruptly", file=sys.stderr, flush=True)
            os._exit(EXIT_KILLED)
        self._step_lines.clear()
        self.state.set_step(step, PROGRESS[step] if progress is None else progress)
        self.log(f"starting (progress {self.state.progress})")
        if step not in ("claim", "complete"):
            self.checkpoint()
            self._beat_now()

    def _beat_now(self) -> None:
        """One synchronous heartbeat, so the service sees each step as it starts."""
        step, progress = self.state.snapshot()
        try:
            self.api.heartbeat(step, progress)
        except ApiError as exc:
            if exc.is_fenced:
                self._set_fenced(str(exc))
                self.checkpoint()
            self.log(f"heartbeat refused: {exc}")
        except ApiUnavailable as exc:
            self.log(f"heartbeat got no answer: {exc}")

    def _set_fenced(self, reason: str) -> None:
        self._fence_reason = reason
        self._fenced.set()
        self.state.mark_fenced(reason)

    def _fail_knob(self, step: str, message: str) -> None:
        if self.settings.fail_step == step:
            raise StepFailed(message)

    def failure_tail(self, exc: BaseException) -> str:
        text = "\n".join(self._step_lines)
        if isinstance(exc, StepFailed | Fenced | Cancelled | ConfigError | ApiError):
            detail = str(exc)
        else:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return f"{text}\n{detail}".strip()[-TAIL_CHARS:]

    # -- heartbeat loop -------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        self._heartbeat_stop.clear()
        self._heartbeat_thread = threading.Thread(
            target=heartbeat_loop,
            kwargs={
                "settings": self.settings,
                "job_id": self.state.job_id,
                "read": lambda: (*self.state.snapshot(), self.state.complete_sent),
                "on_fenced": self._set_fenced,
                "stop": self._heartbeat_stop,
                "log": self.log,
            },
            name="heartbeat",
            daemon=True,
        )
        self._heartbeat_thread.start()

    def stop_heartbeat(self) -> None:
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=self.settings.http_timeout_seconds + 5)
            self._heartbeat_thread = None

    # -- steps ----------------------------------------------------------------------------
    def claim(self) -> None:
        self.enter_step("claim")
        self._fail_knob("claim", "claim: OIDC token request answered HTTP 500")
        try:
            job = self.api.claim(self.state.attempt)
        except ApiError as exc:
            raise ClaimRefused(str(exc)) from exc
        if int(job.get("attempt", self.state.attempt)) != self.state.attempt:
            raise ClaimRefused(f"claim answered for attempt {job.get('attempt')}")
        kind = job.get("kind")
        if kind and kind != self.state.mode:
            # Never build what should be deleted, or delete what should be built.
            raise ClaimRefused(f"the job is a {kind} job, but this run's mode is {self.state.mode}")
        self.state.claimed = True
        self.state.region = job.get("region") or "us-east"
        agent = job.get("agent") or {}
        self.state.agent = {"id": str(agent.get("id", "")), "name": str(agent.get("name", ""))}
        self.state.save()
        self.log(f"claimed attempt {self.state.attempt} (region {self.state.region})")

    def create_server(self) -> Vm:
        self.enter_step("create-server")

        def record(vm: Vm) -> None:
            self.state.server_id, self.state.server_name = vm.id, vm.name
            self.state.created_by_this_attempt = True
            self.state.location = vm.location
            self.state.set_progress(30)
            self.log(f"created server {vm.name} ({vm.id}) in {vm.location}")

        try:
            vm, ours = self.cloud.find_or_create(
                job_id=self.state.job_id,
                attempt=self.state.attempt,
                region=self.state.region or "us-east",
                agent_id=str((self.state.agent or {}).get("id") or ""),
                on_created=record,
            )
        except CapacityExhausted:
            self.state.capacity_exhausted = True
            self.state.save()
            raise
        if not ours:
            self.log(
                f"adopted server {vm.name} ({vm.id}) made by attempt {vm.labels.get('attempt')}"
            )
        self.state.server_id, self.state.server_name = vm.id, vm.name
        self.state.created_by_this_attempt = ours
        self.state.location = vm.location
        self.state.save()
        self._fail_knob(
            "create-server",
            f"Action create_server for server {vm.id} failed: action_failed: "
            f"server could not be started (host maintenance in {vm.location})",
        )
        vm = self.cloud.wait_running(vm.id, timeout=300, checkpoint=self.checkpoint, known=vm)
        self.state.ipv4 = vm.ipv4
        self.state.set_progress(40)
        self.log(f"server {vm.name} is running at {vm.ipv4}")
        return vm

    def wait_ssh(self) -> None:
        self.enter_step("wait-ssh")
        ip = self._ip()
        if self.settings.simulate:
            self._simulate(
                "wait-ssh",
                50,
                55,
                [f"connecting to {ip}:22", "connection refused; retrying", "ssh login works"],
                f"ssh: connect to host {ip} port 22: Connection timed out "
                f"(gave up after {self.settings.ssh_timeout_seconds:.0f}s)",
            )
            return
        self._fail_knob("wait-ssh", f"ssh: connect to host {ip} port 22: Connection timed out")
        remote.wait_ssh(
            self.settings,
            ip,
            self.known_hosts,
            sleep=self.sleep,
            log=self.log,
            clock=self._clock,
        )

    def configure(self) -> None:
        self.enter_step("configure")
        ip = self._ip()
        if self.settings.simulate:
            self._simulate(
                "configure",
                60,
                85,
                [
                    "TASK [Create the agent user] changed",
                    "TASK [Install the Python runtime] changed",
                    "TASK [Install the agent service unit] changed",
                    "TASK [Start the agent service] changed",
                ],
                f"TASK [Install the Python runtime] ***\n"
                f'fatal: [{ip}]: FAILED! => {{"changed": false, "msg": "Failed to update apt '
                f"cache: E:Failed to fetch http://mirror.hetzner.com/ubuntu/packages/dists/noble/"
                f'InRelease  503  Service Unavailable"}}\n'
                f"PLAY RECAP ***\n{ip} : ok=3 changed=2 unreachable=0 failed=1 skipped=0",
            )
            return
        self._fail_knob("configure", f"fatal: [{ip}]: FAILED! => ansible run refused")
        agent = self.state.agent or {}
        remote.configure(
            self.settings,
            ip,
            self.known_hosts,
            {
                "agent_name": agent.get("name") or "agent",
                "agent_id": agent.get("id") or "",
                "job_id": self.state.job_id,
                "agent_health_port": str(self.settings.health_port),
            },
            self.workdir,
            on_task=lambda n: self.state.set_progress(min(85, 60 + 2 * n)),
            log=self.log,
            checkpoint=self.checkpoint,
        )

    def health_check(self) -> None:
        self.enter_step("health-check")
        ip = self._ip()
        url = f"http://{ip}:{self.settings.health_port}/healthz"
        if self.settings.simulate:
            self._simulate(
                "health-check",
                90,
                95,
                [f"GET {url}: connection refused", f"GET {url}: 200 ok"],
                f'GET {url}: HTTP 503 {{"status": "starting"}} after 60 tries',
            )
            return
        self._fail_knob("health-check", f"GET {url}: HTTP 503 after 60 tries")
        remote.health_check(self.settings, ip, sleep=self.sleep, log=self.log, clock=self._clock)

    def complete(self) -> None:
        self.enter_step("complete")
        self.checkpoint()
        self._fail_knob("complete", "could not report completion: connection reset by peer")
        deprovision = self.state.mode == "deprovision"
        server_id = "" if deprovision else (self.state.server_id or "")
        ipv4 = "" if deprovision else (self.state.ipv4 or "")
        # From here on the service may consider the VM delivered: never delete it.
        self.state.complete_sent = True
        self.state.save()
        self.stop_heartbeat()
        try:
            self.api.complete(
                server_id=server_id,
                ipv4=ipv4,
                server_name=None if deprovision else self.state.server_name,
                hetzner_calls=self.state.hetzner_calls,
            )
        except ApiError as exc:
            if exc.is_fenced:
                raise Fenced(str(exc)) from exc
            raise
        self.state.completed = True
        self.state.save()
        self.log(f"reported complete ({self._hetzner_calls_text()})")

    def delete_job_servers(self) -> list[Vm]:
        """Cleanup: remove every VM labelled with this job id, once the service approves.

        Only the cleanup run the service dispatched for a failed, claimed provision is approved;
        any other run (a hand-made dispatch, a provision run) is refused and deletes nothing.
        """
        try:
            answer = self.api.authorize_cleanup()
        except ApiError as exc:
            raise ClaimRefused(f"the service refused the cleanup: {exc}") from exc
        expected = f"job-id={self.state.job_id}"
        if answer.get("approved") is not True or answer.get("label_selector") != expected:
            raise ClaimRefused(f"the service did not approve deleting {expected}: {answer}")
        self.log(f"cleanup approved by the service for {expected}")
        deleted = self.cloud.delete_job_servers(self.state.job_id)
        for vm in deleted:
            self.log(f"deleted server {vm.name} ({vm.id}) in {vm.location}")
        if not deleted:
            self.log("no servers labelled with this job")
        return deleted

    def delete_agent_servers(self) -> list[Vm]:
        """Deprovision: remove every VM labelled with the claimed agent, reporting progress.

        The step stays `claim` (see `pipeline`'s docstring); each deletion moves `progress` and
        is sent at once, so operators watch it happen. Fenced out: stop before the next delete.
        """
        agent_id = str((self.state.agent or {}).get("id") or "")
        if not agent_id:
            raise StepFailed("the claim named no agent: cannot tell which servers to delete")
        self.checkpoint()
        self.state.set_progress(10)
        self._beat_now()
        servers = self.cloud.find_agent_servers(agent_id)
        self.log(f"{len(servers)} server(s) labelled with agent {agent_id}")
        deleted: list[Vm] = []
        for index, vm in enumerate(servers, start=1):
            self.checkpoint()
            if self.cloud.delete(vm.id):
                deleted.append(vm)
                self.log(
                    f"deleted server {vm.name} ({vm.id}) in {vm.location}, made by job "
                    f"{vm.labels.get('job-id', '?')} attempt {vm.labels.get('attempt', '?')}"
                )
            else:
                self.log(f"server {vm.name} ({vm.id}) was already gone")
            self.state.set_progress(10 + 80 * index // len(servers))
            self._beat_now()
        if not servers:
            self.state.set_progress(90)
        return deleted

    # -- failure --------------------------------------------------------------------------
    def finish_failure(self, error: str | None) -> bool:
        """Report the failure (unless fenced or never claimed) and delete this attempt's VM.

        False if the VM could not be deleted (it stays labelled for the cleanup run).
        """
        fenced = self._fence_reason or self.state.fenced_reason()
        if self.state.claimed and not fenced and not self.state.failure_reported:
            message = (
                error
                or self.state.last_error
                or (f"the workflow stopped during step {self.state.step} (cancelled or timed out)")
            )
            try:
                self.api.fail(
                    error=message,
                    failed_step=self.state.step,
                    capacity=self.state.capacity_exhausted,
                    hetzner_calls=self.state.hetzner_calls,
                )
                self.state.failure_reported = True
                self.state.save()
                self.log(
                    (
                        f"reported the project's server limit at {self.state.step}"
                        if self.state.capacity_exhausted
                        else f"reported failure at {self.state.step}"
                    )
                    + f" ({self._hetzner_calls_text()})"
                )
            except (ApiError, ApiUnavailable, ConfigError) as exc:
                self.log(f"could not report the failure: {exc}")
        try:
            self.delete_own_server()
        except Exception as exc:
            self.log(f"could not delete server {self.state.server_id}: {exc!r}")
            return False
        return True

    def delete_own_server(self) -> None:
        state = self.state
        if not state.server_id:
            return
        if state.complete_sent:
            self.log(f"keeping server {state.server_id}: complete was already sent")
            return
        if not state.created_by_this_attempt:
            self.log(f"keeping server {state.server_id}: an earlier attempt created it")
            return
        gone = self.cloud.delete(state.server_id)
        self.log(f"deleted server {state.server_id}" if gone else "server was already gone")
        state.server_id = None
        state.created_by_this_attempt = False
        state.save()

    # -- helpers --------------------------------------------------------------------------
    def _hetzner_calls_text(self) -> str:
        return f"{self.state.hetzner_calls} Hetzner API request(s) this attempt"

    def _ip(self) -> str:
        if not self.state.ipv4:
            raise StepFailed("no server address recorded: did create-server run?")
        return self.state.ipv4

    def _simulate(self, step: str, start: int, end: int, lines: list[str], failure: str) -> None:
        ticks = max(len(lines), 1)
        for index, line in enumerate(lines, start=1):
            self.sleep(self.settings.step_seconds / ticks)
            self.log(f"(simulated) {line}")
            if self.settings.fail_step == step and index >= (ticks + 1) // 2:
                raise StepFailed(failure)
            self.state.set_progress(start + (end - start) * index // ticks)
