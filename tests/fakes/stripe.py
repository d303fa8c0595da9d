"""Stripe faked at the wire: an HTTP client that refuses every call unless a test gives it answers.

Installed for the whole suite as `stripe.default_http_client` (tests/conftest.py), so neither
dj-stripe's module-level calls nor a StripeClient built without its own client can reach the
network. `calls` records what was attempted, refused or not.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import stripe


@dataclass
class Call:
    method: str
    path: str
    post_data: Any


class RefusingHTTPClient(stripe.HTTPClient):
    """Refuses (APIConnectionError, no retries) unless `answer(method, path, body)` matched."""

    name = "refusing"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self._answers: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def answer(self, method: str, path: str, body: dict[str, Any], status: int = 200) -> None:
        self._answers[(method.lower(), path)] = (status, body)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        path = urlsplit(url).path
        with self._lock:
            self.calls.append(Call(method=method.lower(), path=path, post_data=post_data))
        canned = self._answers.get((method.lower(), path))
        if canned is None:
            raise stripe.APIConnectionError(
                f"Stripe API call refused in tests: {method.upper()} {path}", should_retry=False
            )
        status, body = canned
        return json.dumps(body), status, {"request-id": "req_test"}

    def close(self) -> None:
        pass


class FakeStripeAPI(stripe.HTTPClient):
    """Stripe's list endpoints on the wire, for the reconciler: what a test puts in, Stripe's
    filters and pagination take out.

    `GET /v1/events` (`types[]` or `type`, `created[gte|gt|lte|lt]` or `created=<ts>`),
    `GET /v1/checkout/sessions` (`status`, `created[…]`), `GET /v1/events/<id>`,
    `GET /v1/subscriptions/<id>`. Lists are newest first (`created` descending; objects created
    in the same second in reverse order of insertion), `limit` 1 to 100 (default 10), `has_more`,
    `starting_after` (the next, older page) and `ending_before` (the previous, newer page).
    Anything else answers 404 or 400 with Stripe's error shape. Thread-safe; `calls` records
    every request with its decoded query.
    """

    name = "fake-stripe-api"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.sessions: list[dict[str, Any]] = []
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, dict[str, list[str]]]] = []
        self.fail_next: int = 0  # answer this many requests with 500 (Stripe's retries see them)
        self._lock = threading.Lock()

    # -- what a test puts in ---------------------------------------------------------------

    def add_event(self, event: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.events.append(event)
        return event

    def add_session(self, session: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.sessions.append(session)
        return session

    def list_calls(self, path: str) -> list[dict[str, list[str]]]:
        with self._lock:
            return [query for _m, p, query in self.calls if p == path]

    # -- the wire --------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        parts = urlsplit(url)
        query: dict[str, list[str]] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            query.setdefault(key, []).append(value)
        with self._lock:
            self.calls.append((method.lower(), parts.path, query))
            if self.fail_next > 0:
                self.fail_next -= 1
                return _error(500, "api_error", "Something went wrong on Stripe's end.")
            if method.lower() != "get":
                return _error(404, "invalid_request_error", f"Unrecognized request URL ({method})")
            events, sessions = list(self.events), list(self.sessions)
            subscriptions = dict(self.subscriptions)
        path = parts.path
        try:
            if path == "/v1/events":
                return _ok(_page(_filter_events(events, query), query, path))
            if path == "/v1/checkout/sessions":
                return _ok(_page(_filter_sessions(sessions, query), query, path))
            if path.startswith("/v1/events/"):
                return _one(events, path.rsplit("/", 1)[1])
            if path.startswith("/v1/subscriptions/"):
                found = subscriptions.get(path.rsplit("/", 1)[1])
                return _ok(found) if found else _error(404, "invalid_request_error", "No such")
        except _BadRequest as exc:
            return _error(400, "invalid_request_error", str(exc))
        return _error(404, "invalid_request_error", f"Unrecognized request URL (GET: {path})")

    def close(self) -> None:
        pass


class _BadRequest(Exception):
    pass


def _ok(body: dict[str, Any]) -> tuple[str, int, Mapping[str, str]]:
    return json.dumps(body), 200, {"request-id": "req_fake"}


def _error(status: int, kind: str, message: str) -> tuple[str, int, Mapping[str, str]]:
    return json.dumps({"error": {"type": kind, "message": message}}), status, {}


def _one(objects: list[dict[str, Any]], object_id: str) -> tuple[str, int, Mapping[str, str]]:
    for obj in objects:
        if obj.get("id") == object_id:
            return _ok(obj)
    return _error(404, "invalid_request_error", f"No such object: '{object_id}'")


def _int(query: dict[str, list[str]], key: str) -> int | None:
    values = query.get(key)
    if not values:
        return None
    try:
        return int(values[-1])
    except ValueError:
        raise _BadRequest(f"Invalid integer: {values[-1]}") from None


def _created_ok(obj: dict[str, Any], query: dict[str, list[str]]) -> bool:
    created = int(obj.get("created") or 0)
    exact = _int(query, "created")
    checks = [
        (exact, lambda bound: created == bound),
        (_int(query, "created[gte]"), lambda bound: created >= bound),
        (_int(query, "created[gt]"), lambda bound: created > bound),
        (_int(query, "created[lte]"), lambda bound: created <= bound),
        (_int(query, "created[lt]"), lambda bound: created < bound),
    ]
    return all(bound is None or test(bound) for bound, test in checks)


def _filter_events(
    events: list[dict[str, Any]], query: dict[str, list[str]]
) -> list[dict[str, Any]]:
    types = [v for k, vs in query.items() if k == "types[]" or k.startswith("types[") for v in vs]
    single = query.get("type", [])
    if types and single:
        raise _BadRequest("You may only specify one of these parameters: type, types.")
    if len(types) > 20:
        raise _BadRequest("types: at most 20 event types")
    wanted = set(types or single)
    return [e for e in events if (not wanted or e.get("type") in wanted) and _created_ok(e, query)]


def _filter_sessions(
    sessions: list[dict[str, Any]], query: dict[str, list[str]]
) -> list[dict[str, Any]]:
    status = query.get("status", [None])[-1]
    if status is not None and status not in ("open", "complete", "expired"):
        raise _BadRequest("Invalid status: must be one of open, complete, or expired")
    return [
        s
        for s in sessions
        if (status is None or s.get("status") == status) and _created_ok(s, query)
    ]


def _page(objects: list[dict[str, Any]], query: dict[str, list[str]], url: str) -> dict[str, Any]:
    limit = _int(query, "limit")
    if limit is None:
        limit = 10
    if not 1 <= limit <= 100:
        raise _BadRequest("Invalid limit: must be between 1 and 100")
    # Newest first; within one second, the later insertion first.
    ordered = [
        obj
        for _created, _index, obj in sorted(
            ((int(o.get("created") or 0), i, o) for i, o in enumerate(objects)), reverse=True
        )
    ]
    ids = [str(o.get("id")) for o in ordered]
    after, before = query.get("starting_after", [None])[-1], query.get("ending_before", [None])[-1]
    if after and before:
        raise _BadRequest(
            "You may only specify one of these parameters: starting_after, ending_before."
        )
    if after:
        if after not in ids:
            raise _BadRequest(f"No such object: '{after}'")
        rest = ordered[ids.index(after) + 1 :]
        data = rest[:limit]
        has_more = len(rest) > limit
    elif before:
        if before not in ids:
            raise _BadRequest(f"No such object: '{before}'")
        rest = ordered[: ids.index(before)]
        data = rest[-limit:]
        has_more = len(rest) > limit
    else:
        data = ordered[:limit]
        has_more = len(ordered) > limit
    return {"object": "list", "url": url, "has_more": has_more, "data": data}
