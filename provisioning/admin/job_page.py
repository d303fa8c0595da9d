"""The job page's live part: where the job is now, one panel per attempt, and its timeline.

The job page includes it, and its htmx poll (ProvisioningJobAdmin.job_live_view) re-renders it
alone while the job is queued or provisioning. A failed attempt's output (the run's report, often
a whole Ansible log) lives in that attempt's panel, last lines first with the rest behind
"show all"; the timeline keeps one line per event so its "why" column stays readable.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.utils import timezone
from django.utils.safestring import SafeString

from provisioning.admin.common import ago, duration, local_time, run_link, seconds
from provisioning.models import JobEvent, JobStatus, ProvisioningJob, status_label

TAIL_LINES = 20  # lines of a failed attempt's output shown before "show all"
WHY_CHARS = 140  # the timeline's "why": one line, this long at most
HEADLINE_CHARS = 240

# The events that end an attempt, and how its panel names the end.
FAILURES = {JobEvent.Action.FAIL, JobEvent.Action.TIMEOUT, JobEvent.Action.CANCEL}
ENDINGS = FAILURES | {JobEvent.Action.COMPLETE, JobEvent.Action.CAPACITY_WAIT}


@dataclass(frozen=True)
class Output:
    """A failed attempt's report: its last TAIL_LINES lines, and all of it behind "show all"."""

    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.rstrip("\n").splitlines()

    @property
    def tail(self) -> str:
        return "\n".join(self.lines[-TAIL_LINES:])

    @property
    def hidden_lines(self) -> int:
        return max(len(self.lines) - TAIL_LINES, 0)


@dataclass(frozen=True)
class AttemptPanel:
    number: int
    started_at: datetime
    ended_at: datetime | None
    outcome: str  # "Failed, retried", "Running", "Deleted", "In progress", ...
    outcome_key: str  # the badge's style: running, deleted, failed, provisioning, queued, ...
    step: str
    headline: str = ""  # the error's first line
    output: Output | None = None
    runs: list[SafeString | str] = field(default_factory=list)

    @property
    def took(self) -> str:
        if self.ended_at is None:
            return ""
        return duration(seconds(self.ended_at - self.started_at))


@dataclass(frozen=True)
class TimelineRow:
    event: JobEvent
    transition: str  # in the job's words ("deleting → deleted"), or ""
    stored: str  # the stored states, for the cell's title ("provisioning → running")
    run: SafeString | str
    who: str  # the actor, short: a workflow run's id is in the run column
    why: str  # one line, at most WHY_CHARS
    why_is_cut: bool
    in_panel: bool  # the whole text is in its attempt's panel (a failure's report)


def _one_line(text: str, limit: int, *, last: bool = False) -> tuple[str, bool]:
    """One line of `text` (its first, or its `last`), at most `limit` long; and whether any of
    the text was left out. A run's failure report is its step's output followed by the error
    itself, so for failures the last line says what went wrong."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = (lines[-1] if last else lines[0]).strip() if lines else ""
    cut = len(lines) > 1
    if len(line) > limit:
        line, cut = line[: limit - 1] + "…", True
    return line, cut


def event_transition(event: JobEvent, kind: str) -> tuple[str, str]:
    """An event's from → to in the job's words ("deleting → deleted"), and as stored."""
    if not event.from_status and not event.to_status:
        return "", ""
    was, now = event.from_status, event.to_status or event.from_status
    said = " → ".join(
        [status_label(was, kind).text.lower() if was else "∅", status_label(now, kind).text.lower()]
    )
    return said, f"{was or '∅'} → {now}"


def event_summary(event: JobEvent, *, limit: int) -> str:
    """An event's reason in one line: a failure's last line (what went wrong), else the first."""
    return _one_line(event.reason, limit, last=event.action in FAILURES)[0]


def timeline_rows(job: ProvisioningJob, events: list[JobEvent]) -> list[TimelineRow]:
    rows = []
    for event in events:
        said, stored = event_transition(event, job.kind)
        why, cut = _one_line(event.reason, WHY_CHARS, last=event.action in FAILURES)
        rows.append(
            TimelineRow(
                event=event,
                transition=said,
                stored=stored,
                run=run_link(event.workflow_run_id) if event.workflow_run_id else "—",
                who="workflow" if event.actor.startswith("workflow:") else event.actor,
                why=why,
                why_is_cut=cut,
                in_panel=cut and event.action in FAILURES,
            )
        )
    return rows


def _ending_outcome(job: ProvisioningJob, end: JobEvent) -> tuple[str, str]:
    if end.action == JobEvent.Action.COMPLETE:
        label = status_label(JobStatus.RUNNING, job.kind)
        return label.text, label.key
    if end.action == JobEvent.Action.CAPACITY_WAIT:
        return "Waiting for server capacity", "queued"
    if end.action == JobEvent.Action.CANCEL:
        return "Cancelled", "failed"
    what = "Timed out" if end.action == JobEvent.Action.TIMEOUT else "Failed"
    if end.to_status == JobStatus.QUEUED:
        return f"{what}, retried", "failed"
    return what, "failed"


def _open_outcome(job: ProvisioningJob, number: int) -> tuple[str, str]:
    """An attempt no event has ended: the job's own state if it is the current one."""
    if number != job.attempt:
        return "Superseded", "ended"
    if job.is_active:
        label = job.status_label
        return ("In progress" if job.is_provisioning else label.text), label.key
    return job.status_label.text, job.status_label.key


def attempt_panels(job: ProvisioningJob, events: list[JobEvent]) -> list[AttemptPanel]:
    """One panel per attempt, newest first: when, how far it got, how it ended, its runs."""
    by_attempt: dict[int, list[JobEvent]] = defaultdict(list)
    for event in events:
        by_attempt[event.attempt].append(event)
    panels = []
    for number in sorted(by_attempt, reverse=True):
        group = by_attempt[number]
        ends = [e for e in group if e.action in ENDINGS]
        end = ends[-1] if ends else None
        steps = [e.step for e in group if e.step]
        runs = list(dict.fromkeys(e.workflow_run_id for e in group if e.workflow_run_id))
        outcome, key = _ending_outcome(job, end) if end else _open_outcome(job, number)
        headline, output = "", None
        if end is not None and end.action in FAILURES and end.reason.strip():
            headline, _cut = _one_line(end.reason, HEADLINE_CHARS, last=True)
            output = Output(end.reason)
        panels.append(
            AttemptPanel(
                number=number,
                started_at=group[0].created_at,
                ended_at=end.created_at if end else None,
                outcome=outcome,
                outcome_key=key,
                step=(end.step if end and end.step else (steps[-1] if steps else "")),
                headline=headline,
                output=output,
                runs=[run_link(run) for run in runs],
            )
        )
    return panels


@dataclass(frozen=True)
class JobNow:
    """The strip at the top of the job page: the facts that change while it runs."""

    label_text: str
    label_key: str
    step: str
    heartbeat: str
    attempt: str
    next_attempt: str
    updated: str
    facts: list[tuple[str, str]]


def _step_now(job: ProvisioningJob) -> str:
    if job.is_provisioning:
        progress = f" · {job.progress}%" if job.progress is not None else ""
        return f"{job.step or 'claimed'}{progress}"
    if job.failed_step:
        return f"✗ {job.failed_step}" if job.is_failed else f"retry after {job.failed_step}"
    if job.is_running:
        return "deleted" if job.is_deprovision else "done"
    return "waiting"


def job_now(job: ProvisioningJob, *, now: datetime) -> JobNow:
    heartbeat = "—"
    if job.is_provisioning:
        heartbeat = f"{ago(job.silent_since(), now=now)} ago"
        if job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS):
            heartbeat = f"stale · {heartbeat}"
    next_attempt = ""
    if job.is_queued and job.next_attempt_at and job.next_attempt_at > now:
        next_attempt = f"in {duration(seconds(job.next_attempt_at - now))}"
    return JobNow(
        label_text=job.status_label.text,
        label_key=job.status_label.key,
        step=_step_now(job),
        heartbeat=heartbeat,
        attempt=f"{job.attempt} · retries {job.retry_count} of {job.max_retries}",
        next_attempt=next_attempt,
        updated=f"{ago(job.updated_at, now=now)} ago",
        facts=[
            ("claimed", local_time(job.claimed_at)),
            ("last heartbeat", local_time(job.last_heartbeat_at)),
            ("dispatched", local_time(job.dispatched_at)),
            ("next attempt", local_time(job.next_attempt_at)),
            ("completed", local_time(job.completed_at)),
            ("cleanup run sent", local_time(job.cleanup_dispatched_at)),
            ("cleanup run ended", local_time(job.cleanup_finished_at)),
        ],
    )


def job_live(job: ProvisioningJob) -> dict[str, object]:
    """Everything the live part of a job page shows (one query for the events)."""
    events = list(job.events.order_by("created_at", "id"))
    return {
        "job": job,
        "now": job_now(job, now=timezone.now()),
        "run": run_link(job.workflow_run_id),
        "attempts": attempt_panels(job, events),
        "timeline": timeline_rows(job, events),
        "tail_lines": TAIL_LINES,
    }
