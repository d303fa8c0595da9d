"""What the dispatcher needs from a runner backend (GitHub Actions, or a local subprocess)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from uuid import UUID

MODES = ("provision", "cleanup", "deprovision")

# A run in one of these states has not finished and may still claim its job: GitHub holds runs
# `waiting` on an environment's protection rules, `queued`/`pending`/`requested` until a runner
# picks them up. Re-sending its dispatch would only queue a twin behind it.
UNFINISHED_RUN_STATUSES = frozenset({"queued", "waiting", "pending", "requested", "in_progress"})


def run_title(*, job_id: UUID | str, attempt: int, mode: str = "provision") -> str:
    """The workflow's ``run-name`` for one attempt: how a run is found when dispatch gave no id.

    The mode is part of it so a lookup for the provision run never finds the cleanup run the same
    job and attempt may have.
    """
    return f"{mode} {job_id} attempt {attempt}"


@dataclass(frozen=True)
class DispatchResult:
    """A started run. ``run_id`` is None when the backend could not say (GHES answering 204)."""

    run_id: str | None
    run_url: str | None = None


@dataclass(frozen=True)
class RunStatus:
    """A run as the backend sees it: ``status`` queued|in_progress|completed|...;
    ``conclusion`` success|failure|cancelled|... once completed."""

    run_id: str
    status: str
    conclusion: str | None
    html_url: str | None = None
    display_title: str | None = None

    @property
    def is_finished(self) -> bool:
        return self.status == "completed"

    @property
    def may_still_claim(self) -> bool:
        """Not started or still going: the dispatcher waits for it instead of re-sending."""
        return self.status in UNFINISHED_RUN_STATUSES


class DispatchError(Exception):
    """Transient or permanent failure to start (or reach) a run; the message is safe to show
    operators. ``status`` is the HTTP status if there was one; ``retry_after`` how many seconds the
    backend asked us to wait (a rate limit's hint), if it said."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def is_transient(self) -> bool:
        """True for timeouts, connection errors, 5xx and rate limits: worth retrying later."""
        return (
            self.status is None
            or self.status >= 500
            or self.status == 429
            or self.retry_after is not None
        )


class BudgetSpent(DispatchError):
    """The shared API budget has nothing left (or the API said to wait): no request was sent.
    Work waits for `retry_after` seconds; nothing about it failed."""


@runtime_checkable
class RunnerBackend(Protocol):
    name: str

    def dispatch(self, *, job_id: UUID, attempt: int, mode: str) -> DispatchResult:
        """Start a run for ``job_id``/``attempt`` in ``mode`` (provision|cleanup|deprovision)."""
        ...

    def cancel_run(self, *, run_id: str) -> None:
        """Best effort; never raises because the run already finished."""
        ...

    def get_run(self, *, run_id: str) -> RunStatus | None:
        """The run's status, or None if the backend does not know the run."""
        ...

    def find_run(self, *, job_id: UUID, attempt: int, mode: str = "provision") -> str | None:
        """Fallback lookup by the run's title ``<mode> <job_id> attempt <n>`` (run_title)."""
        ...

    def run_url(self, *, run_id: str) -> str | None:
        """A link for operators, if the backend has one."""
        ...


@runtime_checkable
class RunLister(Protocol):
    """A backend that can list its unfinished runs in a few calls (GitHub), so reconciliation
    asks once per round instead of once per job."""

    def list_unfinished_runs(self) -> dict[str, RunStatus]:
        """Every run not finished yet (UNFINISHED_RUN_STATUSES), by run id."""
        ...
