"""Agents, their provisioning jobs, and the jobs' audit trail.

The state machine is written once, as named moves in provisioning/state.py; the services perform
them.
The invariants that must survive concurrent callers are database constraints, not Python checks.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q

from provisioning.state import (
    ACTIVE_STATUSES,
    EventAction,
    JobStatus,
    Move,
    can_transition,
)

__all__ = [
    "ACTIVE_STATUSES",
    "Actor",
    "Agent",
    "ApiBudget",
    "ApiCallCount",
    "CapacityHold",
    "JobEvent",
    "JobKind",
    "JobStatus",
    "OperatorAlert",
    "ProvisioningJob",
    "Region",
    "StatusLabel",
    "Step",
    "UsedTokenId",
    "WorkerBeat",
    "can_transition",
]


class JobKind(models.TextChoices):
    PROVISION = "provision", "Provision"  # build the agent's VM
    DEPROVISION = "deprovision", "Deprovision"  # delete it (subscription ended, refund, operator)


@dataclass(frozen=True)
class StatusLabel:
    """A job's state as people and dashboards read it: the stored status read with the job's kind.

    The four stored states stay the state machine's; a deprovision's `running` means its VM is
    gone, so it reads "Deleted" (never a green "Running"). `key` is the badge's style and the
    `outcome` label in /metrics; `text` is what a page shows.
    """

    key: str
    text: str


_DEPROVISION_LABELS = {
    "queued": StatusLabel("queued", "Deletion queued"),
    "provisioning": StatusLabel("deleting", "Deleting"),
    "running": StatusLabel("deleted", "Deleted"),
    "failed": StatusLabel("failed", "Deletion failed"),
}


def status_label(status: str, kind: str) -> StatusLabel:
    """The one place a job's (status, kind) becomes words: admin, customer pages and /metrics."""
    if kind == JobKind.DEPROVISION and status in _DEPROVISION_LABELS:
        return _DEPROVISION_LABELS[status]
    try:
        return StatusLabel(status, JobStatus(status).label)
    except ValueError:  # not one of the four states: say it as stored
        return StatusLabel(status, status)


class Step(models.TextChoices):
    """The only values of `step` and `failed_step`; CUSTOMER_MESSAGES says each in plain words."""

    CLAIM = "claim", "Claim"
    CREATE_SERVER = "create-server", "Create server"
    WAIT_SSH = "wait-ssh", "Wait for SSH"
    CONFIGURE = "configure", "Configure"
    HEALTH_CHECK = "health-check", "Health check"
    COMPLETE = "complete", "Complete"
    TIMEOUT = "timeout", "Timeout"  # set by the server
    DISPATCH = "dispatch", "Dispatch"  # set by the server
    CANCELLED = "cancelled", "Cancelled"  # set by the server


RUNNER_STEPS = (
    Step.CLAIM,
    Step.CREATE_SERVER,
    Step.WAIT_SSH,
    Step.CONFIGURE,
    Step.HEALTH_CHECK,
    Step.COMPLETE,
)

# What a customer reads for each step: while it is happening, and when it failed.
CUSTOMER_MESSAGES: dict[str, tuple[str, str]] = {
    Step.CLAIM: ("A build machine picked up your order.", "The build machine could not start."),
    Step.CREATE_SERVER: (
        "Creating your agent's server.",
        "Our cloud provider could not create your server.",
    ),
    Step.WAIT_SSH: (
        "Waiting for your server to boot.",
        "Your new server did not finish booting in time.",
    ),
    Step.CONFIGURE: (
        "Installing and configuring your agent.",
        "Installing the agent software on your server failed.",
    ),
    Step.HEALTH_CHECK: (
        "Checking that your agent answers.",
        "Your agent was installed but did not pass its health check.",
    ),
    Step.COMPLETE: ("Finishing up.", "We could not confirm that your agent is ready."),
    Step.TIMEOUT: ("", "The build stopped reporting progress and was stopped."),
    Step.DISPATCH: ("Waiting for a build machine.", "We could not start a build machine."),
    Step.CANCELLED: ("", "The build was cancelled by our team."),
}


def step_message(step: str | None, *, failed: bool) -> str:
    during, after = CUSTOMER_MESSAGES.get(step or "", ("Getting ready.", "Something went wrong."))
    return after if failed else during


class Region(models.TextChoices):
    US_EAST = "us-east", "US East (Ashburn)"
    US_WEST = "us-west", "US West (Hillsboro)"
    EU_CENTRAL = "eu-central", "EU Central (Germany/Finland)"
    AP_SOUTHEAST = "ap-southeast", "Asia Pacific (Singapore)"


def default_max_retries() -> int:
    return int(settings.MAX_RETRIES)


class Agent(models.Model):
    """What a customer bought: one per Stripe Checkout session (the unique key makes it so)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="agents"
    )
    name = models.CharField(max_length=64)
    region = models.CharField(max_length=32, choices=Region, default=Region.US_EAST)
    # Several Stripe events describe one purchase; this key makes them all land on one agent.
    stripe_checkout_session_id = models.CharField(
        max_length=255, unique=True, null=True, blank=True
    )
    # Indexed: refunds and disputes find their agent by the Stripe customer.
    stripe_customer_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    stripe_subscription_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    # Filled by the successful provision.
    server_id = models.CharField(max_length=64, blank=True, default="")
    server_name = models.CharField(max_length=128, blank=True, default="")
    ipv4 = models.GenericIPAddressField(protocol="IPv4", null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Set when the customer's entitlement ends (subscription deleted, refund, dispute, operator).
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        indexes = [
            # Serves the dashboard's "my agents, newest first".
            models.Index(fields=["owner", "-created_at"], name="agent_owner_newest"),
        ]
        permissions = [("end_agent", "Can end agents (deprovision their VM)")]

    def __str__(self) -> str:
        return f"{self.name} ({str(self.pk)[:8]})"

    @property
    def is_ended(self) -> bool:
        return self.ended_at is not None


class ProvisioningJob(models.Model):
    # --- what every job has: its agent and customer, state, run, retries and timestamps ---
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: job_agent_latest (agent, -created_at) serves every look-up by agent,
    # and each index is one more write per enqueue.
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="jobs", db_index=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="provisioning_jobs"
    )
    # One job per Stripe event (constraint job_stripe_event_once); null for jobs an operator or
    # the customer asked for. A constraint, not unique=True, which would add a second index for
    # LIKE searches that nothing makes (look-ups are exact).
    stripe_event_id = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001 ('' would collide)
    status = models.CharField(max_length=16, choices=JobStatus, default=JobStatus.QUEUED)
    region = models.CharField(max_length=32, choices=Region, default=Region.US_EAST)
    # Text: GitHub run ids exceed 32 bits. Reset at every dispatch (the new run's id).
    workflow_run_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001 (null: no run yet)
    retry_count = models.PositiveSmallIntegerField(default=0)
    max_retries = models.PositiveSmallIntegerField(default=default_max_retries)
    error = models.TextField(blank=True, default="")
    failed_step = models.CharField(max_length=32, choices=Step, blank=True, default="")
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # --- what fencing, progress, retries and the job kinds need ---
    kind = models.CharField(max_length=16, choices=JobKind, default=JobKind.PROVISION)
    # Fencing token: +1 on every requeue (automatic or operator). Every run call names it.
    attempt = models.PositiveIntegerField(default=1)
    # GitHub's run_attempt of the run that claimed; later calls must match it.
    run_attempt = models.PositiveIntegerField(null=True, blank=True)
    step = models.CharField(max_length=32, choices=Step, blank=True, default="")
    progress = models.PositiveSmallIntegerField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)  # backoff after a failure
    dispatched_at = models.DateTimeField(null=True, blank=True)  # last dispatch of this attempt
    # When the `mode: cleanup` run for a failed provision was sent (once), and that run's id: the
    # only run the service lets delete this job's VMs.
    cleanup_dispatched_at = models.DateTimeField(null=True, blank=True)
    cleanup_run_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001 (null: none sent)
    # When GitHub said that cleanup run ended (its webhook, else a list call): its runner slot is
    # free from then on. Null while it runs, and for backends that never say (the cleanup window
    # bounds those).
    cleanup_finished_at = models.DateTimeField(null=True, blank=True)
    # When the worker last asked the runner backend about this job's run (reconciliation).
    reconciled_at = models.DateTimeField(null=True, blank=True)
    # Hetzner API calls the run reported making (complete/fail body): what limits.py bounds the
    # builds in flight with. Null: not reported.
    hetzner_calls = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            # choices= is only checked by full_clean(); .update() would write anything.
            models.CheckConstraint(
                condition=Q(status__in=JobStatus.values), name="job_status_valid"
            ),
            models.CheckConstraint(condition=Q(kind__in=JobKind.values), name="job_kind_valid"),
            models.CheckConstraint(
                condition=Q(progress__isnull=True) | Q(progress__lte=100), name="job_progress_0_100"
            ),
            models.CheckConstraint(
                condition=Q(retry_count__lte=models.F("max_retries")),
                name="job_retries_within_max",
            ),
            # One VM build per customer at a time; a race loses here, not in Python.
            models.UniqueConstraint(
                fields=["user"],
                condition=Q(status=JobStatus.PROVISIONING),
                name="one_provisioning_job_per_user",
            ),
            models.UniqueConstraint(fields=["stripe_event_id"], name="job_stripe_event_once"),
            # An agent is never built twice at once (double-clicked re-provision, operator + customer).
            models.UniqueConstraint(
                fields=["agent"],
                condition=Q(status__in=[JobStatus.QUEUED, JobStatus.PROVISIONING]),
                name="one_active_job_per_agent",
            ),
        ]
        indexes = [
            # The stale sweep (selectors.job_list_stale): in-flight rows only. On created_at, which
            # no heartbeat changes (updates stay HOT), and which follows the rows' order on disk:
            # on `id` (random) the planner rightly preferred job_status_newest's range instead.
            models.Index(
                fields=["-created_at"],
                condition=Q(status=JobStatus.PROVISIONING),
                name="job_in_flight_newest",
            ),
            # Dispatch (selectors.job_list_due): queued rows in FIFO order.
            models.Index(
                fields=["created_at"], condition=Q(status=JobStatus.QUEUED), name="job_queued_fifo"
            ),
            # Dispatch (selectors.job_list_due, job_list_waiting): jobs waiting for capacity in
            # dispatch order, deprovisions first. Dispatched rows (runs in flight or waiting in
            # GitHub's queue) are left out, so the due query does not walk them.
            models.Index(
                fields=["kind", "created_at", "id"],
                condition=Q(status=JobStatus.QUEUED, dispatched_at__isnull=True),
                name="job_waiting_by_kind",
            ),
            # Re-sends: dispatched runs nobody claimed, oldest dispatch first.
            models.Index(
                fields=["dispatched_at"],
                condition=Q(status=JobStatus.QUEUED, dispatched_at__isnull=False),
                name="job_dispatched_unclaimed",
            ),
            # "Is there an older queued job of this user?" inside the due query.
            models.Index(
                fields=["user", "created_at"],
                condition=Q(status=JobStatus.QUEUED),
                name="job_queued_by_user",
            ),
            # Latest job of an agent (dashboard, status API).
            models.Index(fields=["agent", "-created_at"], name="job_agent_latest"),
            # Admin: newest first, filtered by status.
            models.Index(fields=["status", "-created_at"], name="job_status_newest"),
            models.Index(fields=["-created_at"], name="job_newest"),
            # Cleanup runs sent recently and not known to have ended (they count as in flight).
            models.Index(
                fields=["cleanup_dispatched_at"],
                condition=Q(
                    status=JobStatus.FAILED,
                    cleanup_dispatched_at__isnull=False,
                    cleanup_finished_at__isnull=True,
                ),
                name="job_cleanup_running",
            ),
            # GitHub's word that a cleanup run ended finds its job by run id.
            models.Index(
                fields=["cleanup_run_id"],
                condition=Q(cleanup_run_id__isnull=False, cleanup_finished_at__isnull=True),
                name="job_cleanup_run",
            ),
            # Failed provisions still owing their cleanup run.
            models.Index(
                fields=["completed_at"],
                condition=Q(status=JobStatus.FAILED, cleanup_dispatched_at__isnull=True),
                name="job_failed_cleanup_due",
            ),
        ]
        # Operator actions in the admin console; each guards one service call.
        permissions = [
            ("retry_job", "Can retry failed jobs"),
            ("cancel_job", "Can cancel queued or provisioning jobs"),
            ("timeout_job", "Can time out provisioning jobs now"),
            ("redispatch_job", "Can re-dispatch queued jobs"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {str(self.pk)[:8]} ({self.status}, attempt {self.attempt})"

    def allows(self, move: Move) -> bool:
        """Whether `move` may start from this job's current state (provisioning/state.py)."""
        return move.allows(self.status)

    # What pages, the API and the admin ask instead of comparing status strings.
    @property
    def is_queued(self) -> bool:
        return self.status == JobStatus.QUEUED

    @property
    def is_provisioning(self) -> bool:
        return self.status == JobStatus.PROVISIONING

    @property
    def is_running(self) -> bool:
        return self.status == JobStatus.RUNNING

    @property
    def is_failed(self) -> bool:
        return self.status == JobStatus.FAILED

    @property
    def is_active(self) -> bool:
        """Queued or provisioning: work still ahead of it."""
        return self.status in ACTIVE_STATUSES

    @property
    def is_final(self) -> bool:
        return not self.is_active

    @property
    def is_cancelled(self) -> bool:
        """Failed because someone stopped it (an operator, or the agent's end), not by itself."""
        return self.is_failed and self.failed_step == Step.CANCELLED

    @property
    def is_deprovision(self) -> bool:
        return self.kind == JobKind.DEPROVISION

    @property
    def short_id(self) -> str:
        return str(self.pk)[:8]

    @property
    def status_label(self) -> StatusLabel:
        """This job's state in words for its kind ("Deleted" for a finished deprovision)."""
        return status_label(self.status, self.kind)

    def silent_since(self) -> datetime:
        """What the timeout measures silence from: last heartbeat, else claim, else last update."""
        return self.last_heartbeat_at or self.claimed_at or self.updated_at

    def is_stale(self, *, now: datetime, timeout_seconds: int) -> bool:
        if not self.is_provisioning:
            return False
        return now - self.silent_since() > timedelta(seconds=timeout_seconds)

    def is_past_deadline(self, *, now: datetime, deadline_seconds: int) -> bool:
        if not self.is_provisioning or self.claimed_at is None:
            return False
        return now - self.claimed_at > timedelta(seconds=deadline_seconds)


class Actor:
    """Who did something, as JobEvent.actor spells it."""

    STRIPE = "stripe"
    SYSTEM = "system"
    CUSTOMER = "customer"

    @staticmethod
    def workflow(run_id: str | None) -> str:
        return f"workflow:{run_id or '?'}"

    @staticmethod
    def operator(username: str) -> str:
        return f"operator:{username}"


class JobEvent(models.Model):
    """Append-only history: one row per transition, dispatch and operator action. Kept forever."""

    Action = EventAction

    id = models.BigAutoField(primary_key=True)
    # No index of its own: jobevent_job_time (job, created_at) serves every look-up by job.
    job = models.ForeignKey(
        ProvisioningJob, on_delete=models.CASCADE, related_name="events", db_index=False
    )
    created_at = models.DateTimeField(auto_now_add=True)
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=24, choices=Action)
    from_status = models.CharField(max_length=16, choices=JobStatus, blank=True, default="")
    to_status = models.CharField(max_length=16, choices=JobStatus, blank=True, default="")
    attempt = models.PositiveIntegerField()
    # The run this event concerns (dispatch, claim, callbacks): tells "an earlier run of this job"
    # (409, fenced out) from "a run never dispatched for this job" (403).
    workflow_run_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001 (null: no run)
    step = models.CharField(max_length=32, choices=Step, blank=True, default="")
    reason = models.TextField(blank=True, default="")

    class Meta:
        indexes = [
            models.Index(fields=["job", "created_at"], name="jobevent_job_time"),
            # /metrics' timings and the admin overview's chart: recent events of a few actions.
            models.Index(fields=["action", "created_at"], name="jobevent_action_time"),
            # Serves the claim check "was this run ever dispatched for this job?".
            models.Index(
                fields=["job", "workflow_run_id"],
                condition=Q(workflow_run_id__isnull=False),
                name="jobevent_job_run",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor} ({self.from_status}→{self.to_status})"


class UsedTokenId(models.Model):
    """A workflow token's `jti`, spent by claim/complete/fail. Pruned once the token has expired."""

    jti = models.CharField(max_length=255, primary_key=True)
    job = models.ForeignKey(ProvisioningJob, on_delete=models.CASCADE, related_name="+")
    used_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.jti


class CapacityHold(models.Model):
    """The Hetzner project was found at its server limit: provision builds are not dispatched
    while a hold is in force (deprovisions still are, they free servers).

    In force while not lifted and `until` is in the future. Lifted when a deprovision completes
    or an operator lifts it; when `until` passes, builds are tried again (a build that meets the
    limit again renews the hold).
    """

    started_at = models.DateTimeField()
    until = models.DateTimeField()
    reason = models.TextField(blank=True, default="")
    renewals = models.PositiveIntegerField(default=0)
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_by = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        indexes = [
            models.Index(
                fields=["-started_at"],
                condition=Q(lifted_at__isnull=True),
                name="capacityhold_unlifted",
            )
        ]

    def __str__(self) -> str:
        return f"capacity hold since {self.started_at:%Y-%m-%d %H:%M}"

    def in_force(self, now: datetime) -> bool:
        return self.lifted_at is None and self.until > now


class WorkerBeat(models.Model):
    """Each worker's last tick, so /healthz and /metrics can tell when no worker is alive."""

    name = models.CharField(max_length=200, primary_key=True)
    last_tick_at = models.DateTimeField()
    started_at = models.DateTimeField()
    ticks = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return self.name


class OperatorAlert(models.Model):
    """A job that failed for good, owed to operators (email and the optional webhook).

    Written in the same transaction as the failing move, sent by the worker's `alerts` duty: one
    row per failed attempt, so each failure is announced once, and every failure of one tick goes
    out in one email (a storm of failures is one message, not hundreds).
    """

    id = models.BigAutoField(primary_key=True)
    job = models.ForeignKey(ProvisioningJob, on_delete=models.CASCADE, related_name="alerts")
    attempt = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    emailed_at = models.DateTimeField(null=True, blank=True)
    posted_at = models.DateTimeField(null=True, blank=True)  # OPERATOR_ALERT_WEBHOOK_URL
    tries = models.PositiveSmallIntegerField(default=0)  # sending attempts that failed

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "attempt"], name="one_alert_per_failed_attempt"),
        ]
        indexes = [
            # The duty's "what is still owed": small, since sent rows leave it.
            models.Index(
                fields=["id"],
                condition=Q(emailed_at__isnull=True) | Q(posted_at__isnull=True),
                name="operator_alert_owed",
            ),
        ]

    def __str__(self) -> str:
        return f"alert for job {self.job_id} attempt {self.attempt}"


class ApiBudget(models.Model):
    """One external API's request budget, shared by every process (services/budget.py).

    A token bucket: `tokens` as of `refilled_at`, refilled continuously; a draw takes one under
    the row lock. `blocked_until`: the API itself said to wait (a rate-limit answer) and every
    process waits until then.
    """

    name = models.CharField(max_length=32, primary_key=True)
    tokens = models.FloatField()
    refilled_at = models.DateTimeField()
    blocked_until = models.DateTimeField(null=True, blank=True)
    blocked_reason = models.CharField(max_length=300, blank=True, default="")

    def __str__(self) -> str:
        return f"{self.name} budget ({self.tokens:.0f} left)"


class ApiCallCount(models.Model):
    """Requests made (and refused by the budget) per API and purpose, for /metrics; only grows."""

    budget = models.CharField(max_length=32)
    purpose = models.CharField(max_length=32)
    calls = models.BigIntegerField(default=0)
    refused = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["budget", "purpose"], name="one_count_per_purpose")
        ]

    def __str__(self) -> str:
        return f"{self.budget}/{self.purpose}: {self.calls}"


class FinishingRun(models.Model):
    """A run that has reported its outcome (`complete` or `fail`) and that GitHub may still be
    running: its last steps come after the report (a failed build deletes its VM), and until the
    run ends GitHub keeps its runner busy and counts it among the account's concurrent jobs. The
    row keeps one of PROVISIONING_MAX_IN_FLIGHT's slots until GitHub says the run completed (its
    `workflow_run` webhook, or a list call of unfinished runs) or, with neither heard,
    RUN_FINISH_GRACE_SECONDS after the report (services/finishing.py)."""

    run_id = models.CharField(max_length=40, primary_key=True)
    job = models.ForeignKey(ProvisioningJob, on_delete=models.CASCADE, related_name="+")
    reported_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"run {self.run_id} finishing since {self.reported_at:%H:%M:%S}"
