"""Every write to jobs goes through here: one function per move of the state machine
(provisioning/state.py), each owning its transaction and leaving a JobEvent saying who did it and
why.

  enqueue     job_enqueue, job_check_concurrent_provision, job_reprovision
  dispatch    job_dispatch_next, job_dispatch_due, job_send_cleanup (and dispatch failures)
  callbacks   job_claim, job_heartbeat, job_complete, job_fail (the workflow run's calls)
  timeouts    job_timeout_if_stale, job_timeout_stale
  operator    job_cancel, job_retry, job_redispatch, job_force_timeout
  lifecycle   agent_end
  reconcile   job_reconcile_runs, job_settle_ended_run (GitHub's webhook: a run ended
              before its report or its claim)
  finishing   run_finished_release, runs_finished_poll (a reported run's
              runner slot stays taken until GitHub says the run ended)
  alerts      operator_alerts_send (a job failed for good: email, optional webhook)
  capacity    capacity_hold_place, capacity_hold_lift (Hetzner's server limit)
  common      what several need: Run/RunRef, recording a move's event, the one fail path

Moves are conditional UPDATEs (`WHERE status IN move.sources AND <fence>`) or checks under the
row lock (`job.allows(move)`), so with concurrent callers exactly one wins and the rest change
nothing. Nothing here calls another system while holding a row lock: dispatches and
cancellations happen after commit.
"""

from provisioning.services.alerts import operator_alerts_send
from provisioning.services.callbacks import (
    job_authorize_cleanup,
    job_claim,
    job_complete,
    job_fail,
    job_heartbeat,
)
from provisioning.services.capacity import capacity_hold_lift, capacity_hold_place
from provisioning.services.common import MAX_ERROR_CHARS, Run, RunRef
from provisioning.services.dispatch import (
    dispatch_failed,
    dispatch_soon,
    job_dispatch_due,
    job_dispatch_next,
    job_send_cleanup,
)
from provisioning.services.enqueue import (
    job_check_concurrent_provision,
    job_enqueue,
    job_reprovision,
)
from provisioning.services.finishing import (
    run_finished_release,
    runs_finished_poll,
)
from provisioning.services.lifecycle import agent_end
from provisioning.services.operator import job_cancel, job_force_timeout, job_redispatch, job_retry
from provisioning.services.reconcile import (
    RECONCILE_MAX_CONSECUTIVE_ERRORS,
    job_reconcile_runs,
    job_settle_ended_run,
)
from provisioning.services.timeouts import job_timeout_if_stale, job_timeout_stale

__all__ = [
    "MAX_ERROR_CHARS",
    "RECONCILE_MAX_CONSECUTIVE_ERRORS",
    "Run",
    "RunRef",
    "agent_end",
    "capacity_hold_lift",
    "capacity_hold_place",
    "dispatch_failed",
    "dispatch_soon",
    "job_authorize_cleanup",
    "job_cancel",
    "job_check_concurrent_provision",
    "job_claim",
    "job_complete",
    "job_dispatch_due",
    "job_dispatch_next",
    "job_enqueue",
    "job_fail",
    "job_fail_if_run_ended",
    "job_force_timeout",
    "job_heartbeat",
    "job_reconcile_runs",
    "job_redispatch",
    "job_reprovision",
    "job_retry",
    "job_send_cleanup",
    "job_settle_ended_run",
    "job_timeout_if_stale",
    "job_timeout_stale",
    "operator_alerts_send",
    "run_finished_release",
    "runs_finished_poll",
]
