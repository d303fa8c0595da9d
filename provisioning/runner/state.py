"""What one attempt has learned, shared by the workflow's per-step commands through a JSON file.

Only the step commands write the state file, one at a time. The background heartbeat process
never writes it: when the service fences this run out it drops a separate marker file
(`<state>.fenced`), so the two never overwrite each other's changes.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class RunState:
    job_id: str
    attempt: int
    mode: str = "provision"
    claimed: bool = False
    region: str | None = None
    agent: dict[str, Any] = field(default_factory=dict)
    step: str = "claim"
    progress: int = 0
    server_id: str | None = None
    server_name: str | None = None
    ipv4: str | None = None
    location: str | None = None
    # True only for a VM this attempt created; failure cleanup deletes nothing else.
    created_by_this_attempt: bool = False
    # Set before the first complete request leaves: from then on the VM is never deleted.
    complete_sent: bool = False
    completed: bool = False
    failure_reported: bool = False
    # The create was refused for the Hetzner project's server limit: reported as capacity.
    capacity_exhausted: bool = False
    last_error: str | None = None
    # Requests this attempt sent to Hetzner, over every step (each step may be its own process).
    hetzner_calls: int = 0
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    # -- the file --------------------------------------------------------------------------
    @property
    def fence_marker(self) -> Path | None:
        return Path(f"{self.path}.fenced") if self.path else None

    def save(self) -> None:
        if not self.path:
            return
        with self._lock:
            data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: Path) -> RunState:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise StateMissing(f"no runner state at {path}: did the claim step run?") from exc
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}, path=str(path))

    # -- shared with the heartbeat thread --------------------------------------------------
    def set_step(self, step: str, progress: int) -> None:
        with self._lock:
            self.step, self.progress = step, progress
        self.save()

    def set_progress(self, progress: int) -> None:
        with self._lock:
            self.progress = progress
        self.save()

    def count_hetzner_call(self) -> None:
        """One more request sent to Hetzner: counted and written at once, so a step that dies
        next still leaves it for the failure step to report."""
        with self._lock:
            self.hetzner_calls += 1
        self.save()

    def snapshot(self) -> tuple[str, int]:
        with self._lock:
            return self.step, self.progress

    def mark_fenced(self, reason: str) -> None:
        marker = self.fence_marker
        if marker:
            marker.write_text(reason)

    def fenced_reason(self) -> str | None:
        marker = self.fence_marker
        if marker and marker.exists():
            return marker.read_text() or "fenced out"
        return None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StateMissing(Exception):
    """A step command ran without the state the claim step writes."""
