"""Settings for the server and worker processes the reliability suite starts: the project's own,
plus the local runner's knobs that only exist as settings (not environment variables)."""

import json
import os
import sys

from config.settings import *  # noqa: F403

if os.environ.get("RELIABILITY_CHAOS_RUNNER") == "1":
    # Every run goes through bench/reliability/chaos_runner.py, which may kill it at a step.
    LOCAL_RUNNER_COMMAND = [sys.executable, "-m", "bench.reliability.chaos_runner"]
LOCAL_RUNNER_EXTRA_ENV = json.loads(os.environ.get("RELIABILITY_RUNNER_EXTRA_ENV", "{}"))
