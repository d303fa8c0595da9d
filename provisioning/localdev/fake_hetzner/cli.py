"""The fake as a process: ``python -m provisioning.localdev.fake_hetzner --port 8701``."""

from __future__ import annotations

import argparse
import signal
import threading

from provisioning.localdev.fake_hetzner.api import FakeHetzner


def main(argv: list[str] | None = None) -> int:
    # The prog is named as when this was a single module, so `--help` reads as it always did
    # (under `-m`, argparse would otherwise say `__main__.py`).
    parser = argparse.ArgumentParser(
        prog="fake_hetzner.py", description="Loopback fake of the Hetzner Cloud API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--token", default=None, help="accept only this bearer token")
    parser.add_argument(
        "--action-seconds", type=float, default=1.0, help="how long each action runs"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument(
        "--state-file", default=None, help="keep servers in this JSON file across restarts"
    )
    parser.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        help="an SSH key name the project has (repeatable; agent-provisioning-local always)",
    )
    parser.add_argument("--server-limit", type=int, default=100, help="the project's limit")
    args = parser.parse_args(argv)
    fake = FakeHetzner(
        host=args.host,
        port=args.port,
        token=args.token,
        action_seconds=args.action_seconds,
        verbose=args.verbose,
        ssh_keys=("agent-provisioning-local", *args.ssh_key),
        server_limit=args.server_limit,
        state_file=args.state_file,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with fake:
        print(f"fake Hetzner API listening on http://{args.host}:{fake.port}/v1", flush=True)
        stop.wait()
    return 0
