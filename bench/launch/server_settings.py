"""Settings for the server, the workers and the simulation process of `make launch`: the
project's own (through the reliability suite's module), with every duration of the queue divided
by the time factor LAUNCH_TIME_FACTOR (F), so a simulated hour lasts 3600 / F wall seconds.

Durations are read from the environment as usual first (production defaults unless set), then
divided. The result can be fractional (0.5 s): the services use them through timedelta and
comparisons, so sub-second values work.

Migrations are off here (MIGRATION_MODULES): the simulation builds its database from the models
with `migrate --run-syncdb`, in seconds (dj-stripe's migrations alone take ~85 s).
"""

import os

from bench.reliability.server_settings import *  # noqa: F403

TIME_FACTOR = float(os.environ.get("LAUNCH_TIME_FACTOR", "1") or 1)

# Every duration setting of the provisioning queue (those a branch has not added yet are
# skipped). Not scaled: tokens' lifetimes (judged by real clocks), Stripe's signature tolerance,
# HSTS and session ages.
SCALED_DURATIONS = (
    "HEARTBEAT_INTERVAL_SECONDS",
    "JOB_TIMEOUT_SECONDS",
    "RETRY_BACKOFF_SECONDS",
    "RETRY_BACKOFF_MAX_SECONDS",
    "DISPATCH_CLAIM_TIMEOUT_SECONDS",
    "WORKER_INTERVAL_SECONDS",
    "JOB_DEADLINE_SECONDS",
    "RECONCILE_INTERVAL_SECONDS",
    "CAPACITY_RETRY_SECONDS",
    "REAPER_GRACE_SECONDS",
    "API_BUDGET_WINDOW_SECONDS",
    "DASHBOARD_POLL_SECONDS",
    "RUN_FINISH_POLL_SECONDS",
    "RUN_FINISH_GRACE_SECONDS",
    "LIMITS_REFRESH_SECONDS",
)
for _name in SCALED_DURATIONS:
    if _name in globals():
        globals()[_name] = float(globals()[_name]) / TIME_FACTOR


class _NoMigrations:
    def __contains__(self, item: str) -> bool:
        return True

    def __getitem__(self, item: str) -> None:
        return None


MIGRATION_MODULES = _NoMigrations()
