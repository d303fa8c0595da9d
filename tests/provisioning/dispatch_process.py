"""One dispatcher process for the multi-process capacity test (test_dispatch_capacity.py).

Run as `python -m tests.provisioning.dispatch_process <start_at_epoch> <rounds>` with DATABASE_URL
naming the test database. Waits until `start_at` so every process starts together, then calls
job_dispatch_due `rounds` times against an in-memory backend; prints how many jobs it took.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from provisioning import services
    from tests.fakes.runner_backend import RecordingBackend

    start_at, rounds = float(sys.argv[1]), int(sys.argv[2])
    backend = RecordingBackend()
    time.sleep(max(start_at - time.time(), 0))
    taken = sum(services.job_dispatch_due(backend=backend, limit=5) for _ in range(rounds))
    print(taken)
    return 0


if __name__ == "__main__":
    sys.exit(main())
