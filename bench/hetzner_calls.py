"""Hetzner API requests per build: the real runner CLI (`run --mode provision`) against the
loopback Hetzner fake and a fake of our callback API, for several create-action durations.

    .venv/bin/python bench/hetzner_calls.py [--poll 0.1] [--actions 0,5,10,20]

Time is scaled: an action of N seconds at RUNNER_HCLOUD_POLL_SECONDS=1 is run as N x poll
seconds at `--poll`, so the polls land where they would. Prints, per duration, the count the
runner reported in its `complete` body and the requests the fake saw (they must be equal). The
VM's configuration is simulated; a build makes no other Hetzner requests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.hetzner import FakeHetzner  # noqa: E402
from tests.runner.conftest import (  # noqa: E402
    AUDIENCE,
    REQUEST_TOKEN,
    FakeCallbackApi,
    run_runner,
)


def one_build(*, action_seconds: float, poll: float) -> tuple[int, int]:
    """(the count the runner reported, the requests the fake saw) for one provision."""
    api = FakeCallbackApi()
    api.thread.start()
    try:
        with (
            FakeHetzner(action_seconds=action_seconds, ssh_keys=("bench",)) as fake,
            tempfile.TemporaryDirectory() as tmp,
        ):
            env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG"}}
            env |= {
                "PYTHONPATH": str(ROOT),
                "PROVISIONING_API_URL": api.base_url,
                "PROVISIONING_OIDC_AUDIENCE": AUDIENCE,
                "ACTIONS_ID_TOKEN_REQUEST_URL": f"{api.base_url}/token?api-version=2.0",
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
                "HCLOUD_TOKEN": "bench",
                "HCLOUD_API_ENDPOINT": fake.url,
                "RUNNER_SSH_KEY_NAME": "bench",
                "RUNNER_SIMULATE": "1",
                "RUNNER_STEP_SECONDS": "0.1",
                "RUNNER_HEARTBEAT_SECONDS": "1",
                "RUNNER_HCLOUD_POLL_SECONDS": str(poll),
                "RUNNER_TEMP": tmp,
            }
            job = str(uuid.uuid4())
            result = run_runner(
                env, "run", "--mode", "provision", "--job-id", job, "--attempt", "1"
            )
            if result.returncode != 0:
                raise SystemExit(f"the build failed:\n{result.stderr}")
            [complete] = api.of("complete")
            return int(complete.body["hetzner_calls"]), len(fake.requests)
    finally:
        api.httpd.shutdown()
        api.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll", type=float, default=0.1, help="seconds standing for 1 s")
    parser.add_argument("--actions", default="0,5,10,20", help="create durations, in polls")
    args = parser.parse_args()
    print("| create takes (x poll interval) | reported hetzner_calls | requests the fake saw |")
    print("| --- | --- | --- |")
    for raw in args.actions.split(","):
        polls = float(raw)
        reported, seen = one_build(action_seconds=polls * args.poll, poll=args.poll)
        print(f"| {polls:g} | {reported} | {seen} |")


if __name__ == "__main__":
    main()
