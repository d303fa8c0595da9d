"""`python -m provisioning.runner <command>`: the whole pipeline, or one workflow step.

    run --mode provision|cleanup|deprovision --job-id <uuid> --attempt <n>
        everything in one process (the local backend); heartbeats from a thread
    claim --job-id <uuid> --attempt <n> [--mode provision|deprovision]
        the workflow's first step; writes the state file the later steps read
    heartbeat-loop          background process: heartbeats until done or fenced out
    create-server | wait-ssh | configure | health-check | complete
    delete-servers          deprovision: delete every VM labelled with the claimed agent
    fail                    `if: failure() || cancelled()`: report and delete this attempt's VM
    cleanup --job-id <uuid> delete every VM labelled with the job, once the service approves
    reap                    the scheduled reaper: list our VMs, ask the service, delete its picks

Exit codes: 0 done, 1 failed (reported), 2 bad configuration, 3 claim refused,
4 fenced out by the service, 137 RUNNER_KILL_AT_STEP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence

from . import pipeline, reap
from .config import MODES, ConfigError, Settings
from .pipeline import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FENCED,
    EXIT_OK,
    EXIT_REFUSED,
    Cancelled,
    ClaimRefused,
    Fenced,
    Runner,
)
from .state import RunState, StateMissing

STEP_COMMANDS = {
    "create-server": "create_server",
    "wait-ssh": "wait_ssh",
    "configure": "configure",
    "health-check": "health_check",
    "complete": "complete",
    "delete-servers": "delete_agent_servers",
}


def _job_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a UUID: {value!r}") from exc


def _attempt(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError("attempt starts at 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m provisioning.runner",
        description="Provision, deprovision or clean up one job's Hetzner VM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the whole pipeline in one process")
    run.add_argument("--mode", choices=MODES, default="provision")
    run.add_argument("--job-id", type=_job_id, required=True)
    run.add_argument("--attempt", type=_attempt, required=True)

    claim = commands.add_parser("claim", help="claim the job and start the state file")
    claim.add_argument("--mode", choices=("provision", "deprovision"), default="provision")
    claim.add_argument("--job-id", type=_job_id, required=True)
    claim.add_argument("--attempt", type=_attempt, required=True)

    cleanup = commands.add_parser("cleanup", help="delete every VM labelled with the job")
    cleanup.add_argument("--job-id", type=_job_id, required=True)
    cleanup.add_argument("--attempt", type=_attempt, default=1)

    commands.add_parser("reap", help="delete the managed VMs the service says may go")
    commands.add_parser("heartbeat-loop", help="send heartbeats until done or fenced out")
    for name in STEP_COMMANDS:
        commands.add_parser(name, help=f"the {name} step (reads the state file)")
    commands.add_parser("fail", help="report the failed step and delete this attempt's VM")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StateMissing as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    except Cancelled as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command
    if command == "reap":
        settings.require("hcloud_token")
        return reap.run_reap(settings)
    if command in ("run", "claim", "cleanup"):
        pipeline.preflight(
            settings,
            "cleanup" if command == "cleanup" else args.mode,
            needs_cloud=command != "claim",
        )
    if command == "run":
        # In one process the state file is optional: several local runs share a directory.
        path = str(settings.state_file) if os.environ.get("RUNNER_STATE_FILE") else None
        state = RunState(job_id=args.job_id, attempt=args.attempt, mode=args.mode, path=path)
        pipeline.install_signal_handlers()
        run = {
            "provision": pipeline.run_provision,
            "deprovision": pipeline.run_deprovision,
            "cleanup": pipeline.run_cleanup,
        }[args.mode]
        code = run(settings, state)
        print(json.dumps(_summary(state, code)), flush=True)
        return code
    if command == "cleanup":
        state = RunState(job_id=args.job_id, attempt=args.attempt, mode="cleanup")
        return pipeline.run_cleanup(settings, state)
    if command == "claim":
        return _claim(args, settings)
    if command == "heartbeat-loop":
        return _heartbeat_loop(settings)
    if command == "fail":
        return _fail(settings)
    return _step(settings, STEP_COMMANDS[command])


def _summary(state: RunState, code: int) -> dict[str, object]:
    return {
        "exit_code": code,
        "job_id": state.job_id,
        "attempt": state.attempt,
        "mode": state.mode,
        "step": state.step,
        "completed": state.completed,
        "server_id": state.server_id,
        "ipv4": state.ipv4,
        "created_by_this_attempt": state.created_by_this_attempt,
        "hetzner_calls": state.hetzner_calls,
    }


def _claim(args: argparse.Namespace, settings: Settings) -> int:
    state = RunState(
        job_id=args.job_id, attempt=args.attempt, mode=args.mode, path=str(settings.state_file)
    )
    if state.fence_marker is not None:
        state.fence_marker.unlink(missing_ok=True)
    state.save()
    pipeline.install_signal_handlers()
    runner = Runner(settings, state)
    try:
        runner.claim()
    except ClaimRefused as exc:
        state.last_error = f"claim refused: {exc}"
        state.save()
        runner.log(state.last_error)
        return EXIT_REFUSED
    except Exception as exc:
        state.last_error = runner.failure_tail(exc)
        state.save()
        runner.log(f"claim failed: {exc}")
        return EXIT_FAILED
    finally:
        runner.close()
    return EXIT_OK


def _step(settings: Settings, method: str) -> int:
    state = RunState.load(settings.state_file)
    if not state.claimed:
        print("the job was not claimed by this run: nothing to do", file=sys.stderr)
        return EXIT_FAILED
    pipeline.install_signal_handlers()
    runner = Runner(settings, state)
    try:
        step: Callable[[], object] = getattr(runner, method)
        step()
    except Fenced as exc:
        state.last_error = f"fenced out: {exc}"
        state.save()
        runner.log(state.last_error)
        return EXIT_FENCED
    except Exception as exc:
        state.last_error = runner.failure_tail(exc)
        state.save()
        runner.log(f"failed: {exc}")
        return EXIT_FAILED
    finally:
        runner.close()
    return EXIT_OK


def _fail(settings: Settings) -> int:
    try:
        state = RunState.load(settings.state_file)
    except StateMissing:
        print("no runner state: the run stopped before claiming; nothing to do", file=sys.stderr)
        return EXIT_OK
    runner = Runner(settings, state)
    try:
        if not state.claimed:
            runner.log("the job was never claimed by this run: nothing to report or delete")
            return EXIT_OK
        if state.completed:
            runner.log("the job was completed: nothing to report or delete")
            return EXIT_OK
        if not runner.finish_failure(None):
            return EXIT_FAILED
    except Exception as exc:
        runner.log(f"failure handling failed: {exc!r}")
        return EXIT_FAILED
    finally:
        runner.close()
    return EXIT_OK


def _heartbeat_loop(settings: Settings) -> int:
    state = RunState.load(settings.state_file)
    stop = threading.Event()

    def read() -> tuple[str, int, bool]:
        try:
            current = RunState.load(settings.state_file)
        except StateMissing:
            # The run's workspace is gone (the job ended, the runner was recycled): nobody is
            # working on the job any more, so beating on would only keep a dead attempt alive.
            log(f"state file {settings.state_file} is gone, stopping")
            return state.step, state.progress, True
        except ValueError:
            return state.step, state.progress, False
        done = current.complete_sent or current.failure_reported or not current.claimed
        return current.step, current.progress, done

    def log(message: str) -> None:
        print(f"heartbeat: {message}", file=sys.stderr, flush=True)

    pipeline.heartbeat_loop(
        settings=settings,
        job_id=state.job_id,
        read=read,
        on_fenced=state.mark_fenced,
        stop=stop,
        log=log,
    )
    return EXIT_OK
