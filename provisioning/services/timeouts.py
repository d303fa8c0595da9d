"""Timeouts: a provisioning job whose run went silent (no heartbeat for JOB_TIMEOUT_SECONDS) or
ran past its attempt's JOB_DEADLINE_SECONDS takes TIMEOUT_REQUEUE while retries are left, else
TIMEOUT. Checked on demand (status reads, one job through the fail path) and swept by the worker
(on PostgreSQL a batch at a time, writing exactly what the fail path writes job by job).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from provisioning import selectors
from provisioning.models import Actor, JobEvent, JobStatus, OperatorAlert, ProvisioningJob, Step
from provisioning.services.common import (
    MAX_ERROR_CHARS,
    cancel_run_later,
    fail_locked,
    finishing_runs_record,
)
from provisioning.state import TIMEOUT, fail_move

# Jobs one sweep transaction times out (and keeps locked until it commits).
SWEEP_BATCH = 500


def _looks_timed_out(job: ProvisioningJob, now: datetime) -> bool:
    return job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS) or (
        job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS)
    )


def _why(job: ProvisioningJob, now: datetime) -> str:
    """Why the job times out now, or "" if it does not."""
    if job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS):
        silent = int((now - job.silent_since()).total_seconds())
        return (
            f"No heartbeat for {silent}s (limit {settings.JOB_TIMEOUT_SECONDS}s) "
            f"during step {job.step or 'unknown'}"
        )
    if job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS):
        return (
            f"Attempt ran past its {settings.JOB_DEADLINE_SECONDS}s deadline "
            f"(step {job.step or 'unknown'}, heartbeats still arriving)"
        )
    return ""


def job_timeout_if_stale(*, job_id: UUID | str, now: datetime | None = None) -> bool:
    """Time out one silent or overdue provisioning job, on demand.

    Silence is measured from the last heartbeat, else the claim, else the last update, against
    JOB_TIMEOUT_SECONDS; an attempt also has an absolute JOB_DEADLINE_SECONDS. A timeout goes
    through the fail path (retry or failed) and cancels the silent run after commit. A queued job
    never times out. Returns True if this call timed the job out.
    """
    now = now or timezone.now()
    # Status reads call this on every poll: decide on a plain read first, lock only a likely timeout.
    seen = ProvisioningJob.objects.filter(pk=job_id, status__in=TIMEOUT.sources).first()
    if seen is None or not _looks_timed_out(seen, now):
        return False
    with transaction.atomic():
        job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or not job.allows(TIMEOUT):
            return False
        why = _why(job, now)
        if not why:
            return False
        run_id = job.workflow_run_id
        fail_locked(
            job,
            timeout=True,
            actor=Actor.SYSTEM,
            error=why,
            failed_step=Step.TIMEOUT,
            run_id=run_id,
        )
        cancel_run_later(run_id, job_id=job.pk)
    return True


def job_timeout_stale(*, now: datetime | None = None, limit: int = 1000) -> int:
    """The sweep: time out every stale provisioning job, at most `limit` per call.

    On PostgreSQL set-based, a batch per transaction: one UPDATE of the rows its SKIP LOCKED
    subquery locked (the fail path's retry/fail split, backoff, error and fields, computed per
    row), one bulk insert of their JobEvents (and of the alerts for jobs failed for good), and
    one after-commit cancel per silent run. A row another transaction holds is left to the next
    sweep, and the lock re-reads the row, so a heartbeat that landed first keeps its job.
    Elsewhere (SQLite) one job at a time through the on-demand path; both leave the same rows.
    """
    now = now or timezone.now()
    if connection.vendor != "postgresql":
        ids = selectors.job_ids_stale(now=now, limit=limit)
        return sum(job_timeout_if_stale(job_id=pk, now=now) for pk in ids)
    done = 0
    while done < limit:
        size = min(SWEEP_BATCH, limit - done)
        timed_out = _time_out_batch(now=now, size=size)
        done += timed_out
        if timed_out < size:
            break
    return done


# The fail path of services/common.py (fail_locked) and _why() above, as one statement over a
# batch: every right-hand side sees the row as it was, so `retry_count < max_retries` is the split.
_SILENT_FROM = "COALESCE(last_heartbeat_at, claimed_at, updated_at)"
_RETRIES_LEFT = "retry_count < max_retries"
_STEP = "COALESCE(NULLIF(step, ''), 'unknown')"
# The locked ids are a MATERIALIZED CTE, not a bare `id IN (SELECT … LIMIT n)`: PostgreSQL may
# rescan such a subquery while the UPDATE runs, and a rescan skips the rows already updated and
# locks the next ones, so a batch would outgrow its LIMIT.
_BATCH_UPDATE = f"""
WITH locked AS MATERIALIZED ({{locked}})
UPDATE provisioning_provisioningjob SET
    status = CASE WHEN {_RETRIES_LEFT} THEN %s ELSE %s END,
    error = left(CASE WHEN {_SILENT_FROM} < %s
        THEN 'No heartbeat for '
            || floor(extract(epoch FROM %s - {_SILENT_FROM}))::bigint::text
            || %s || {_STEP}
        ELSE %s || {_STEP} || ', heartbeats still arriving)' END, %s),
    failed_step = %s,
    updated_at = %s,
    retry_count = CASE WHEN {_RETRIES_LEFT} THEN retry_count + 1 ELSE retry_count END,
    attempt = CASE WHEN {_RETRIES_LEFT} THEN attempt + 1 ELSE attempt END,
    next_attempt_at = CASE WHEN {_RETRIES_LEFT}
        THEN %s + make_interval(secs => LEAST(
            %s::numeric * power(2::numeric, LEAST(retry_count, 64)), %s::numeric
        )::double precision)
        ELSE next_attempt_at END,
    dispatched_at = CASE WHEN {_RETRIES_LEFT} THEN NULL ELSE dispatched_at END,
    step = CASE WHEN {_RETRIES_LEFT} THEN '' ELSE step END,
    progress = CASE WHEN {_RETRIES_LEFT} THEN NULL ELSE progress END,
    completed_at = CASE WHEN {_RETRIES_LEFT} THEN completed_at ELSE %s END
WHERE id IN (SELECT pk FROM locked) AND status = %s
RETURNING id, status, attempt, retry_count, max_retries, next_attempt_at, error, workflow_run_id
"""  # noqa: S608 (built from the constants above; every value is a parameter)


def _time_out_batch(*, now: datetime, size: int) -> int:
    """Time out up to `size` stale jobs in one transaction (PostgreSQL); returns how many."""
    requeue = fail_move(timeout=True, retries_left=True)
    final = fail_move(timeout=True, retries_left=False)
    moves = {requeue.target: requeue, final.target: final}
    timeout_s, deadline_s = settings.JOB_TIMEOUT_SECONDS, settings.JOB_DEADLINE_SECONDS
    with transaction.atomic():
        locked = (
            selectors.job_list_stale(now=now)
            .select_for_update(skip_locked=True)
            .values("pk")[:size]
        )
        locked_sql, locked_params = locked.query.sql_with_params()
        written = timezone.now()
        params = (
            *locked_params,
            requeue.target,
            final.target,
            now - timedelta(seconds=timeout_s),
            now,
            f"s (limit {timeout_s}s) during step ",
            f"Attempt ran past its {deadline_s}s deadline (step ",
            MAX_ERROR_CHARS,
            Step.TIMEOUT,
            written,
            written,
            settings.RETRY_BACKOFF_SECONDS,
            settings.RETRY_BACKOFF_MAX_SECONDS,
            written,
            JobStatus.PROVISIONING,
        )
        with connection.cursor() as cursor:
            cursor.execute(_BATCH_UPDATE.format(locked=locked_sql), params)
            rows = cursor.fetchall()
        events, alerts = [], []
        runs: dict[str, UUID] = {}  # run id -> job id, each run once
        for job_id, status, attempt, retry_count, max_retries, next_at, error, run_id in rows:
            move = moves[status]
            if move is requeue:
                attempt -= 1  # the event names the attempt that timed out
                outcome = f"retry {retry_count} of {max_retries} at {next_at:%H:%M:%S}"
            else:
                alerts.append(OperatorAlert(job_id=job_id, attempt=attempt))
                outcome = "no retries left"
            from_status, to_status = move.event_statuses(JobStatus.PROVISIONING)
            events.append(
                JobEvent(
                    job_id=job_id,
                    actor=Actor.SYSTEM,
                    action=move.action,
                    from_status=from_status,
                    to_status=to_status,
                    attempt=attempt,
                    workflow_run_id=run_id,
                    step=Step.TIMEOUT,
                    reason=f"{error[: MAX_ERROR_CHARS - 200]} ({outcome})",
                )
            )
            if run_id:
                runs[run_id] = job_id
        JobEvent.objects.bulk_create(events)
        OperatorAlert.objects.bulk_create(alerts, ignore_conflicts=True)
        finishing_runs_record(list(runs.items()), now=now)  # each keeps its slot until stopped
        for run_id in runs:
            cancel_run_later(run_id)
    return len(rows)
