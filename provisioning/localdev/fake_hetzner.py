"""A loopback fake of the Hetzner Cloud API, enough for the runner and the `hcloud` client.

It speaks the wire format `hcloud` 2.27 reads (`/v1/servers`, `/v1/actions/<id>`, plus the
server type, location and image listings), keeps everything in memory behind one lock, and
behaves like the real API where the runner depends on it:

- server names are unique per project: a second create answers 409 `uniqueness_error`;
- `label_selector` filters lists (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a)`);
- actions run for `action_seconds` (0: they finish at once), the server is `initializing`
  until its create action finishes and `running` afterwards;
- every request needs `Authorization: Bearer <token>` (any token, or exactly `token=` if given).

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
import itertools
import json
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
SERVER_TYPES: dict[str, dict[str, Any]] = {
    "cpx11": {
        "id": 22,
        "cores": 2,
        "memory": 2.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
    },
    "cpx21": {
        "id": 23,
        "cores": 3,
        "memory": 4.0,
        "disk": 80,
        "cpu_type": "shared",
        "architecture": "x86",
    },
    "cpx31": {
        "id": 24,
        "cores": 4,
        "memory": 8.0,
        "disk": 160,
        "cpu_type": "shared",
        "architecture": "x86",
    },
    "cx22": {
        "id": 104,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
    },
    "cax11": {
        "id": 45,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "arm",
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

    def as_json(self) -> dict[str, Any]:
        finished = time.monotonic() >= self.done_at
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
    ) -> None:
        self._lock = threading.RLock()
        self._state = _State()
        self._ids = itertools.count(1000001)
        self._ip_suffix = itertools.count(10)
        self.token = token
        self.action_seconds = action_seconds
        self.verbose = verbose
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
                server_type="cpx11",
                image="ubuntu-24.04",
                location=location,
                labels=labels or {},
                ssh_keys=[],
            )
            if created is not None:
                server["created"] = _iso(created.astimezone(dt.UTC))
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

    # -- the API ---------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        with self._lock:
            self._state.requests.append(
                {"method": method, "path": path, "query": query, "body": body}
            )
            for fault in self._state.faults:
                if fault.method == method and path.startswith(fault.path_prefix):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._state.faults.remove(fault)
                    raise ApiError(fault.status, fault.code, fault.message)
            return self._route(method, path, query, body)

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
        if problems:
            raise ApiError(422, "invalid_input", "invalid input", {"fields": problems})
        if (location, None) in self._state.unavailable or (
            location,
            server_type,
        ) in self._state.unavailable:
            raise ApiError(
                412,
                "resource_unavailable",
                f"server type {server_type} is currently unavailable in {location}",
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

    def _new_action(self, command: str, resource_id: int) -> _Action:
        action = _Action(
            id=next(self._ids),
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
        server_id = next(self._ids)
        suffix = next(self._ip_suffix)
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

    @staticmethod
    def _server_type_json(name: str) -> dict[str, Any]:
        spec = SERVER_TYPES[name]
        return {
            "name": name,
            "description": name.upper(),
            "storage_type": "local",
            "prices": [],
            "deprecation": None,
            **spec,
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
    args = parser.parse_args(argv)
    fake = FakeHetzner(
        host=args.host,
        port=args.port,
        token=args.token,
        action_seconds=args.action_seconds,
        verbose=args.verbose,
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
