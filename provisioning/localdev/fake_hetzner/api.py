"""`FakeHetzner`: the state tests arrange and read, and the API it answers over HTTP.

Requests come in through `handle` (from the HTTP handler in `handler.py`), under one lock; the
route table maps method and path to a handler method, looked up by name on each request so a
test may replace one (say `_list_servers`) on an instance.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from provisioning.localdev.fake_hetzner.catalogue import IMAGES, LOCATIONS, SERVER_TYPES
from provisioning.localdev.fake_hetzner.errors import ApiError
from provisioning.localdev.fake_hetzner.handler import _Server
from provisioning.localdev.fake_hetzner.labels import labels_match
from provisioning.localdev.fake_hetzner.render import _Rendering
from provisioning.localdev.fake_hetzner.state import (
    _Action,
    _Fault,
    _iso,
    _now,
    _State,
    load_state,
    save_state,
)
from provisioning.localdev.fake_hetzner.validation import field_problems

# A path segment that is a numeric id (`str.isdigit`, as the API has always tested it).
_ID = object()


class _Request(NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    ids: tuple[str, ...]  # the path's id segments, in order


# (method, or None for any; path segments after /v1, `_ID` for an id; handler method name).
# The first match wins, so an id route for any method comes after the ones for GET and DELETE.
_ROUTES: tuple[tuple[str | None, tuple[object, ...], str], ...] = (
    ("GET", ("servers",), "_route_list_servers"),
    ("POST", ("servers",), "_route_create_server"),
    ("GET", ("servers", _ID), "_route_get_server"),
    ("DELETE", ("servers", _ID), "_route_delete_server"),
    (None, ("servers", _ID), "_route_other_server"),
    (None, ("actions", _ID), "_route_get_action"),
    ("GET", ("actions",), "_route_list_actions"),
    ("GET", ("server_types",), "_route_server_types"),
    ("GET", ("locations",), "_route_locations"),
    ("GET", ("images",), "_route_images"),
)


def _match(pattern: tuple[object, ...], parts: list[str]) -> tuple[str, ...] | None:
    """The id segments if `parts` fit `pattern`, else None."""
    if len(pattern) != len(parts):
        return None
    ids: list[str] = []
    for want, part in zip(pattern, parts, strict=True):
        if want is _ID and part.isdigit():
            ids.append(part)
        elif want != part:
            return None
    return tuple(ids)


class FakeHetzner(_Rendering):
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
        save_state(self._state, self.state_file)

    def _load(self) -> None:
        if self.state_file is None:
            return
        load_state(self._state, self.state_file)

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
        for route_method, pattern, handler in _ROUTES:
            if route_method is not None and route_method != method:
                continue
            ids = _match(pattern, parts)
            if ids is not None:
                answer: tuple[int, Any] = getattr(self, handler)(
                    _Request(method, path, query, body, ids)
                )
                return answer
        raise self._no_route(method, path)

    @staticmethod
    def _no_route(method: str, path: str) -> ApiError:
        return ApiError(404, "not_found", f"no route for {method} {path}")

    # -- the routes ------------------------------------------------------------------------
    def _route_list_servers(self, request: _Request) -> tuple[int, Any]:
        return 200, self._list_servers(request.query)

    def _route_create_server(self, request: _Request) -> tuple[int, Any]:
        return 201, self._create_server(request.body)

    def _server_or_404(self, server_id: str) -> dict[str, Any]:
        server = self._state.servers.get(int(server_id))
        if server is None:
            raise ApiError(404, "not_found", f"server with ID '{server_id}' not found")
        return server

    def _route_get_server(self, request: _Request) -> tuple[int, Any]:
        server = self._server_or_404(request.ids[0])
        return 200, {"server": self._server_json(server)}

    def _route_delete_server(self, request: _Request) -> tuple[int, Any]:
        server = self._server_or_404(request.ids[0])
        if any(a.running and a.resource_id == server["id"] for a in self._running()):
            raise ApiError(423, "locked", f"server {server['id']} is locked by a running action")
        return 200, {"action": self._delete_server(server).as_json()}

    def _route_other_server(self, request: _Request) -> tuple[int, Any]:
        # An unknown server is "not found" whatever the method; a known one has no such route.
        self._server_or_404(request.ids[0])
        raise self._no_route(request.method, request.path)

    def _route_get_action(self, request: _Request) -> tuple[int, Any]:
        action = self._state.actions.get(int(request.ids[0]))
        if action is None or request.method != "GET":
            raise ApiError(404, "not_found", f"action with ID '{request.ids[0]}' not found")
        return 200, {"action": action.as_json()}

    def _route_list_actions(self, request: _Request) -> tuple[int, Any]:
        ids = [int(i) for i in request.query.get("id", []) if i.isdigit()]
        found = [self._state.actions[i].as_json() for i in ids if i in self._state.actions]
        return 200, self._page("actions", found, request.query)

    def _route_server_types(self, request: _Request) -> tuple[int, Any]:
        items = [self._server_type_json(n) for n in SERVER_TYPES]
        items = [i for i in items if i["locations"]]  # withdrawn everywhere: gone
        return 200, self._page("server_types", self._by_name(items, request.query), request.query)

    def _route_locations(self, request: _Request) -> tuple[int, Any]:
        items = [self._location_json(n) for n in LOCATIONS]
        return 200, self._page("locations", self._by_name(items, request.query), request.query)

    def _route_images(self, request: _Request) -> tuple[int, Any]:
        items = [self._image_json(n) for n in IMAGES]
        return 200, self._page("images", self._by_name(items, request.query), request.query)

    # -- servers ---------------------------------------------------------------------------
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
        # A missing field reads as "": the checks report it like any invalid value.
        name = body.get("name", "")
        server_type = body.get("server_type", "")
        image = body.get("image", "")
        location = body.get("location") or "fsn1"
        labels = body.get("labels") or {}
        ssh_keys = body.get("ssh_keys") or []
        # Hetzner's order: every field problem at once, then what is sold where, what is
        # available now, the project's limit, and last the name's uniqueness.
        problems = field_problems(
            name=name,
            server_type=server_type,
            image=image,
            location=location,
            labels=labels,
            ssh_keys=ssh_keys,
            known_ssh_keys=self.ssh_keys,
        )
        if problems:
            raise ApiError(400, "invalid_input", "invalid input", {"fields": problems})
        self._check_sold(server_type, location)
        self._check_available(server_type, location)
        self._check_server_limit()
        self._check_unique_name(name)
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

    def _check_sold(self, server_type: str, location: str) -> None:
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

    def _check_available(self, server_type: str, location: str) -> None:
        if (location, None) in self._state.unavailable or (
            location,
            server_type,
        ) in self._state.unavailable:
            raise ApiError(
                403,
                "resource_unavailable",
                f"server type {server_type} is currently unavailable in {location}",
            )

    def _check_server_limit(self) -> None:
        if len(self._state.servers) >= self.server_limit:
            raise ApiError(
                403,
                "resource_limit_exceeded",
                f"server limit of {self.server_limit} exceeded for this project",
                {"limits": [{"name": "server_limit"}]},
            )

    def _check_unique_name(self, name: str) -> None:
        if any(s["name"] == name for s in self._state.servers.values()):
            raise ApiError(
                409,
                "uniqueness_error",
                "server name is already used",
                {"fields": [{"name": "name"}]},
            )

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
