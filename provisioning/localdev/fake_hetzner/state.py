"""What the fake remembers: servers, actions, arranged faults, and the JSON file that keeps them.

Everything here is read and changed under `FakeHetzner`'s lock; nothing in this module locks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


@dataclass
class _Action:
    id: int
    command: str
    resource_id: int
    started: dt.datetime
    done_at: float  # time.monotonic() at which it finishes
    fails_with: str | None = None

    @property
    def running(self) -> bool:
        return time.monotonic() < self.done_at

    def as_json(self) -> dict[str, Any]:
        finished = not self.running
        status = "running"
        error = None
        if finished:
            status = "error" if self.fails_with else "success"
            if self.fails_with:
                error = {"code": "action_failed", "message": self.fails_with}
        return {
            "id": self.id,
            "command": self.command,
            "status": status,
            "progress": 100 if finished else 50,
            "started": _iso(self.started),
            "finished": _iso(_now()) if finished else None,
            "resources": [{"id": self.resource_id, "type": "server"}],
            "error": error,
        }


@dataclass
class _Fault:
    method: str
    path_prefix: str
    status: int
    code: str
    message: str
    times: int


@dataclass
class _State:
    servers: dict[int, dict[str, Any]] = field(default_factory=dict)
    actions: dict[int, _Action] = field(default_factory=dict)
    create_action: dict[int, int] = field(default_factory=dict)  # server id -> its create action
    deleted: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    faults: list[_Fault] = field(default_factory=list)
    unavailable: set[tuple[str, str | None]] = field(default_factory=set)
    # (server type, location) no longer sold; True: the listing still shows it (lagging)
    withdrawn: dict[tuple[str, str], bool] = field(default_factory=dict)
    next_id: int = 1000001
    next_ip: int = 10  # addresses are counted up and never reused


def save_state(state: _State, state_file: Path) -> None:
    """Write what a restart must remember: servers, actions, the deleted, the id and address
    counters. Requests, faults and what tests arranged are not kept."""
    data = {
        "servers": list(state.servers.values()),
        "actions": [
            {
                "id": a.id,
                "command": a.command,
                "resource_id": a.resource_id,
                "started": _iso(a.started),
                "fails_with": a.fails_with,
            }
            for a in state.actions.values()
        ],
        "create_action": {str(k): v for k, v in state.create_action.items()},
        "deleted": state.deleted,
        "next_id": state.next_id,
        "next_ip": state.next_ip,
    }
    state_file.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so a reader (or a crash) never sees half a file.
    tmp = state_file.with_name(f".{state_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, state_file)


def load_state(state: _State, state_file: Path) -> None:
    """Read what `save_state` wrote into `state` (nothing if there is no file yet)."""
    if not state_file.exists():
        return
    data = json.loads(state_file.read_text())
    state.servers = {int(s["id"]): s for s in data.get("servers", [])}
    for raw in data.get("actions", []):
        started = dt.datetime.fromisoformat(str(raw["started"]).replace("Z", "+00:00"))
        # Whatever ran before the restart has finished by now.
        state.actions[int(raw["id"])] = _Action(
            id=int(raw["id"]),
            command=raw["command"],
            resource_id=int(raw["resource_id"]),
            started=started,
            done_at=0.0,
            fails_with=raw.get("fails_with"),
        )
    state.create_action = {int(k): int(v) for k, v in data.get("create_action", {}).items()}
    state.deleted = list(data.get("deleted", []))
    state.next_id = int(data.get("next_id", state.next_id))
    state.next_ip = int(data.get("next_ip", state.next_ip))
