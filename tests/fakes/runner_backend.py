"""An in-memory runner backend: the boundary where GitHub (or the local runner) would start runs.

Tests of the queue core use it to see what would have been dispatched; the GitHub backend itself
is tested at the wire with an httpx.MockTransport.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from uuid import UUID

from provisioning.backends.base import DispatchError, DispatchResult, RunStatus


@dataclass
class RecordingBackend:
    name: str = "recording"
    fail_next: int = 0  # the next N dispatches raise DispatchError (a GitHub 5xx)
    return_run_ids: bool = True
    dispatched: list[tuple[str, int, str, str | None]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(9_000_000_001))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def dispatch(self, *, job_id: UUID, attempt: int, mode: str) -> DispatchResult:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise DispatchError("GitHub answered 502 Bad Gateway")
            run_id = str(next(self._ids)) if self.return_run_ids else None
            self.dispatched.append((str(job_id), attempt, mode, run_id))
        return DispatchResult(run_id=run_id)

    def cancel_run(self, *, run_id: str) -> None:
        with self._lock:
            self.cancelled.append(run_id)

    def get_run(self, *, run_id: str) -> RunStatus | None:
        return None

    def find_run(self, *, job_id: UUID, attempt: int, mode: str = "provision") -> str | None:
        for jid, att, sent_mode, _rid in self.dispatched:
            if jid == str(job_id) and att == attempt and sent_mode == mode:
                return f"ghes-{jid[:8]}-{att}"
        return None

    def run_url(self, *, run_id: str) -> str | None:
        return None

    def runs_for(self, job_id: UUID | str, mode: str | None = None) -> list[str | None]:
        """Run ids dispatched for a job, oldest first (of one mode, if given)."""
        return [
            rid
            for jid, _a, m, rid in self.dispatched
            if jid == str(job_id) and (mode is None or m == mode)
        ]
