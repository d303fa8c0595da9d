"""A loopback fake of the Hetzner Cloud API, enough for the runner and the `hcloud` client.

It speaks the wire format `hcloud` 2.27 reads (`/v1/servers`, `/v1/actions/<id>`, plus the
server type, location and image listings), keeps everything in memory behind one lock, and
behaves like the real API where the runner depends on it:

- errors are `{"error": {"code", "message", "details"}}` with Hetzner's HTTP statuses:
  `invalid_input` 400, `unauthorized` 401, `resource_limit_exceeded` and `resource_unavailable`
  403, `not_found` 404, `uniqueness_error` 409, `locked` 423, `rate_limit_exceeded` 429;
- server names are unique per project: a second create answers 409 `uniqueness_error`;
- server types are sold per location (`server_types[].locations`, each with its own
  `deprecation`): a create in a location the type is not sold in (or no longer sold in) answers
  400 `invalid_input`, as does an SSH key name the project does not have;
- the project has a server limit (`server_limit`): a create beyond it answers 403
  `resource_limit_exceeded`;
- `label_selector` filters lists (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a)`);
- actions run for `action_seconds` (0: they finish at once), the server is `initializing`
  until its create action finishes and `running` afterwards; while an action on a server runs,
  deleting it answers 423 `locked`;
- every answer carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`; the
  budget (`rate_limit` requests, one more each `rate_refill_seconds`) spent, 429
  `rate_limit_exceeded`;
- every request needs `Authorization: Bearer <token>` (any token, or exactly `token=` if given);
- with `state_file`, servers, actions and the address counter are kept in that JSON file, so a
  restart forgets nothing; an IPv4 address is never handed out twice.

Use it in-process as a context manager::

    with FakeHetzner() as fake:
        client = hcloud.Client(token="t", api_endpoint=fake.url)
        ...
        assert [s["name"] for s in fake.servers] == ["agent-..."]

or as a process: ``python -m provisioning.localdev.fake_hetzner --port 8701``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

LOCATIONS: dict[str, dict[str, Any]] = {
    "fsn1": {
        "id": 1,
        "description": "Falkenstein DC Park 1",
        "country": "DE",
        "city": "Falkenstein",
        "latitude": 50.47612,
        "longitude": 12.370071,
        "network_zone": "eu-central",
    },
    "nbg1": {
        "id": 2,
        "description": "Nuremberg DC Park 1",
        "country": "DE",
        "city": "Nuremberg",
        "latitude": 49.452102,
        "longitude": 11.076665,
        "network_zone": "eu-central",
    },
    "hel1": {
        "id": 3,
        "description": "Helsinki DC Park 1",
        "country": "FI",
        "city": "Helsinki",
        "latitude": 60.169855,
        "longitude": 24.938379,
        "network_zone": "eu-central",
    },
    "ash": {
        "id": 4,
        "description": "Ashburn, VA",
        "country": "US",
        "city": "Ashburn, VA",
        "latitude": 39.045821,
        "longitude": -77.487073,
        "network_zone": "us-east",
    },
    "hil": {
        "id": 5,
        "description": "Hillsboro, OR",
        "country": "US",
        "city": "Hillsboro, OR",
        "latitude": 45.54222,
        "longitude": -122.95194,
        "network_zone": "us-west",
    },
    "sin": {
        "id": 6,
        "description": "Singapore",
        "country": "SG",
        "city": "Singapore",
        "latitude": 1.283333,
        "longitude": 103.833333,
        "network_zone": "ap-southeast",
    },
}
# Server types are sold per location. The first-generation CPX and second-generation CX types
# were deprecated in every location and can no longer be ordered; the current ones are sold where
# listed: CX (gen 3) in Europe only, CPX (gen 2) everywhere, CAX (Arm) in Europe only.
_EU = ("fsn1", "nbg1", "hel1")
_EVERYWHERE = (*_EU, "ash", "hil", "sin")
_GONE = {"announced": "2025-10-16T06:00:00Z", "unavailable_after": "2026-01-01T00:00:00Z"}
SERVER_TYPES: dict[str, dict[str, Any]] = {
    "cpx11": {
        "id": 22,
        "cores": 2,
        "memory": 2.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": _GONE,
    },
    "cpx21": {
        "id": 23,
        "cores": 3,
        "memory": 4.0,
        "disk": 80,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": _GONE,
    },
    "cx22": {
        "id": 104,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "cost_optimized",
        "locations": _EU,
        "deprecation": _GONE,
    },
    "cx23": {
        "id": 114,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "cost_optimized",
        "locations": _EU,
        "deprecation": None,
    },
    "cpx22": {
        "id": 118,
        "cores": 2,
        "memory": 4.0,
        "disk": 80,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": None,
    },
    "cpx32": {
        "id": 119,
        "cores": 4,
        "memory": 8.0,
        "disk": 160,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": None,
    },
    "cax11": {
        "id": 45,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "arm",
        "category": "cost_optimized",
        "locations": _EU,
        "deprecation": None,
    },
}
IMAGES: dict[str, dict[str, Any]] = {
    "ubuntu-24.04": {
        "id": 161547269,
        "os_flavor": "ubuntu",
        "os_version": "24.04",
        "description": "Ubuntu 24.04",
    },
    "ubuntu-22.04": {
        "id": 67794396,
        "os_flavor": "ubuntu",
        "os_version": "22.04",
        "description": "Ubuntu 22.04",
    },
    "debian-12": {
        "id": 114690387,
        "os_flavor": "debian",
        "os_version": "12",
        "description": "Debian 12",
    },
}

# RFC 1123 host name, as Hetzner requires for server names.
_NAME_RE = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")
# Hetzner label values: up to 63 chars, alphanumerics plus - _ . inside.
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


class ApiError(Exception):
    """An error answer in Hetzner's shape: `{"error": {"code", "message", "details"}}`."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or {}


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


def _parse_label_selector(selector: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Split `a=b,c in (d,e),!f` into (key, operator, values) terms."""
    terms: list[str] = []
    depth, current = 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    parsed: list[tuple[str, str, tuple[str, ...]]] = []
    for raw in (t.strip() for t in terms):
        if not raw:
            continue
        set_match = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", raw)
        if set_match:
            values = tuple(v.strip() for v in set_match.group(3).split(",") if v.strip())
            parsed.append((set_match.group(1), set_match.group(2), values))
        elif "!=" in raw:
            key, value = raw.split("!=", 1)
            parsed.append((key.strip(), "!=", (value.strip(),)))
        elif "==" in raw:
            key, value = raw.split("==", 1)
            parsed.append((key.strip(), "=", (value.strip(),)))
        elif "=" in raw:
            key, value = raw.split("=", 1)
            parsed.append((key.strip(), "=", (value.strip(),)))
        elif raw.startswith("!"):
            parsed.append((raw[1:].strip(), "absent", ()))
        else:
            parsed.append((raw, "present", ()))
    return parsed


def labels_match(labels: dict[str, str], selector: str) -> bool:
    """True if `labels` satisfy every term of a Hetzner label selector."""
    for key, op, values in _parse_label_selector(selector):
        present = key in labels
        value = labels.get(key)
        if op == "=":
            ok = present and value == values[0]
        elif op == "!=":
            ok = value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = value not in values
        else:
            ok = present if op == "present" else not present
        if not ok:
            return False
    return True


class FakeHetzner:
    """The fake API: an HTTP server in a daemon thread plus the state tests inspect."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        action_seconds: float = 0.0,
        verbose: bool = False,
        ssh_keys: tuple[str, ...] = ("agent-provisioning-local",),
        server_limit: int = 100,
        rate_limit: int = 3600,
        rate_refill_seconds: float = 1.0,
        state_file: str | Path | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._state = _State()
        self.token = token
        self.action_seconds = action_seconds
        self.verbose = verbose
        self.ssh_keys = set(ssh_keys)
        self.server_limit = server_limit
        self.rate_limit = rate_limit
        self.rate_refill_seconds = rate_refill_seconds
        self._rate_remaining = float(rate_limit)
        self._rate_at = time.monotonic()
        self.state_file = Path(state_file) if state_file else None
        if self.state_file is not None:
            self._load()
        self._httpd = _Server((host, port), self)
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The `api_endpoint` to give `hcloud.Client` (and `HCLOUD_API_ENDPOINT`)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeHetzner:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fake-hetzner", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHetzner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read and arrange -------------------------------------------------------
    @property
    def servers(self) -> list[dict[str, Any]]:
        """Snapshots of the servers that exist now, oldest first."""
        with self._lock:
            return [self._server_json(s) for s in self._state.servers.values()]

    @property
    def deleted_servers(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._state.deleted)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request seen: method, path, query, body (parsed JSON or None)."""
        with self._lock:
            return copy.deepcopy(self._state.requests)

    def add_server(
        self,
        *,
        name: str,
        labels: dict[str, str] | None = None,
        location: str = "ash",
        created: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Make a running server directly, as if someone had created it earlier (`created`:
        when, default now; the reaper's grace period reads it)."""
        with self._lock:
            server = self._new_server(
                name=name,
                server_type="cpx22",
                image="ubuntu-24.04",
                location=location,
                labels=labels or {},
                ssh_keys=[],
            )
            if created is not None:
                server["created"] = _iso(created.astimezone(dt.UTC))
            self._save()
            return self._server_json(server)

    def fail_next(
        self,
        method: str,
        path_prefix: str,
        *,
        status: int = 503,
        code: str = "unavailable",
        message: str = "service temporarily unavailable",
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests matching method and path prefix with an error."""
        with self._lock:
            self._state.faults.append(
                _Fault(method.upper(), path_prefix, status, code, message, times)
            )

    def make_unavailable(self, location: str, server_type: str | None = None) -> None:
        """Refuse creates in `location` (for `server_type`, or any) with `resource_unavailable`."""
        with self._lock:
            self._state.unavailable.add((location, server_type))

    def stop_selling(self, server_type: str, location: str, *, still_listed: bool = False) -> None:
        """`server_type` is no longer sold in `location`: creates there answer `invalid_input`.
        `still_listed`: the server type listing has not caught up yet and still names it."""
        with self._lock:
            self._state.withdrawn[(server_type, location)] = still_listed

    def add_ssh_key(self, name: str) -> None:
        with self._lock:
            self.ssh_keys.add(name)

    # -- persistence -----------------------------------------------------------------------
    def _save(self) -> None:
        """Write what a restart must remember (called under the lock after every change)."""
        if self.state_file is None:
            return
        state = self._state
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
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.state_file)

    def _load(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        data = json.loads(self.state_file.read_text())
        state = self._state
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

    def _new_id(self) -> int:
        new = self._state.next_id
        self._state.next_id += 1
        return new

    # -- rate limit ------------------------------------------------------------------------
    def rate_headers(self) -> dict[str, str]:
        """RateLimit-* as Hetzner sends them: the budget, what is left, when it is full again."""
        with self._lock:
            self._refill()
            missing = self.rate_limit - self._rate_remaining
            full_at = time.time() + missing * self.rate_refill_seconds
            return {
                "RateLimit-Limit": str(self.rate_limit),
                "RateLimit-Remaining": str(int(self._rate_remaining)),
                "RateLimit-Reset": str(math.ceil(full_at)),
            }

    def _refill(self) -> None:
        now = time.monotonic()
        if self.rate_refill_seconds > 0:
            gained = (now - self._rate_at) / self.rate_refill_seconds
            self._rate_remaining = min(float(self.rate_limit), self._rate_remaining + gained)
        self._rate_at = now

    def _spend_rate(self) -> None:
        self._refill()
        if self._rate_remaining < 1:
            raise ApiError(429, "rate_limit_exceeded", "limit of requests per hour reached")
        self._rate_remaining -= 1

    # -- the API ---------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        with self._lock:
            self._state.requests.append(
                {"method": method, "path": path, "query": query, "body": body}
            )
            self._spend_rate()
            for fault in self._state.faults:
                if fault.method == method and path.startswith(fault.path_prefix):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._state.faults.remove(fault)
                    raise ApiError(fault.status, fault.code, fault.message)
            answer = self._route(method, path, query, body)
            if method != "GET":
                self._save()
            return answer

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "v1":
            raise ApiError(404, "not_found", "unknown path")
        parts = parts[1:]
        if parts == ["servers"] and method == "GET":
            return 200, self._list_servers(query)
        if parts == ["servers"] and method == "POST":
            return 201, self._create_server(body)
        if len(parts) == 2 and parts[0] == "servers" and parts[1].isdigit():
            server = self._state.servers.get(int(parts[1]))
            if server is None:
                raise ApiError(404, "not_found", f"server with ID '{parts[1]}' not found")
            if method == "GET":
                return 200, {"server": self._server_json(server)}
            if method == "DELETE":
                if any(a.running and a.resource_id == server["id"] for a in self._running()):
                    raise ApiError(
                        423, "locked", f"server {server['id']} is locked by a running action"
                    )
                return 200, {"action": self._delete_server(server).as_json()}
        if len(parts) == 2 and parts[0] == "actions" and parts[1].isdigit():
            action = self._state.actions.get(int(parts[1]))
            if action is None or method != "GET":
                raise ApiError(404, "not_found", f"action with ID '{parts[1]}' not found")
            return 200, {"action": action.as_json()}
        if parts == ["actions"] and method == "GET":
            ids = [int(i) for i in query.get("id", []) if i.isdigit()]
            found = [self._state.actions[i].as_json() for i in ids if i in self._state.actions]
            return 200, self._page("actions", found, query)
        if parts == ["server_types"] and method == "GET":
            items = [self._server_type_json(n) for n in SERVER_TYPES]
            items = [i for i in items if i["locations"]]  # withdrawn everywhere: gone
            return 200, self._page("server_types", self._by_name(items, query), query)
        if parts == ["locations"] and method == "GET":
            items = [self._location_json(n) for n in LOCATIONS]
            return 200, self._page("locations", self._by_name(items, query), query)
        if parts == ["images"] and method == "GET":
            items = [self._image_json(n) for n in IMAGES]
            return 200, self._page("images", self._by_name(items, query), query)
        raise ApiError(404, "not_found", f"no route for {method} {path}")

    @staticmethod
    def _by_name(items: list[dict[str, Any]], query: dict[str, list[str]]) -> list[dict[str, Any]]:
        names = query.get("name")
        return [i for i in items if i["name"] in names] if names else items

    @staticmethod
    def _page(key: str, items: list[Any], query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            page = max(1, int(query.get("page", ["1"])[0]))
            per_page = min(50, max(1, int(query.get("per_page", ["25"])[0])))
        except ValueError as exc:
            raise ApiError(400, "invalid_input", "page and per_page must be integers") from exc
        last_page = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        return {
            key: chunk,
            "meta": {
                "pagination": {
                    "page": page,
                    "per_page": per_page,
                    "previous_page": page - 1 if page > 1 else None,
                    "next_page": page + 1 if page < last_page else None,
                    "last_page": last_page,
                    "total_entries": len(items),
                }
            },
        }

    def _list_servers(self, query: dict[str, list[str]]) -> dict[str, Any]:
        found = list(self._state.servers.values())
        if "name" in query:
            found = [s for s in found if s["name"] == query["name"][0]]
        if "label_selector" in query:
            selector = query["label_selector"][0]
            found = [s for s in found if labels_match(s["labels"], selector)]
        if "status" in query:
            found = [s for s in found if self._status(s) in query["status"]]
        return self._page("servers", [self._server_json(s) for s in found], query)

    def _create_server(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_input", "request body must be a JSON object")
        # A missing field reads as "": the checks below report it like any invalid value.
        name = body.get("name", "")
        server_type = body.get("server_type", "")
        image = body.get("image", "")
        location = body.get("location") or "fsn1"
        labels = body.get("labels") or {}
        ssh_keys = body.get("ssh_keys") or []
        problems = []
        if not isinstance(name, str) or not _NAME_RE.match(name):
            problems.append({"name": "name", "messages": ["must be a valid hostname"]})
        if server_type not in SERVER_TYPES:
            problems.append({"name": "server_type", "messages": ["unknown server type"]})
        if image not in IMAGES:
            problems.append({"name": "image", "messages": ["unknown image"]})
        if location not in LOCATIONS:
            problems.append({"name": "location", "messages": ["unknown location"]})
        if not isinstance(labels, dict) or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and _LABEL_KEY_RE.match(k)
            and _LABEL_VALUE_RE.match(v)
            for k, v in labels.items()
        ):
            problems.append({"name": "labels", "messages": ["invalid label"]})
        if not isinstance(ssh_keys, list) or not all(
            isinstance(k, str | int) and (str(k) in self.ssh_keys) for k in ssh_keys
        ):
            problems.append({"name": "ssh_keys", "messages": ["ssh key not found"]})
        if problems:
            raise ApiError(400, "invalid_input", "invalid input", {"fields": problems})
        if not self._sold(server_type, location):
            raise ApiError(
                400,
                "invalid_input",
                "unsupported location for server type",
                {
                    "fields": [
                        {"name": "location", "messages": ["unsupported location for server type"]}
                    ]
                },
            )
        if (location, None) in self._state.unavailable or (
            location,
            server_type,
        ) in self._state.unavailable:
            raise ApiError(
                403,
                "resource_unavailable",
                f"server type {server_type} is currently unavailable in {location}",
            )
        if len(self._state.servers) >= self.server_limit:
            raise ApiError(
                403,
                "resource_limit_exceeded",
                f"server limit of {self.server_limit} exceeded for this project",
                {"limits": [{"name": "server_limit"}]},
            )
        if any(s["name"] == name for s in self._state.servers.values()):
            raise ApiError(
                409,
                "uniqueness_error",
                "server name is already used",
                {"fields": [{"name": "name"}]},
            )
        server = self._new_server(
            name=name,
            server_type=server_type,
            image=image,
            location=location,
            labels=labels,
            ssh_keys=ssh_keys,
        )
        action = self._state.actions[self._state.create_action[server["id"]]]
        start = self._new_action("start_server", server["id"])
        return {
            "server": self._server_json(server),
            "action": action.as_json(),
            "next_actions": [start.as_json()],
            "root_password": None if ssh_keys else "generated-root-password",
        }

    def _running(self) -> list[_Action]:
        return [a for a in self._state.actions.values() if a.running]

    def _sold(self, server_type: str, location: str) -> bool:
        """Whether `server_type` can be ordered in `location` now (listed, not withdrawn, not
        past its deprecation's `unavailable_after`)."""
        spec = SERVER_TYPES[server_type]
        if location not in spec["locations"] or (server_type, location) in self._state.withdrawn:
            return False
        deprecation = spec["deprecation"]
        if deprecation is None:
            return True
        ends = dt.datetime.fromisoformat(deprecation["unavailable_after"].replace("Z", "+00:00"))
        return _now() < ends

    def _new_action(self, command: str, resource_id: int) -> _Action:
        action = _Action(
            id=self._new_id(),
            command=command,
            resource_id=resource_id,
            started=_now(),
            done_at=time.monotonic() + self.action_seconds,
        )
        self._state.actions[action.id] = action
        return action

    def _new_server(
        self,
        *,
        name: str,
        server_type: str,
        image: str,
        location: str,
        labels: dict[str, str],
        ssh_keys: list[Any],
    ) -> dict[str, Any]:
        server_id = self._new_id()
        suffix = self._state.next_ip
        self._state.next_ip += 1
        server = {
            "id": server_id,
            "name": name,
            "created": _iso(_now()),
            "server_type": server_type,
            "image": image,
            "location": location,
            "labels": dict(labels),
            "ssh_keys": list(ssh_keys),
            # Documentation ranges (RFC 5737 / RFC 3849): never a real host.
            "ipv4": f"203.0.{113 + suffix // 250}.{suffix % 250 + 1}",
            "ipv6": f"2001:db8:{suffix:x}::/64",
        }
        self._state.servers[server_id] = server
        self._state.create_action[server_id] = self._new_action("create_server", server_id).id
        return server

    def _delete_server(self, server: dict[str, Any]) -> _Action:
        del self._state.servers[server["id"]]
        self._state.deleted.append(self._server_json(server) | {"status": "deleted"})
        return self._new_action("delete_server", server["id"])

    def _status(self, server: dict[str, Any]) -> str:
        action = self._state.actions.get(self._state.create_action.get(server["id"], -1))
        if action is not None and time.monotonic() < action.done_at:
            return "initializing"
        return "running"

    def _server_json(self, server: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": server["id"],
            "name": server["name"],
            "status": self._status(server),
            "created": server["created"],
            "public_net": {
                "ipv4": {
                    "id": server["id"] + 7,
                    "ip": server["ipv4"],
                    "blocked": False,
                    "dns_ptr": f"static.{server['ipv4']}.clients.your-server.de",
                },
                "ipv6": {
                    "id": server["id"] + 8,
                    "ip": server["ipv6"],
                    "blocked": False,
                    "dns_ptr": [],
                },
                "floating_ips": [],
                "firewalls": [],
            },
            "private_net": [],
            "server_type": self._server_type_json(server["server_type"]),
            "location": self._location_json(server["location"]),
            "image": self._image_json(server["image"]),
            "iso": None,
            "rescue_enabled": False,
            "locked": False,
            "backup_window": None,
            "outgoing_traffic": 0,
            "ingoing_traffic": 0,
            "included_traffic": 21990232555520,
            "protection": {"delete": False, "rebuild": False},
            "labels": dict(server["labels"]),
            "volumes": [],
            "load_balancers": [],
            "primary_disk_size": SERVER_TYPES[server["server_type"]]["disk"],
            "placement_group": None,
            # Not part of Hetzner's answer; kept so tests can check a key was passed.
            "x_fake_ssh_keys": list(server["ssh_keys"]),
        }

    def _server_type_json(self, name: str) -> dict[str, Any]:
        spec = SERVER_TYPES[name]
        listed = [
            loc
            for loc in spec["locations"]
            if self._state.withdrawn.get((name, loc), True)  # absent, or withdrawn but listed
        ]
        return {
            **{k: v for k, v in spec.items() if k not in ("locations", "deprecation")},
            "name": name,
            "description": name.upper(),
            "storage_type": "local",
            "prices": [],
            # The type-wide field is kept for older clients; the per-location one is current.
            "deprecation": spec["deprecation"],
            "locations": [
                {
                    "id": LOCATIONS[loc]["id"],
                    "name": loc,
                    "deprecation": spec["deprecation"],
                    "available": (loc, None) not in self._state.unavailable
                    and (loc, name) not in self._state.unavailable,
                    "recommended": spec["deprecation"] is None,
                }
                for loc in listed
            ],
        }

    @staticmethod
    def _location_json(name: str) -> dict[str, Any]:
        return {"name": name, **LOCATIONS[name]}

    @staticmethod
    def _image_json(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "type": "system",
            "status": "available",
            "architecture": "x86",
            "rapid_deploy": True,
            "protection": {"delete": False},
            "labels": {},
            "deprecation": None,
            **IMAGES[name],
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeHetzner) -> None:
        super().__init__(address, _Handler)
        self.fake = fake


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "FakeHetzner/1.0"
    protocol_version = "HTTP/1.1"

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not token or (fake.token is not None and token != fake.token):
                raise ApiError(401, "unauthorized", "unable to authenticate")
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                raise ApiError(400, "json_error", "invalid JSON in request body") from exc
            status, payload = fake.handle(method, split.path, parse_qs(split.query), body)
        except ApiError as err:
            status = err.status
            payload = {"error": {"code": err.code, "message": err.message, "details": err.details}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Correlation-Id", f"fake-{time.monotonic_ns():x}")
        for header, value in fake.rate_headers().items():
            self.send_header(header, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            sys.stderr.write(f"fake-hetzner: {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback fake of the Hetzner Cloud API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--token", default=None, help="accept only this bearer token")
    parser.add_argument(
        "--action-seconds", type=float, default=1.0, help="how long each action runs"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument(
        "--state-file", default=None, help="keep servers in this JSON file across restarts"
    )
    parser.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        help="an SSH key name the project has (repeatable; agent-provisioning-local always)",
    )
    parser.add_argument("--server-limit", type=int, default=100, help="the project's limit")
    args = parser.parse_args(argv)
    fake = FakeHetzner(
        host=args.host,
        port=args.port,
        token=args.token,
        action_seconds=args.action_seconds,
        verbose=args.verbose,
        ssh_keys=("agent-provisioning-local", *args.ssh_key),
        server_limit=args.server_limit,
        state_file=args.state_file,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with fake:
        print(f"fake Hetzner API listening on http://{args.host}:{fake.port}/v1", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
