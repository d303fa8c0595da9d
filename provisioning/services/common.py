"""What several services share: the run making a call, recording a move's JobEvent, the fence
every callback after claim passes, after-commit side effects, the retry backoff, and the one fail
path (a run's report, a timeout, reconciliation) that requeues or fails a provisioning job.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, Self
from uuid import UUID

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, models, transaction
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper
from django.db.models import Field, Q
from django.db.models.sql import InsertQuery
from django.utils import timezone

from provisioning import backends, selectors
from provisioning.errors import (
    FencedOut,
    InvalidTransition,
    JobNotFound,
    TokenReplayed,
    WrongRun,
)
from provisioning.models import FinishingRun, JobEvent, ProvisioningJob, UsedTokenId
from provisioning.services.alerts import alert_record
from provisioning.state import HEARTBEAT, Move, fail_move

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


class RunRef(Protocol):
    """What services need to know about the workflow run making a call (oidc.RunIdentity fits)."""

    @property
    def run_id(self) -> str: ...
    @property
    def run_attempt(self) -> int: ...


@dataclass(frozen=True)
class Run:
    """A plain RunRef, for callers that are not the HTTP API (tests, tools)."""

    run_id: str
    run_attempt: int = 1
    jti: str | None = None
    expires_at: datetime | None = None


# --- moves and their events ------------------------------------------------------------------


def refuse(job: ProvisioningJob, move: Move) -> InvalidTransition:
    """The domain error for a move that may not start from the job's state (409)."""
    return InvalidTransition(job_id=job.pk, current=job.status, wanted=move.target)


def check_allows(job: ProvisioningJob, move: Move) -> None:
    """Raise InvalidTransition unless `move` may start from the job's (locked) state."""
    if not job.allows(move):
        raise refuse(job, move)


def record_move(
    job: ProvisioningJob,
    move: Move,
    *,
    actor: str,
    was: str | None = None,
    attempt: int | None = None,
    run_id: str | None = None,
    step: str = "",
    reason: str = "",
    save: bool = True,
) -> JobEvent:
    """The JobEvent of one move: its action, and from → to when the move changes the state.
    Saved unless `save` is False (the caller inserts it with other rows: insert_new).

    `was` is the state the move started from; by default the move's only source ("" for the
    move that creates the job). A state the move may not start from is refused, never recorded.
    """
    if was is None:
        if len(move.sources) > 1:
            raise ValueError(f"{move}: say which of its states the job was in")
        was = next(iter(move.sources), "")
    if not (move.allows(was) or (move.creates and not was)):
        raise InvalidTransition(job_id=job.pk, current=was, wanted=move.target)
    from_status, to_status = move.event_statuses(was)
    return _event(
        job,
        action=move.action,
        actor=actor,
        from_status=from_status,
        to_status=to_status,
        attempt=attempt,
        run_id=run_id,
        step=step,
        reason=reason,
        save=save,
    )


def note(
    job: ProvisioningJob,
    *,
    actor: str,
    reason: str,
    run_id: str | None = None,
    step: str = "",
    save: bool = True,
) -> JobEvent:
    """A NOTE event: something worth telling about a job that moves no state (waiting for a build
    machine, a re-send made due, a cleanup run approved or ended). Saved unless `save` is False
    (the caller inserts several at once)."""
    return _event(
        job,
        action=JobEvent.Action.NOTE,
        actor=actor,
        run_id=run_id,
        step=step,
        reason=reason,
        save=save,
    )


def _event(
    job: ProvisioningJob,
    *,
    action: str,
    actor: str,
    from_status: str = "",
    to_status: str = "",
    attempt: int | None = None,
    run_id: str | None,
    step: str,
    reason: str,
    save: bool,
) -> JobEvent:
    """A JobEvent row as every writer makes it: actor and reason cut to their columns, the job's
    current attempt unless one is named; saved unless `save` is False."""
    event = JobEvent(
        job=job,
        actor=actor[:150],
        action=action,
        from_status=from_status,
        to_status=to_status,
        attempt=attempt if attempt is not None else job.attempt,
        workflow_run_id=run_id,
        step=step,
        reason=reason[:MAX_ERROR_CHARS],
    )
    if save:
        event.save(force_insert=True)
    return event


def insert_new(*rows: models.Model) -> None:
    """INSERT new rows, in order, as one statement on PostgreSQL (data-modifying CTEs: a single
    round trip and, outside a transaction, its own atomic one); elsewhere one save each. Rows
    with a database-made id (JobEvent) get none back: nothing here reads it."""
    if connection.vendor != "postgresql":
        for row in rows:
            row.save(force_insert=True)
        return
    sql, fields_per_row = _insert_statement(tuple(type(row) for row in rows))
    params: list[Any] = []
    for row, fields in zip(rows, fields_per_row, strict=True):
        # What the INSERT compiler does per field: pre_save (auto_now and the like), then the
        # database value.
        params.extend(f.get_db_prep_save(f.pre_save(row, True), connection) for f in fields)
    if any(hasattr(value, "resolve_expression") for value in params):
        _insert_compiled(rows)  # an expression needs the compiler's own SQL
    else:
        db = connections[DEFAULT_DB_ALIAS]
        prepared = settings.DATABASE_PREPARED_STATEMENTS
        with _prepared_cursor(db) if prepared else db.cursor() as cursor:
            cursor.execute(sql, params)
    for row in rows:
        row._state.adding, row._state.db = False, connection.alias


def _insert_fields(model: type[models.Model]) -> tuple[Field[Any, Any], ...]:
    meta = model._meta
    return tuple(f for f in meta.local_concrete_fields if f is not meta.auto_field)


@functools.cache
def _insert_statement(
    kinds: tuple[type[models.Model], ...],
) -> tuple[str, tuple[tuple[Field[Any, Any], ...], ...]]:
    """The one statement inserting one row of each model, in order (data-modifying CTEs), and
    the fields whose values it takes: made once per process, so each call only binds values (and,
    prepared, PostgreSQL plans it once per connection)."""
    statements = []
    for model in kinds:
        fields = _insert_fields(model)
        columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        values = ", ".join(["%s"] * len(fields))
        table = connection.ops.quote_name(model._meta.db_table)
        statements.append(f"INSERT INTO {table} ({columns}) VALUES ({values})")  # noqa: S608
    return _one_statement(statements), tuple(_insert_fields(m) for m in kinds)


def _one_statement(inserts: list[str]) -> str:
    """INSERTs as one statement: all but the last as data-modifying CTEs."""
    *first, last = inserts
    ctes = ", ".join(f"row_{i} AS ({sql})" for i, sql in enumerate(first))
    return f"WITH {ctes} {last}" if ctes else last


def _insert_compiled(rows: tuple[models.Model, ...]) -> None:
    """insert_new through Django's INSERT compiler (values that are expressions)."""
    statements: list[str] = []
    params: list[Any] = []
    for row in rows:
        query = InsertQuery(type(row))
        query.insert_values(list(_insert_fields(type(row))), [row])
        [(sql, values)] = query.get_compiler(connection=connection).as_sql()
        statements.append(sql)
        params.extend(values)
    with connection.cursor() as cursor:
        cursor.execute(_one_statement(statements), params)


# --- the run's calls -------------------------------------------------------------------------


def spend_token(run: RunRef, *, job_id: UUID | str) -> None:
    """Single-use `jti` (claim, complete, fail). Kept until the token expires, then pruned."""
    jti = getattr(run, "jti", None)
    if not jti:
        return
    expires_at = getattr(run, "expires_at", None) or timezone.now() + timedelta(minutes=10)
    try:
        with transaction.atomic():
            UsedTokenId.objects.create(jti=jti, job_id=job_id, expires_at=expires_at)
    except IntegrityError as exc:
        raise TokenReplayed() from exc


def fenced(job_id: UUID | str, run: RunRef, move: Move) -> Q:
    """The fence every callback after claim must pass: `move` applies, bound to this very run."""
    return Q(
        pk=job_id,
        status__in=move.sources,
        workflow_run_id=run.run_id,
        run_attempt=run.run_attempt,
    )


@functools.cache
def _fenced_touch_sql(vendor: str, *, same_step: bool) -> str:
    """The heartbeat's fast-path UPDATE, written once per process (the ORM would build and
    compile the same statement on every heartbeat, ~0.3 ms of CPU). The WHERE clause is the
    HEARTBEAT `fenced()` Q above, column for column; step too when `same_step`."""
    meta, quote = ProvisioningJob._meta, connection.ops.quote_name

    def col(name: str) -> str:
        field = meta.get_field(name)
        if not isinstance(field, Field):  # pragma: no cover (the names above are columns)
            raise TypeError(name)
        return quote(field.column)

    sources = ", ".join(["%s"] * len(HEARTBEAT.sources))
    where = (
        f"{col('id')} = %s AND {col('status')} IN ({sources}) AND {col('workflow_run_id')} = %s "
        f"AND {col('run_attempt')} = %s" + (f" AND {col('step')} = %s" if same_step else "")
    )
    sets = (
        f"{col('last_heartbeat_at')} = %s, {col('updated_at')} = %s, "
        f"{col('progress')} = COALESCE(%s, {col('progress')})"
    )
    # Names from the model; every value is a parameter.
    return f"UPDATE {quote(meta.db_table)} SET {sets} WHERE {where}"  # noqa: S608


# The IN list's values, in the order the SQL's placeholders take them.
_HEARTBEAT_SOURCES = tuple(sorted(HEARTBEAT.sources))


@functools.cache
def _prepared_cursor_class() -> type[Any]:
    """A psycopg cursor with server-side binding that prepares each statement on its first run
    and reuses it on the same connection (made once: psycopg is only imported on PostgreSQL)."""
    import psycopg

    class PreparedCursor(psycopg.Cursor[Any]):
        def execute(
            self,
            query: Any,
            params: Any = None,
            *,
            prepare: bool | None = None,
            binary: bool | None = None,
        ) -> Self:
            return super().execute(
                query, params, prepare=True if prepare is None else prepare, binary=binary
            )

    return PreparedCursor


class _LoggedPreparedCursor(CursorDebugWrapper):
    """Django's query log around a PreparedCursor. Django logs the query psycopg last sent, which
    for a prepared statement is not kept (and would only show $1, $2 …): log the statement with
    its values written in instead, as Django does for connections with server-side binding."""

    def execute(self, sql: Any, params: Any = None) -> Any:
        shown = self.db.ops.compose_sql(sql, params)
        with self.debug_sql(shown, params):
            return CursorWrapper.execute(self, sql, params)


# psycopg's count of runs before it prepares a statement by itself; one no statement reaches.
_NEVER_BY_COUNT = 2**62


def _prepared_cursor(db: BaseDatabaseWrapper) -> CursorWrapper:
    """What `db.cursor()` returns (health check, connect, thread check, Django's wrapper: its
    error translation, execute wrappers and query log), around a PreparedCursor on the same
    connection, so it shares the caller's transaction or autocommit.

    Django opens psycopg connections with automatic preparing off (prepare_threshold None), as
    transaction-pooling proxies lose prepared statements between transactions; psycopg then
    ignores `prepare=True` too. The threshold is set to a count no statement reaches: Django's
    own cursors bind on the client and never prepare, so only PreparedCursor's statements are.
    """
    db.close_if_health_check_failed()
    db.ensure_connection()
    with db.wrap_database_errors:
        raw = db.connection
        if raw.prepare_threshold is None:
            raw.prepare_threshold = _NEVER_BY_COUNT
        cursor = _prepared_cursor_class()(raw)
    db.validate_thread_sharing()
    return _LoggedPreparedCursor(cursor, db) if db.queries_logged else db.make_cursor(cursor)


def fenced_touch(
    job_id: UUID | str, run: RunRef, *, now: datetime, progress: int | None, step: str | None
) -> bool:
    """HEARTBEAT's common case as one autocommit statement: refresh the heartbeat (and progress)
    of the job this run owns, if it is still at `step` (any step when None). False if no row
    matched: the caller takes the slow path or finds the refusal.

    On PostgreSQL (unless DATABASE_PREPARED_STATEMENTS is off) the UPDATE is a prepared
    statement with server-side parameters: parsed and planned once per connection, not on every
    heartbeat as Django's client-side-binding cursor would send it. Same statement, same values.
    """
    db = connections[DEFAULT_DB_ALIAS]
    meta = ProvisioningJob._meta
    postgres = db.vendor == "postgresql"
    prepared = postgres and settings.DATABASE_PREPARED_STATEMENTS
    # On PostgreSQL the fields' get_db_prep_value return an aware datetime and a UUID as they
    # are: skip the calls then (~0.02 ms a heartbeat under the profiler).
    if postgres and now.tzinfo is not None:
        when: Any = now
    else:
        when = meta.get_field("updated_at").get_db_prep_value(now, db)
    if postgres and isinstance(job_id, UUID):
        pk: Any = job_id
    else:
        pk = meta.pk.get_db_prep_value(job_id, db) if meta.pk else job_id
    params: list[Any] = [when, when, progress, pk, *_HEARTBEAT_SOURCES, run.run_id, run.run_attempt]
    if step is not None:
        params.append(step)
    sql = _fenced_touch_sql(db.vendor, same_step=step is not None)
    with _prepared_cursor(db) if prepared else db.cursor() as cursor:
        cursor.execute(sql, params)
        return bool(cursor.rowcount)


def job_or_run_refusal(job_id: UUID | str, run: RunRef) -> ProvisioningJob | Exception:
    """What every run's call is refused for first: no such job (404), a run never dispatched for
    it (403 WrongRun), a run a newer dispatch replaced (409 FencedOut). The job if this is its
    current run."""
    job = selectors.job_get(job_id=job_id)
    if job is None:
        return JobNotFound(job_id)
    if job.workflow_run_id != run.run_id:
        if selectors.job_was_dispatched_to_run(job_id=job_id, run_id=run.run_id):
            return FencedOut(job_id=job_id, run_id=run.run_id, why="a newer dispatch owns it")
        return WrongRun(job_id=job_id, run_id=run.run_id)
    return job


def fence_refusal(job_id: UUID | str, run: RunRef, move: Move) -> Exception:
    """Why a fenced call matched no row: 404, 403 (never this job's run) or 409."""
    job = job_or_run_refusal(job_id, run)
    if isinstance(job, Exception):
        return job
    if job.run_attempt is not None and job.run_attempt != run.run_attempt:
        return FencedOut(job_id=job_id, run_id=run.run_id, why="another run attempt claimed it")
    if not job.allows(move):
        return refuse(job, move)
    return FencedOut(job_id=job_id, run_id=run.run_id, why="it moved on")  # pragma: no cover


# --- side effects after commit ---------------------------------------------------------------


def after_commit(fn: Callable[[], Any]) -> None:
    """Run a side effect after commit; never let it break the caller (it is retried by the worker)."""

    def guarded() -> None:
        try:
            fn()
        except Exception:
            logger.exception("after-commit side effect failed: %r", fn)

    transaction.on_commit(guarded)


def finishing_runs_record(runs: list[tuple[str, UUID | str]], *, now: datetime) -> bool:
    """(run id, job id) pairs whose runs have reported or are being cancelled: on a backend whose
    runs keep their runner until they end (GitHub: `holds_runner_after_report`), each keeps its
    slot until GitHub says it ended (services/finishing.py). One INSERT; a run recorded already
    is left as it was. False when the backend's runs end with their report: nothing recorded,
    their slots are free now."""
    if not getattr(backends.get_backend(), "holds_runner_after_report", False):
        return False
    if runs:
        FinishingRun.objects.bulk_create(
            [FinishingRun(run_id=run, job_id=job, reported_at=now) for run, job in runs],
            ignore_conflicts=True,
        )
    return True


def cancel_run_later(run_id: str | None, *, job_id: UUID | str | None = None) -> None:
    """Cancel the workflow run after commit (best effort: a late call from it is fenced anyway).

    With `job_id`, on a backend whose runs keep their runner until they end (GitHub), the run
    keeps its slot until GitHub says the cancelled run has stopped (services/finishing.py)."""
    if not run_id:
        return
    if job_id is not None:
        finishing_runs_record([(run_id, job_id)], now=timezone.now())

    def cancel() -> None:
        backends.get_backend().cancel_run(run_id=run_id)

    after_commit(cancel)


# --- the one fail path -----------------------------------------------------------------------


def backoff(retry_count: int) -> timedelta:
    """Exponential: base, 2x base, 4x base … capped."""
    seconds = settings.RETRY_BACKOFF_SECONDS * (2 ** max(retry_count - 1, 0))
    return timedelta(seconds=min(seconds, settings.RETRY_BACKOFF_MAX_SECONDS))


def fail_locked(
    job: ProvisioningJob,
    *,
    timeout: bool,
    actor: str,
    error: str,
    failed_step: str,
    run_id: str | None = None,
) -> ProvisioningJob:
    """The one fail path (run's report, timeout, deadline, reconciliation); caller holds the lock.

    Retries left: FAIL_REQUEUE / TIMEOUT_REQUEUE, to queued with retry_count+1, attempt+1 (fences
    the old run out) and backoff. Otherwise FAIL / TIMEOUT, to failed with completed_at; an
    operator's turn.
    """
    move = fail_move(timeout=timeout, retries_left=job.retry_count < job.max_retries)
    check_allows(job, move)
    now = timezone.now()
    was, old_attempt = job.status, job.attempt
    job.status = move.target
    job.error = error[:MAX_ERROR_CHARS]
    job.failed_step = failed_step
    job.updated_at = now
    fields = ["status", "error", "failed_step", "updated_at"]
    if job.is_queued:
        job.retry_count += 1
        job.attempt += 1
        job.next_attempt_at = now + backoff(job.retry_count)
        job.dispatched_at = None
        job.step, job.progress = "", None
        fields += ["retry_count", "attempt", "next_attempt_at", "dispatched_at", "step", "progress"]
        outcome = f"retry {job.retry_count} of {job.max_retries} at {job.next_attempt_at:%H:%M:%S}"
    else:
        job.completed_at = now
        fields += ["completed_at"]
        outcome = "no retries left"
    job.save(update_fields=fields)
    if job.is_failed:
        alert_record(job)  # operators hear of it (the worker's alerts duty sends it)
    record_move(
        job,
        move,
        actor=actor,
        was=was,
        attempt=old_attempt,
        run_id=run_id,
        step=failed_step,
        reason=f"{error[: MAX_ERROR_CHARS - 200]} ({outcome})",
    )
    return job
