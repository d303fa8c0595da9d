"""The job state machine: four states, and every named move between them.

A move is the one thing a service does to a job: its action (the JobEvent it leaves), the states
it may start from, and the state it leaves the job in. Services filter their conditional UPDATE
on `move.sources`, write `move.target`, and record the event from the move; the admin offers an
action only where its move applies; pages and the API ask the job (`job.allows(RETRY)`) instead
of comparing status strings. Nothing else writes `status`.

```
enqueue ──► queued ──claim──► provisioning ──complete──► running           (terminal)
             ▲  ▲               │  ▲ heartbeat (step, progress)
             │  │               │  └─┘
             │  └─requeue───────┤ fail / timeout while retry_count < max_retries:
             │                  │   retry_count+1, attempt+1, next_attempt_at = now + backoff
             │                  │ capacity (Hetzner server limit): attempt+1, no retry spent
             │                  └─fail / timeout, retries spent ──► failed   (an operator's turn)
             └──── retry (failed → queued: attempt+1, retry_count 0, completed_at cleared)
   cancel: queued | provisioning → failed (step `cancelled`)
```

This module imports nothing from the rest of the project, so models, services, admin and
templates can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import models


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"  # waiting for a runner (first try or a retry)
    PROVISIONING = "provisioning", "Provisioning"  # claimed by one workflow run; heartbeats flow
    RUNNING = "running", "Running"  # done: the agent's VM is up (or, for a deprovision, gone)
    FAILED = "failed", "Failed"  # out of retries or cancelled: an operator's turn


class EventAction(models.TextChoices):
    """What a JobEvent records (JobEvent.Action). Every move names one; NOTE is not a move."""

    ENQUEUE = "enqueue", "Enqueued"
    DISPATCH = "dispatch", "Dispatched"
    DISPATCH_FAILED = "dispatch_failed", "Dispatch failed"
    CLAIM = "claim", "Claimed"
    STEP = "step", "Step started"
    COMPLETE = "complete", "Completed"
    FAIL = "fail", "Failed"
    REQUEUE = "requeue", "Requeued for retry"
    TIMEOUT = "timeout", "Timed out"
    CANCEL = "cancel", "Cancelled"
    RETRY = "retry", "Retried by operator"
    REDISPATCH = "redispatch", "Re-dispatch requested"
    CLEANUP = "cleanup", "Cleanup run sent"
    CAPACITY_WAIT = "capacity_wait", "Waiting for server capacity"
    NOTE = "note", "Note"  # an operator- or system-written remark (the reaper's): not a move


@dataclass(frozen=True)
class Move:
    """One named move of the state machine."""

    name: str
    action: str  # the JobEvent.action it records
    sources: frozenset[str]  # the states it may start from (empty: it creates the job)
    target: str  # the state it leaves the job in

    @property
    def changes_status(self) -> bool:
        """False for moves that keep the state (dispatch, heartbeat): their events name no from → to."""
        return self.target not in self.sources

    @property
    def creates(self) -> bool:
        """True for the move that makes the job: there is no state before it."""
        return not self.sources

    def allows(self, status: str) -> bool:
        return status in self.sources

    def event_statuses(self, was: str) -> tuple[str, str]:
        """The (from_status, to_status) its JobEvent records, starting from `was`.

        Blank for moves that keep the state (their events name no from → to); a creating move
        starts from nothing (`was` is "").
        """
        if not self.changes_status:
            return "", ""
        return was, self.target

    def __str__(self) -> str:
        return self.name


_Q, _P, _R, _F = JobStatus.QUEUED, JobStatus.PROVISIONING, JobStatus.RUNNING, JobStatus.FAILED

# --- creation -------------------------------------------------------------------------------
ENQUEUE = Move("enqueue", EventAction.ENQUEUE, frozenset(), _Q)
# --- the dispatcher (server side) -----------------------------------------------------------
DISPATCH = Move("dispatch", EventAction.DISPATCH, frozenset({_Q}), _Q)
DISPATCH_FAILED = Move("dispatch_failed", EventAction.DISPATCH_FAILED, frozenset({_Q}), _Q)
CLEANUP = Move("cleanup", EventAction.CLEANUP, frozenset({_F}), _F)
# --- the workflow run's callbacks -----------------------------------------------------------
CLAIM = Move("claim", EventAction.CLAIM, frozenset({_Q}), _P)
HEARTBEAT = Move("heartbeat", EventAction.STEP, frozenset({_P}), _P)
COMPLETE = Move("complete", EventAction.COMPLETE, frozenset({_P}), _R)
# --- the one fail path: the run's report, reconciliation, a timeout --------------------------
FAIL_REQUEUE = Move("fail_requeue", EventAction.FAIL, frozenset({_P}), _Q)  # retries left
FAIL = Move("fail", EventAction.FAIL, frozenset({_P}), _F)  # retries spent
TIMEOUT_REQUEUE = Move("timeout_requeue", EventAction.TIMEOUT, frozenset({_P}), _Q)
TIMEOUT = Move("timeout", EventAction.TIMEOUT, frozenset({_P}), _F)
# The run found the Hetzner project at its server limit: not the job's fault, so back to queued
# with a new attempt (fencing the old run) and no retry spent; builds wait for capacity.
CAPACITY_REQUEUE = Move("capacity_requeue", EventAction.CAPACITY_WAIT, frozenset({_P}), _Q)
# --- operators (and the customer's "try again") ---------------------------------------------
CANCEL = Move("cancel", EventAction.CANCEL, frozenset({_Q, _P}), _F)
RETRY = Move("retry", EventAction.RETRY, frozenset({_F}), _Q)
REDISPATCH = Move("redispatch", EventAction.REDISPATCH, frozenset({_Q}), _Q)

MOVES: tuple[Move, ...] = (
    ENQUEUE,
    DISPATCH,
    DISPATCH_FAILED,
    CLEANUP,
    CLAIM,
    HEARTBEAT,
    COMPLETE,
    FAIL_REQUEUE,
    FAIL,
    TIMEOUT_REQUEUE,
    TIMEOUT,
    CAPACITY_REQUEUE,
    CANCEL,
    RETRY,
    REDISPATCH,
)

# Derived, never written by hand: which state may become which.
TRANSITIONS: dict[str, frozenset[str]] = {
    status: frozenset(m.target for m in MOVES if m.allows(status) and m.changes_status)
    for status in JobStatus.values
}

# States in which a job still has work ahead of it (anything that can be claimed or is claimed).
ACTIVE_STATUSES: tuple[str, ...] = (JobStatus.QUEUED, JobStatus.PROVISIONING)


def can_transition(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


def fail_move(*, timeout: bool, retries_left: bool) -> Move:
    """The one fail path's outcome: a reported failure or a timeout, requeued while retries are
    left, otherwise failed for good."""
    if timeout:
        return TIMEOUT_REQUEUE if retries_left else TIMEOUT
    return FAIL_REQUEUE if retries_left else FAIL
