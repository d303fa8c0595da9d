"""`python -m bench.reliability.chaos_runner run --mode … --job-id … --attempt …`

Stands in for the runner command while chaos is on (CHAOS_DIR/enabled exists): the first run of
each job is killed at a random step (RUNNER_KILL_AT_STEP, the runner's own knob: it exits with
137 on entering that step), later provision runs with probability CHAOS_KILL_PROB. Cleanup runs
are never killed. Each decision is one line in CHAOS_DIR/decisions.log. Then it becomes the real
runner (exec), with the environment the local backend gave it.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

STEPS = ("claim", "create-server", "wait-ssh", "configure", "health-check", "complete")


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else ""


def main() -> None:
    argv = sys.argv[1:]
    chaos_dir = Path(os.environ.get("CHAOS_DIR", ""))
    mode, job_id = _arg(argv, "--mode"), _arg(argv, "--job-id")
    attempt = _arg(argv, "--attempt")
    env = dict(os.environ)
    if str(chaos_dir) not in ("", ".") and (chaos_dir / "enabled").exists() and mode == "provision":
        first = False
        try:
            fd = os.open(chaos_dir / f"first-{job_id}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            first = True
        except FileExistsError:
            pass
        prob = float(os.environ.get("CHAOS_KILL_PROB", "0.5"))
        step = random.choice(STEPS) if first or random.random() < prob else ""
        if step:
            env["RUNNER_KILL_AT_STEP"] = step
        with open(chaos_dir / "decisions.log", "a") as log:
            log.write(f"{job_id} {attempt} {'first' if first else 'later'} {step or '-'}\n")
        print(f"chaos: job {job_id} attempt {attempt}: kill at {step or 'nothing'}", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "provisioning.runner", *argv], env)  # noqa: S606


if __name__ == "__main__":
    main()
