"""The provisioning steps and the rules for failing safely.

`Runner` holds one attempt's state and runs its steps. `run_provision`, `run_deprovision` and
`run_cleanup` chain them in one process (what the local backend starts); the CLI's per-step
commands call the same methods one at a time (what the workflow's steps run).

Safety rules, in one place:
- claim refused (403/404/409 other than `dispatch_pending`): stop; nothing created or deleted;
- fenced out later (heartbeat 404/409): stop; delete only a VM this attempt created; no complete;
- any other failure: report `fail` with the step and the log's tail, then delete only a VM this
  attempt created;
- once `complete` has been sent, never delete the VM.

Deprovision (`mode: deprovision`, a deprovision job's own id): claim → delete every VM labelled
with the agent the claim names (`agent-id`, whichever job or attempt made it) → complete with
empty `server_id` and `ipv4`. The job's steps are about building a VM, so none names "deleting";
the deletion is reported as step `claim` (the most honest of them: the run has picked the job
up and is working on it; `create-server` would tell the customer their server is being created)
with `progress` rising from 10 to 90 as VMs go, and `complete` only at the end. A VM the run
cannot delete fails the job (step `claim`) with the error, so it is retried like any failure.
"""

from __future__ import annotations

import signal
from types import FrameType

from .api import ApiUnavailable
from .config import ConfigError, Settings

# The names below lived here before the split into outcomes/steps/heartbeat; the CLI, the tests
# and `from provisioning.runner import pipeline; pipeline.X` callers still find them here.
from .heartbeat import heartbeat_loop
from .outcomes import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FENCED,
    EXIT_KILLED,
    EXIT_OK,
    EXIT_REFUSED,
    Cancelled,
    ClaimRefused,
    Fenced,
    StepFailed,
)
from .state import RunState
from .steps import PROGRESS, TAIL_CHARS, Runner

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_FENCED",
    "EXIT_KILLED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "PROGRESS",
    "TAIL_CHARS",
    "Cancelled",
    "ClaimRefused",
    "Fenced",
    "Runner",
    "StepFailed",
    "heartbeat_loop",
    "install_signal_handlers",
    "preflight",
    "run_cleanup",
    "run_deprovision",
    "run_provision",
]


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGINT into Cancelled in the main thread, so the failure path runs."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops us the hard way
        raise Cancelled(f"runner received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def preflight(settings: Settings, mode: str, *, needs_cloud: bool = True) -> None:
    """Refuse to start (before claiming anything) when a needed setting is missing.

    Every mode talks to the service (cleanup too: it asks before deleting). `needs_cloud` is
    False for the claim step alone, which never calls Hetzner and so gets no Hetzner token.
    """
    settings.require("api_url", "oidc_audience", "token_request_url", "token_request_token")
    if needs_cloud:
        settings.require("hcloud_token")
    if mode == "provision" and not settings.simulate and needs_cloud:
        settings.require("ssh_key_name", "ssh_private_key_file")


# -- whole pipelines (one process) ----------------------------------------------------------
def run_provision(settings: Settings, state: RunState) -> int:
    runner = Runner(settings, state)
    try:
        try:
            runner.claim()
        except ClaimRefused as exc:
            runner.log(f"claim refused, stopping without touching any server: {exc}")
            return EXIT_REFUSED
        except (ApiUnavailable, StepFailed, ConfigError) as exc:
            runner.log(f"claim failed: {exc}")
            return EXIT_FAILED
        runner.start_heartbeat()
        try:
            runner.create_server()
            runner.wait_ssh()
            runner.configure()
            runner.health_check()
            runner.complete()
        except Fenced as exc:
            runner.stop_heartbeat()
            runner.log(f"fenced out, stopping: {exc}")
            try:
                runner.delete_own_server()
            except Exception as delete_exc:
                runner.log(f"could not delete server {state.server_id}: {delete_exc!r}")
            return EXIT_FENCED
        except Exception as exc:
            runner.stop_heartbeat()
            tail = runner.failure_tail(exc)
            runner.log(f"failed: {exc}")
            runner.finish_failure(tail)
            return EXIT_FAILED
        return EXIT_OK
    finally:
        runner.close()


def run_deprovision(settings: Settings, state: RunState) -> int:
    runner = Runner(settings, state)
    try:
        try:
            runner.claim()
        except ClaimRefused as exc:
            runner.log(f"claim refused, stopping without touching any server: {exc}")
            return EXIT_REFUSED
        except (ApiUnavailable, StepFailed, ConfigError) as exc:
            runner.log(f"claim failed: {exc}")
            return EXIT_FAILED
        runner.start_heartbeat()
        try:
            runner.delete_agent_servers()
            runner.complete()
        except Fenced as exc:
            runner.stop_heartbeat()
            runner.log(f"fenced out, stopping: {exc}")
            return EXIT_FENCED
        except Exception as exc:
            runner.stop_heartbeat()
            runner.finish_failure(runner.failure_tail(exc))
            return EXIT_FAILED
        return EXIT_OK
    finally:
        runner.close()


def run_cleanup(settings: Settings, state: RunState) -> int:
    runner = Runner(settings, state)
    try:
        runner.delete_job_servers()
    except ClaimRefused as exc:
        runner.log(f"{exc}; deleting nothing")
        return EXIT_REFUSED
    except Exception as exc:
        runner.log(f"cleanup failed: {runner.failure_tail(exc)}")
        return EXIT_FAILED
    finally:
        runner.close()
    return EXIT_OK
