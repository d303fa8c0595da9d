"""The state machine drives every write: each service performs exactly the named move it should,
every move in state.MOVES is performed by some service, nothing in the product writes `status`
except a move's target, and the moves that change the state are exactly the transition table."""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import override_settings
from django.utils import timezone

from provisioning import services, state
from provisioning.backends.base import RunStatus
from provisioning.errors import InvalidTransition
from provisioning.models import CapacityHold, JobEvent, JobStatus, ProvisioningJob, Step
from provisioning.services.common import record_move
from provisioning.state import MOVES, TRANSITIONS, Move
from tests.factories import AgentFactory
from tests.fakes.runner_backend import RecordingBackend
from tests.provisioning.helpers import claimed, dispatch, enqueue

Q, P, R, F = JobStatus.QUEUED, JobStatus.PROVISIONING, JobStatus.RUNNING, JobStatus.FAILED


# --- (a) every service performs one move, and every move is performed -----------------------


def move_of(event: JobEvent) -> Move:
    """The one move a stored JobEvent records (its action, and from → to when it has one)."""
    recorded = (event.from_status, event.to_status)

    def records(m: Move) -> bool:
        if not m.changes_status:
            return recorded == ("", "")
        started = m.allows(event.from_status) or (m.creates and not event.from_status)
        return started and recorded == m.event_statuses(event.from_status)

    matches = [m for m in MOVES if m.action == event.action and records(m)]
    assert len(matches) == 1, (event.action, event.from_status, event.to_status, matches)
    return matches[0]


def moves_since(last_id: int) -> list[Move]:
    events = JobEvent.objects.filter(id__gt=last_id).order_by("id")
    return [move_of(e) for e in events]


def last_event_id() -> int:
    return JobEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


def spent(job: ProvisioningJob) -> None:
    """No retries left: the next failure or timeout fails the job for good."""
    ProvisioningJob.objects.filter(pk=job.pk).update(max_retries=job.retry_count)


class FinishedRunBackend(RecordingBackend):
    """GitHub says every run has finished (failed)."""

    def get_run(self, *, run_id: str) -> RunStatus | None:
        return RunStatus(run_id=run_id, status="completed", conclusion="failure")


@dataclass(frozen=True)
class Scenario:
    """Build a job the way production does, then call one service; it must perform `moves`."""

    name: str
    moves: tuple[Move, ...]
    prepare: Callable[[RecordingBackend], Callable[[], object]]


def _enqueue(backend: RecordingBackend) -> Callable[[], object]:
    return lambda: services.job_enqueue(agent=AgentFactory(), stripe_event_id="evt_moves")


def _dispatch(backend: RecordingBackend) -> Callable[[], object]:
    enqueue()
    return lambda: services.job_dispatch_next(backend=backend)


def _dispatch_failed(backend: RecordingBackend) -> Callable[[], object]:
    enqueue()
    backend.fail_next = 1
    return lambda: services.job_dispatch_next(backend=backend)


def _cleanup(backend: RecordingBackend) -> Callable[[], object]:
    job, run = claimed(backend)
    spent(job)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE)
    return lambda: services.job_send_cleanup(backend=backend)


def _claim(backend: RecordingBackend) -> Callable[[], object]:
    job = enqueue()
    run = dispatch(job, backend)
    return lambda: services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)


def _heartbeat(backend: RecordingBackend) -> Callable[[], object]:
    job, run = claimed(backend)
    return lambda: services.job_heartbeat(job_id=job.pk, run=run, step=Step.CONFIGURE, progress=5)


def _complete(backend: RecordingBackend) -> Callable[[], object]:
    job, run = claimed(backend)
    return lambda: services.job_complete(job_id=job.pk, run=run, server_id="7", ipv4="10.0.0.7")


def _fail(*, retries_left: bool) -> Callable[[RecordingBackend], Callable[[], object]]:
    def prepare(backend: RecordingBackend) -> Callable[[], object]:
        job, run = claimed(backend)
        if not retries_left:
            spent(job)
        return lambda: services.job_fail(
            job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE
        )

    return prepare


def _capacity(backend: RecordingBackend) -> Callable[[], object]:
    job, run = claimed(backend)
    return lambda: services.job_fail(
        job_id=job.pk,
        run=run,
        error="resource_limit_exceeded",
        failed_step=Step.CREATE_SERVER,
        capacity=True,
    )


def _timeout_sweep(*, retries_left: bool) -> Callable[[RecordingBackend], Callable[[], object]]:
    def prepare(backend: RecordingBackend) -> Callable[[], object]:
        job, _run = claimed(backend)
        if not retries_left:
            spent(job)
        ProvisioningJob.objects.filter(pk=job.pk).update(
            last_heartbeat_at=timezone.now() - timedelta(days=1)
        )
        return lambda: services.job_timeout_stale()

    return prepare


def _force_timeout(*, retries_left: bool) -> Callable[[RecordingBackend], Callable[[], object]]:
    def prepare(backend: RecordingBackend) -> Callable[[], object]:
        job, _run = claimed(backend)
        if not retries_left:
            spent(job)
        return lambda: services.job_force_timeout(job_id=job.pk, actor="operator:ann")

    return prepare


def _reconcile(backend: RecordingBackend) -> Callable[[], object]:
    finished = FinishedRunBackend()
    job, _run = claimed(finished)
    ProvisioningJob.objects.filter(pk=job.pk).update(claimed_at=timezone.now() - timedelta(days=1))
    return lambda: services.job_reconcile_runs(backend=finished)


def _cancel(*, claim: bool) -> Callable[[RecordingBackend], Callable[[], object]]:
    def prepare(backend: RecordingBackend) -> Callable[[], object]:
        job = claimed(backend)[0] if claim else enqueue()
        return lambda: services.job_cancel(job_id=job.pk, actor="operator:ann")

    return prepare


def _retry(backend: RecordingBackend) -> Callable[[], object]:
    job = enqueue()
    services.job_cancel(job_id=job.pk, actor="operator:ann")
    return lambda: services.job_retry(job_id=job.pk, actor="operator:ann")


def _reprovision(backend: RecordingBackend) -> Callable[[], object]:
    with override_settings(MAX_RETRIES=0):  # its first failure is final
        job, run = claimed(backend)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step="configure")
    return lambda: services.job_reprovision(agent=job.agent)


def _redispatch(backend: RecordingBackend) -> Callable[[], object]:
    job = enqueue()
    dispatch(job, backend)
    return lambda: services.job_redispatch(job_id=job.pk, actor="operator:ann")


def _agent_end(backend: RecordingBackend) -> Callable[[], object]:
    job, _run = claimed(backend)
    return lambda: services.agent_end(agent_id=job.agent_id, actor="stripe", reason="refund")


SCENARIOS = [
    Scenario("job_enqueue", (state.ENQUEUE,), _enqueue),
    Scenario("job_dispatch_next", (state.DISPATCH,), _dispatch),
    Scenario("job_dispatch_next, backend down", (state.DISPATCH_FAILED,), _dispatch_failed),
    Scenario("job_send_cleanup", (state.CLEANUP,), _cleanup),
    Scenario("job_claim", (state.CLAIM,), _claim),
    Scenario("job_heartbeat, new step", (state.HEARTBEAT,), _heartbeat),
    Scenario("job_complete", (state.COMPLETE,), _complete),
    Scenario("job_fail, retries left", (state.FAIL_REQUEUE,), _fail(retries_left=True)),
    Scenario("job_fail, retries spent", (state.FAIL,), _fail(retries_left=False)),
    Scenario("job_fail, server limit", (state.CAPACITY_REQUEUE,), _capacity),
    Scenario("job_reconcile_runs", (state.FAIL_REQUEUE,), _reconcile),
    Scenario(
        "job_timeout_stale, retries left",
        (state.TIMEOUT_REQUEUE,),
        _timeout_sweep(retries_left=True),
    ),
    Scenario(
        "job_timeout_stale, retries spent", (state.TIMEOUT,), _timeout_sweep(retries_left=False)
    ),
    Scenario(
        "job_force_timeout, retries left",
        (state.TIMEOUT_REQUEUE,),
        _force_timeout(retries_left=True),
    ),
    Scenario(
        "job_force_timeout, retries spent", (state.TIMEOUT,), _force_timeout(retries_left=False)
    ),
    Scenario("job_cancel, queued", (state.CANCEL,), _cancel(claim=False)),
    Scenario("job_cancel, provisioning", (state.CANCEL,), _cancel(claim=True)),
    Scenario("job_retry", (state.RETRY,), _retry),
    Scenario("job_reprovision", (state.RETRY,), _reprovision),
    Scenario("job_redispatch", (state.REDISPATCH,), _redispatch),
    Scenario("agent_end", (state.CANCEL, state.ENQUEUE), _agent_end),
]


@pytest.mark.django_db
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_each_service_performs_its_move_and_records_it(scenario, backend):
    call = scenario.prepare(backend)
    before = last_event_id()

    call()

    assert moves_since(before) == list(scenario.moves)


@pytest.mark.django_db
def test_every_move_of_the_state_machine_is_performed_by_a_service(backend):
    performed: set[Move] = set()
    for scenario in SCENARIOS:
        scenario.prepare(backend)()
        performed |= {move_of(event) for event in JobEvent.objects.all()}
        ProvisioningJob.objects.all().delete()  # the next scenario's job is the only one due
        CapacityHold.objects.all().delete()  # a server-limit report would hold later builds

    assert performed == set(MOVES), {m.name for m in set(MOVES) - performed}


@pytest.mark.django_db
def test_a_move_that_may_not_start_from_the_state_is_refused_with_a_domain_error(backend):
    job = enqueue()

    with pytest.raises(InvalidTransition):
        record_move(job, state.COMPLETE, actor="system", was=Q)
    with pytest.raises(InvalidTransition, match="cannot become queued"):
        services.job_retry(job_id=job.pk, actor="operator:ann")
    assert list(JobEvent.objects.filter(job=job).values_list("action", flat=True)) == ["enqueue"]


def test_move_of_tells_the_fail_path_outcomes_apart():
    def event(action: str, from_status: str, to_status: str) -> JobEvent:
        return JobEvent(action=action, from_status=from_status, to_status=to_status)

    assert move_of(event("fail", P, Q)) is state.FAIL_REQUEUE
    assert move_of(event("fail", P, F)) is state.FAIL
    assert move_of(event("timeout", P, Q)) is state.TIMEOUT_REQUEUE
    assert move_of(event("timeout", P, F)) is state.TIMEOUT
    with pytest.raises(AssertionError):
        move_of(event("fail", Q, F))  # no move fails a queued job


# --- (b) nothing in the product writes `status` except a move's target ----------------------

PRODUCT = Path(__file__).resolve().parents[2] / "provisioning"
# Calls that write the keyword arguments they are given.
WRITING_CALLS = {"update", "create", "get_or_create", "update_or_create", "ProvisioningJob"}


def _is_move_target(node: ast.expr) -> bool:
    """`CLAIM.target`, `move.target`, `self.move.target`: a move's target state."""
    return isinstance(node, ast.Attribute) and node.attr == "target"


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _status_assignments(node: ast.Assign, *, in_job_model: bool) -> list[ast.expr | None]:
    """The values assigned to a job's `.status` (None when they cannot be told apart).

    `self.status` is a job's only inside the ProvisioningJob model; elsewhere `self` is some other
    object with a status of its own (an HTTP error's status code, for one).
    """

    def is_job_status(target: ast.expr) -> bool:
        if not (isinstance(target, ast.Attribute) and target.attr == "status"):
            return False
        return in_job_model or not (
            isinstance(target.value, ast.Name) and target.value.id == "self"
        )

    found: list[ast.expr | None] = []
    for target in node.targets:
        if is_job_status(target):
            found.append(node.value)
        elif isinstance(target, ast.Tuple):
            same_shape = isinstance(node.value, ast.Tuple) and len(node.value.elts) == len(
                target.elts
            )
            for i, element in enumerate(target.elts):
                if is_job_status(element):
                    found.append(node.value.elts[i] if same_shape else None)  # type: ignore[attr-defined]
    return found


class StatusWrites(ast.NodeVisitor):
    """Collects every write of a job's `status` that is not a move's target."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.classes: list[str] = []
        self.bad: list[str] = []

    def _flag(self, node: ast.AST, what: str) -> None:
        self.bad.append(f"{self.filename}:{getattr(node, 'lineno', '?')} {what}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.append(node.name)
        self.generic_visit(node)
        self.classes.pop()

    def visit_Assign(self, node: ast.Assign) -> None:
        in_job_model = "ProvisioningJob" in self.classes
        for value in _status_assignments(node, in_job_model=in_job_model):
            if value is None or not _is_move_target(value):
                self._flag(node, ".status = …")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = _call_name(node)
        if name == "setattr" and len(node.args) >= 2:
            field = node.args[1]
            if isinstance(field, ast.Constant) and field.value == "status":
                self._flag(node, "setattr(…, 'status', …)")
        if name in WRITING_CALLS:
            for keyword in node.keywords:
                if keyword.arg == "status" and not _is_move_target(keyword.value):
                    self._flag(node, f"{name}(status={ast.unparse(keyword.value)})")
                if keyword.arg in ("defaults", "create_defaults") and isinstance(
                    keyword.value, ast.Dict
                ):
                    for key, value in zip(keyword.value.keys, keyword.value.values, strict=True):
                        if (
                            isinstance(key, ast.Constant)
                            and key.value == "status"
                            and not _is_move_target(value)
                        ):
                            self._flag(node, f"{name}({keyword.arg}: status)")
        self.generic_visit(node)


def status_writes_not_through_a_move(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` that writes a job's `status` with something other than a move's
    target."""
    visitor = StatusWrites(filename)
    visitor.visit(ast.parse(source, filename))
    return visitor.bad


def product_files() -> list[Path]:
    return sorted(
        path
        for path in PRODUCT.rglob("*.py")
        if "migrations" not in path.parts and path != PRODUCT / "state.py"
    )


def test_nothing_in_the_product_writes_status_except_a_moves_target():
    files = product_files()
    assert PRODUCT / "services" / "callbacks.py" in files  # the walk sees the services

    bad = [
        line
        for path in files
        for line in status_writes_not_through_a_move(path.read_text(), str(path))
    ]

    assert bad == []


def test_the_services_do_write_status_and_only_through_moves():
    """The check above is not vacuous: the services' own status writes are move targets."""
    writes = 0
    for path in (PRODUCT / "services").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "status"
                and _is_move_target(node.value)
            ):
                writes += 1
            if isinstance(node, ast.Assign):
                writes += sum(
                    1 for v in _status_assignments(node, in_job_model=False) if v is not None
                )
    assert writes >= 6  # claim, complete, cancel, retry, the fail path, enqueue, agent_end


@pytest.mark.parametrize(
    "source",
    [
        'ProvisioningJob.objects.filter(pk=1).update(status="failed")',
        "ProvisioningJob.objects.filter(pk=1).update(status=JobStatus.FAILED)",
        "ProvisioningJob.objects.create(agent=a, status=JobStatus.QUEUED)",
        "ProvisioningJob(agent=a, status='queued')",
        "job.status = JobStatus.FAILED",
        "job.status, job.error = 'failed', ''",
        "setattr(job, 'status', 'failed')",
        "Model.objects.update_or_create(pk=1, defaults={'status': 'failed'})",
        "class ProvisioningJob:\n    def fail(self):\n        self.status = 'failed'",
    ],
)
def test_the_static_check_catches_a_status_written_by_hand(source):
    assert status_writes_not_through_a_move(source)


@pytest.mark.parametrize(
    "source",
    [
        "ProvisioningJob.objects.filter(status__in=CLAIM.sources).update(status=CLAIM.target)",
        "job.status = move.target",
        "job.status, job.error = CANCEL.target, ''",
        "ProvisioningJob.objects.filter(status=JobStatus.QUEUED).count()",
        "class ApiError(Exception):\n    def __init__(self, status):\n        self.status = status",
    ],
)
def test_the_static_check_lets_moves_and_reads_through(source):
    assert status_writes_not_through_a_move(source) == []


# --- (c) the status-changing moves are exactly the transition table -------------------------


def pairs_of(moves: tuple[Move, ...]) -> set[tuple[str, str]]:
    return {(source, m.target) for m in moves if m.changes_status for source in m.sources}


def test_the_status_changing_moves_are_exactly_the_transitions():
    table = {(source, target) for source, targets in TRANSITIONS.items() for target in targets}

    assert pairs_of(MOVES) == table
    # The documented machine, written out by hand: deriving TRANSITIONS wrongly fails here too.
    assert table == {(Q, P), (Q, F), (P, R), (P, Q), (P, F), (F, Q)}
    assert set(TRANSITIONS) == set(JobStatus.values)
    assert TRANSITIONS[R] == frozenset()  # running is terminal


@pytest.mark.parametrize("move", [m for m in MOVES if m.changes_status], ids=str)
def test_each_status_changing_move_is_in_the_table(move):
    for source in move.sources:
        assert state.can_transition(source, move.target), f"{move}: {source} -> {move.target}"


@pytest.mark.parametrize("move", [m for m in MOVES if not m.changes_status], ids=str)
def test_a_move_that_keeps_the_state_records_no_from_to(move):
    (source,) = move.sources
    assert move.target == source
    assert move.event_statuses(source) == ("", "")


def test_moves_have_distinct_names_and_only_enqueue_creates():
    assert len({m.name for m in MOVES}) == len(MOVES)
    assert [m for m in MOVES if m.creates] == [state.ENQUEUE]
    actions = {m.action for m in MOVES}
    assert actions <= set(JobEvent.Action.values)
    assert JobEvent.Action.NOTE not in actions  # a remark, never a move


def test_the_active_states_are_exactly_those_an_operator_can_cancel():
    assert set(state.ACTIVE_STATUSES) == state.CANCEL.sources
