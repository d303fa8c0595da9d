"""A loopback fake of the GitHub Actions API with a runner pool: what the launch simulation
dispatches to.

It serves the endpoints the service's GitHub backend calls, on 127.0.0.1 only:

- `POST /app/installations/{id}/access_tokens` (an App JWT signed with the App's key, checked
  against its public key and `iss`): an installation token, valid for an hour of wall time;
- `POST /repos/{owner}/{repo}/actions/workflows/{file}/dispatches` (`return_run_details`: 200
  with `workflow_run_id`, else 204); inputs are checked as GitHub does (422);
- `GET /repos/{owner}/{repo}/actions/runs/{id}`, `POST .../runs/{id}/cancel` (202; 409 once the
  run has completed);
- `GET /repos/{owner}/{repo}/actions/workflows/{file}/runs` and `.../actions/runs` with
  `status`, `event`, `created`, `per_page` (at most 100) and `page`, newest first, a `Link`
  header, and an `ETag`: a request whose `If-None-Match` still matches gets 304, which (as on
  GitHub) costs nothing from the budget.

The runner pool: `slots` runs at once (GitHub-hosted runners per account). A dispatched run is
`queued` until a slot is free, then `in_progress` while `player(run)` runs on its own thread; what
the player returns is the run's conclusion. Cancelling a queued run completes it at once;
cancelling one in progress sets `run.cancelled` and the player is expected to stop.

Budgets, as GitHub answers them: every call with the installation token (except 304s) spends one
of `rate_limit` requests per `window_seconds` (a fixed window from the first call, like GitHub's
hourly reset); spent, the answer is 403 with `x-ratelimit-remaining: 0` and `x-ratelimit-reset`
(epoch seconds). Every answer carries `x-ratelimit-limit/-remaining/-used/-reset/-resource`.
A secondary limit on content-creating calls (POST dispatch and cancel): more than
`secondary_limit` in any `secondary_window_seconds` is answered 429 with `retry-after`.

Webhooks, as a GitHub App subscribed to "Workflow runs" gets them: `workflow_run` with action
`requested` (dispatched), `in_progress` (a runner took it) and `completed` (ended, any
conclusion), POSTed to `webhook_url` by a few delivery threads with GitHub's headers
(`X-GitHub-Event`, `X-GitHub-Delivery`, `X-Hub-Signature-256` = HMAC-SHA256 of the body keyed with
`webhook_secret`). `webhook_drop_share` of the deliveries are lost on the way (GitHub's
deliveries are not guaranteed), so the service's fallback gets exercised; `webhooks` counts the
answers by status and `webhooks_dropped` the lost ones.

What the simulation reads: `calls` (time, method, route, status, whether it counted),
`rate_limited` (403/429 limit answers), `resent_while_held` (a dispatch for a job, attempt and
mode while an earlier run for the same was still queued or in progress), `max_unfinished` (the
most runs dispatched and not completed at any moment), `max_running` and `runs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import math
import queue
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt

WORKFLOW_INPUTS: dict[str, tuple[str, ...] | None] = {
    "job_id": None,
    "attempt": None,
    "mode": ("provision", "cleanup", "deprovision"),
}
UNFINISHED = ("queued", "in_progress")
RUN_STATUS_FILTERS = {"queued", "in_progress", "completed", "waiting", "pending", "requested"}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakeRun:
    id: int
    job_id: str
    attempt: int
    mode: str
    created_at: datetime
    status: str = "queued"
    conclusion: str | None = None
    dispatched_mono: float = field(default_factory=time.monotonic)
    started_mono: float | None = None
    completed_mono: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def title(self) -> str:
        return f"{self.mode} {self.job_id} attempt {self.attempt}"

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.job_id, self.attempt, self.mode)


@dataclass(frozen=True)
class Call:
    at: float  # the fake's clock (time.monotonic() unless a test gives another)
    method: str
    route: str
    status: int
    counted: bool  # spent one request of the budget


class _Refusal(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class FakeGitHub:
    def __init__(
        self,
        *,
        app_id: str,
        installation_id: str,
        app_public_key_pem: str,
        repository: str = "example/agent-provisioning",
        workflow_file: str = "provision.yml",
        slots: int = 20,
        rate_limit: int = 5000,
        window_seconds: float = 3600.0,
        secondary_limit: int = 80,
        secondary_window_seconds: float = 60.0,
        player: Callable[[FakeRun], str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        webhook_url: str | None = None,
        webhook_secret: str = "",
        webhook_drop_share: float = 0.0,
        webhook_seed: int = 18,
    ) -> None:
        self.app_id = str(app_id)
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.webhook_drop_share = webhook_drop_share
        self._webhook_rng = random.Random(webhook_seed)
        self._hooks: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._hook_threads: list[threading.Thread] = []
        self.webhooks: Counter[str] = Counter()  # "event/action status" -> deliveries
        self.webhooks_dropped = 0
        self.installation_id = str(installation_id)
        self._public_key = app_public_key_pem
        self.repository = repository
        self.workflow_file = workflow_file
        self.slots = slots
        self.rate_limit = rate_limit
        self.window_seconds = window_seconds
        self.secondary_limit = secondary_limit
        self.secondary_window_seconds = secondary_window_seconds
        self.player = player or (lambda run: "success")
        self._clock = clock  # the budgets' windows (tests move it)

        self._lock = threading.RLock()
        self._ids = itertools.count(20_000_000_001)
        self.runs: dict[int, FakeRun] = {}
        self._queue: deque[int] = deque()
        self._running = 0
        self._tokens: set[str] = set()
        self._window_start: float | None = None
        self._used = 0
        self._content_calls: deque[float] = deque()
        # what the simulation reads
        self.calls: list[Call] = []
        self.rate_limited = 0
        self.resent_while_held = 0
        self.max_unfinished = 0
        self.max_running = 0
        self.errors: list[str] = []

        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._players: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeGitHub:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-github", daemon=True
        )
        self._thread.start()
        for n in range(4):  # idle until a delivery is queued (webhook_url set)
            hook = threading.Thread(target=self._deliver, name=f"hookshot-{n}", daemon=True)
            hook.start()
            self._hook_threads.append(hook)
        return self

    def stop(self) -> None:
        for _ in self._hook_threads:
            self._hooks.put(None)
        for hook in self._hook_threads:
            hook.join(timeout=5)
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeGitHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the simulation reads -----------------------------------------------------------
    def unfinished(self) -> int:
        with self._lock:
            return sum(1 for r in self.runs.values() if r.status in UNFINISHED)

    def running(self) -> int:
        with self._lock:
            return self._running

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def wait_players(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._players):
            thread.join(max(deadline - time.monotonic(), 0.01))

    # -- webhooks ----------------------------------------------------------------------------
    def _announce(self, run: FakeRun, action: str) -> None:
        """Queue a `workflow_run` delivery (called with the lock held: only builds the body)."""
        if not self.webhook_url:
            return
        if self._webhook_rng.random() < self.webhook_drop_share:
            self.webhooks_dropped += 1
            return
        payload = {
            "action": action,
            "workflow_run": self._run_json(run),
            "workflow": {"path": f".github/workflows/{self.workflow_file}"},
            "repository": {"full_name": self.repository},
            "installation": {"id": int(self.installation_id)},
        }
        self._hooks.put(("workflow_run", json.dumps(payload).encode()))

    def _deliver(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while (item := self._hooks.get()) is not None:
                event, body = item
                action = json.loads(body)["action"]
                signature = hmac.new(self.webhook_secret.encode(), body, hashlib.sha256)
                headers = {
                    "Content-Type": "application/json",
                    "User-Agent": "GitHub-Hookshot/fake",
                    "X-GitHub-Event": event,
                    "X-GitHub-Delivery": str(uuid.uuid4()),
                    "X-GitHub-Hook-Installation-Target-Type": "integration",
                    "X-Hub-Signature-256": "sha256=" + signature.hexdigest(),
                }
                try:
                    answer = client.post(self.webhook_url or "", content=body, headers=headers)
                    status = str(answer.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.webhooks[f"{event}/{action} {status}"] += 1

    # -- the runner pool ---------------------------------------------------------------------
    def _start_queued(self) -> None:
        """Give free slots to the oldest queued runs (called with the lock held)."""
        while self._queue and self._running < self.slots:
            run = self.runs[self._queue.popleft()]
            run.status = "in_progress"
            run.started_mono = time.monotonic()
            self._announce(run, "in_progress")
            self._running += 1
            self.max_running = max(self.max_running, self._running)
            thread = threading.Thread(
                target=self._play, args=(run,), name=f"run-{run.id}", daemon=True
            )
            self._players.append(thread)
            thread.start()

    def _play(self, run: FakeRun) -> None:
        conclusion = "failure"
        try:
            conclusion = self.player(run)
        except Exception as exc:  # a bug in the player: the run fails, the pool goes on
            with self._lock:
                self.errors.append(f"run {run.id}: {type(exc).__name__}: {exc}")
        with self._lock:
            run.status = "completed"
            run.conclusion = "cancelled" if run.cancelled.is_set() else conclusion
            run.completed_mono = time.monotonic()
            self._running -= 1
            self._announce(run, "completed")
            self._start_queued()

    def dispatch_run(self, job_id: str, attempt: int, mode: str) -> FakeRun:
        with self._lock:
            run = FakeRun(
                id=next(self._ids),
                job_id=job_id,
                attempt=attempt,
                mode=mode,
                created_at=datetime.now(UTC),
            )
            if any(r.key == run.key and r.status in UNFINISHED for r in self.runs.values()):
                self.resent_while_held += 1
            self.runs[run.id] = run
            self._queue.append(run.id)
            self._announce(run, "requested")
            self.max_unfinished = max(
                self.max_unfinished,
                sum(1 for r in self.runs.values() if r.status in UNFINISHED),
            )
            self._start_queued()
            return run

    def cancel(self, run: FakeRun) -> bool:
        """False if the run had completed already."""
        with self._lock:
            if run.status == "completed":
                return False
            run.cancelled.set()
            if run.status == "queued":
                self._queue.remove(run.id)
                run.status, run.conclusion = "completed", "cancelled"
                run.completed_mono = time.monotonic()
                self._announce(run, "completed")
            return True

    # -- budgets -----------------------------------------------------------------------------
    def _reset_epoch(self, now: float) -> int:
        start = self._window_start if self._window_start is not None else now
        return math.ceil(time.time() + (start + self.window_seconds - now))

    def rate_headers(self) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            self._roll(now)
            return {
                "x-ratelimit-limit": str(self.rate_limit),
                "x-ratelimit-remaining": str(max(self.rate_limit - self._used, 0)),
                "x-ratelimit-used": str(self._used),
                "x-ratelimit-reset": str(self._reset_epoch(now)),
                "x-ratelimit-resource": "core",
            }

    def _roll(self, now: float) -> None:
        if self._window_start is None or now >= self._window_start + self.window_seconds:
            self._window_start = now
            self._used = 0

    def _spend(self, *, content: bool) -> None:
        """One request of the budget (and of the secondary limit for content-creating calls)."""
        now = self._clock()
        self._roll(now)
        if self._used >= self.rate_limit:
            self.rate_limited += 1
            raise _Refusal(
                403,
                f"API rate limit exceeded for installation ID {self.installation_id}.",
                {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(self._reset_epoch(now))},
            )
        if content:
            while (
                self._content_calls and now - self._content_calls[0] > self.secondary_window_seconds
            ):
                self._content_calls.popleft()
            if len(self._content_calls) >= self.secondary_limit:
                self.rate_limited += 1
                wait = self.secondary_window_seconds - (now - self._content_calls[0])
                raise _Refusal(
                    429,
                    "You have exceeded a secondary rate limit. Please wait a few minutes "
                    "before you try again.",
                    {"retry-after": str(max(math.ceil(wait), 1))},
                )
            self._content_calls.append(now)
        self._used += 1

    # -- requests ----------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body or None, extra headers). Records the call."""
        started = self._clock()
        route, counted = path, False
        try:
            status, payload, extra, route, counted = self._route(method, path, query, headers, body)
        except _Refusal as refusal:
            status, extra = refusal.status, refusal.headers
            payload = {
                "message": refusal.message,
                "documentation_url": "https://docs.github.com/rest",
            }
        with self._lock:
            self.calls.append(Call(started, method, route, status, counted))
        return status, payload, extra

    def _authorize(self, headers: Any) -> None:
        auth = headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        with self._lock:
            if token not in self._tokens:
                raise _Refusal(401, "Bad credentials")

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: Any
    ) -> tuple[int, Any, dict[str, str], str, bool]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["app", "installations"] and parts[3:] == ["access_tokens"]:
            return (*self._token(parts[2], headers), "access_tokens", False)
        owner_repo = "/".join(parts[1:3])
        if parts[:1] != ["repos"] or owner_repo != self.repository or parts[3:4] != ["actions"]:
            raise _Refusal(404, "Not Found")
        self._authorize(headers)
        rest = parts[4:]
        with self._lock:
            if method == "POST" and rest == ["workflows", self.workflow_file, "dispatches"]:
                self._spend(content=True)
                return (*self._dispatch(body), "dispatch", True)
            if method == "GET" and rest in (["workflows", self.workflow_file, "runs"], ["runs"]):
                status, payload, extra = self._list(path, query, headers)
                counted = status != 304
                if counted:
                    self._spend(content=False)
                return status, payload, extra, "list", counted
            if method == "GET" and len(rest) == 2 and rest[0] == "runs":
                self._spend(content=False)
                return (*self._get(rest[1]), "get_run", True)
            if method == "POST" and len(rest) == 3 and rest[0] == "runs" and rest[2] == "cancel":
                self._spend(content=True)
                return (*self._cancel(rest[1]), "cancel", True)
        raise _Refusal(404, "Not Found")

    def _token(self, installation: str, headers: Any) -> tuple[int, Any, dict[str, str]]:
        auth = headers.get("Authorization", "")
        app_jwt = auth[7:] if auth.lower().startswith("bearer ") else ""
        try:
            claims = jwt.decode(
                app_jwt, self._public_key, algorithms=["RS256"], options={"require": ["iss"]}
            )
        except jwt.PyJWTError as exc:
            raise _Refusal(401, f"A JSON web token could not be decoded ({exc})") from None
        if str(claims.get("iss")) != self.app_id or installation != self.installation_id:
            raise _Refusal(404, "Not Found")
        token = f"ghs_fake{next(self._ids)}"
        with self._lock:
            self._tokens.add(token)
        expires = datetime.now(UTC) + timedelta(hours=1)
        return 201, {"token": token, "expires_at": _iso(expires)}, {}

    def _dispatch(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        if not isinstance(body, dict) or not body.get("ref"):
            raise _Refusal(422, "Invalid request: ref is required")
        inputs = body.get("inputs") or {}
        unknown = sorted(set(inputs) - set(WORKFLOW_INPUTS))
        if unknown:
            raise _Refusal(422, f"Unexpected inputs provided: {unknown}")
        for name, options in WORKFLOW_INPUTS.items():
            value = inputs.get(name)
            if value in (None, ""):
                raise _Refusal(422, f"Required input '{name}' not provided")
            if options is not None and value not in options:
                raise _Refusal(422, f"Provided value '{value}' for input '{name}' not in the list")
        try:
            attempt = int(inputs["attempt"])
        except ValueError:
            raise _Refusal(422, "attempt is not a number") from None
        run = self.dispatch_run(str(inputs["job_id"]), attempt, str(inputs["mode"]))
        if not body.get("return_run_details"):
            return 204, None, {}
        api = f"{self.url}/repos/{self.repository}/actions/runs/{run.id}"
        return 200, {"workflow_run_id": run.id, "run_url": api, "html_url": self._html(run)}, {}

    def _html(self, run: FakeRun) -> str:
        return f"https://github.com/{self.repository}/actions/runs/{run.id}"

    def _run_json(self, run: FakeRun) -> dict[str, Any]:
        return {
            "id": run.id,
            "name": "provision",
            "display_title": run.title,
            "event": "workflow_dispatch",
            "status": run.status,
            "conclusion": run.conclusion,
            "head_branch": "main",
            "path": f".github/workflows/{self.workflow_file}",
            "run_attempt": 1,
            "created_at": _iso(run.created_at),
            "html_url": self._html(run),
        }

    def _find(self, run_id: str) -> FakeRun:
        run = self.runs.get(int(run_id)) if run_id.isdigit() else None
        if run is None:
            raise _Refusal(404, "Not Found")
        return run

    def _get(self, run_id: str) -> tuple[int, Any, dict[str, str]]:
        return 200, self._run_json(self._find(run_id)), {}

    def _cancel(self, run_id: str) -> tuple[int, Any, dict[str, str]]:
        if not self.cancel(self._find(run_id)):
            raise _Refusal(409, "Cannot cancel a workflow run that is completed.")
        return 202, {}, {}

    def _list(
        self, path: str, query: dict[str, list[str]], headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        def first(name: str, default: str = "") -> str:
            return (query.get(name) or [default])[0]

        try:
            per_page = min(max(int(first("per_page", "30")), 1), 100)
            page = max(int(first("page", "1")), 1)
        except ValueError:
            raise _Refusal(422, "per_page and page must be numbers") from None
        runs = sorted(self.runs.values(), key=lambda r: r.id, reverse=True)
        status = first("status")
        if status in RUN_STATUS_FILTERS:
            runs = [r for r in runs if r.status == status]
        elif status:  # a conclusion: success, failure, cancelled, ...
            runs = [r for r in runs if r.conclusion == status]
        event = first("event")
        if event and event != "workflow_dispatch":
            runs = []
        created = first("created")
        if created.startswith(">="):
            since = datetime.fromisoformat(created[2:].replace("Z", "+00:00"))
            runs = [r for r in runs if r.created_at >= since]
        total = len(runs)
        chosen = runs[(page - 1) * per_page : page * per_page]
        body = {"total_count": total, "workflow_runs": [self._run_json(r) for r in chosen]}
        etag = 'W/"' + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() + '"'
        extra = {"ETag": etag}
        last = max(math.ceil(total / per_page), 1)
        links = []
        if page < last:
            links.append(f'<{self._page_url(path, query, page + 1)}>; rel="next"')
            links.append(f'<{self._page_url(path, query, last)}>; rel="last"')
        if links:
            extra["Link"] = ", ".join(links)
        if headers.get("If-None-Match") == etag:
            return 304, None, extra
        return 200, body, extra

    def _page_url(self, path: str, query: dict[str, list[str]], page: int) -> str:
        params = {k: v[0] for k, v in query.items()}
        params["page"] = str(page)
        return f"{self.url}{path}?{urlencode(params)}"


def _handler(fake: FakeGitHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeGitHub/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self, method: str) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            status, payload, extra = fake.handle(
                method, split.path, parse_qs(split.query), self.headers, body
            )
            data = b"" if payload is None or status in (204, 304) else json.dumps(payload).encode()
            self.send_response(status)
            headers = {**fake.rate_headers(), **extra}
            if data:
                headers["Content-Type"] = "application/json; charset=utf-8"
            headers["Content-Length"] = str(len(data))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler
