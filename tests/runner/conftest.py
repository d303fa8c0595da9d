"""Loopback fakes the runner talks to: our callback API, GitHub's OIDC token endpoint, Hetzner.

The runner under test is the real CLI in a subprocess (`python -m provisioning.runner ...`),
exactly what the local backend starts, so the fakes sit on real sockets.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.fakes.hetzner import fake_hetzner  # noqa: F401 - a fixture for this package

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUEST_TOKEN = "request-token-for-tests"
AUDIENCE = "https://provisioning.example.test"


@dataclass
class Call:
    verb: str
    body: dict[str, Any]
    token: str


@dataclass
class FakeCallbackApi:
    """Our workflow callback API plus GitHub's ID-token endpoint, on one loopback port.

    `script[verb]` holds (status, body) answers to give before falling back to success;
    `refuse_heartbeats_after` makes every heartbeat after the first n answer 409. The reaper's
    `POST /api/v1/reaper/verdicts` answers with `reaper_answer(servers)` (status, body).
    """

    region: str = "us-east"
    agent_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    reaper_answer: Callable[[list[dict[str, Any]]], tuple[int, dict[str, Any]]] | None = None
    script: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    refuse_heartbeats_after: int | None = None
    kind: str | None = None  # the job kind the claim answers (None: leave it out)
    calls: list[Call] = field(default_factory=list)
    minted: list[str] = field(default_factory=list)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    reused_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._counter = itertools.count(1)
        self._used: set[str] = set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def verbs(self) -> list[str]:
        with self.lock:
            return [c.verb for c in self.calls]

    def of(self, verb: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.verb == verb]

    # -- answers ---------------------------------------------------------------------------
    def mint(self, query: dict[str, list[str]], authorization: str) -> tuple[int, dict]:
        with self.lock:
            self.token_requests.append({"query": query, "authorization": authorization})
            if authorization != f"bearer {REQUEST_TOKEN}":
                return 401, {"message": "bad request token"}
            token = f"jwt-{next(self._counter)}-{uuid.uuid4().hex}"
            self.minted.append(token)
            return 200, {"count": 1, "value": token}

    def answer(self, job_id: str, verb: str, body: dict, authorization: str) -> tuple[int, dict]:
        token = authorization.removeprefix("Bearer ")
        with self.lock:
            if token not in self.minted:
                return 401, {"detail": "unknown token", "code": "invalid_token"}
            if token in self._used:
                self.reused_tokens.append(token)
                return 409, {"detail": "token already used", "code": "token_reused"}
            self._used.add(token)
            self.calls.append(Call(verb, body, token))
            scripted = self.script.get(verb)
            if scripted:
                return scripted.pop(0)
            beats = len([c for c in self.calls if c.verb == "heartbeat"])
            limit = self.refuse_heartbeats_after
            if verb == "heartbeat" and limit is not None and beats > limit:
                return 409, {"detail": "job is not provisioning", "code": "fenced_out"}
            attempt = next((c.body.get("attempt") for c in self.calls if c.verb == "claim"), 1)
        if verb == "claim":
            claimed = {
                "id": job_id,
                "status": "provisioning",
                "attempt": body.get("attempt"),
                "agent": {"id": self.agent_id, "name": "Ada's helper"},
                "region": self.region,
            }
            return 200, claimed | ({"kind": self.kind} if self.kind else {})
        if verb == "cleanup-authorization":
            return 200, {"id": job_id, "approved": True, "label_selector": f"job-id={job_id}"}
        if verb == "heartbeat":
            return 200, {"status": "provisioning"}
        if verb == "complete":
            return 200, {"status": "running"}
        if verb == "fail":
            return 200, {"status": "queued", "retry_count": 1, "attempt": attempt + 1}
        return 404, {"detail": "no such call", "code": "not_found"}

    def reap(self, body: dict, authorization: str) -> tuple[int, dict]:
        token = authorization.removeprefix("Bearer ")
        with self.lock:
            if token not in self.minted:
                return 401, {"detail": "unknown token", "code": "invalid_token"}
            self.calls.append(Call("reaper", body, token))
        if self.reaper_answer is None:
            return 200, {"delete": [], "keep": [], "verdicts": []}
        return self.reaper_answer(body.get("servers", []))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        fake: FakeCallbackApi = self.server.fake  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        if split.path != "/token":
            self._reply(404, {"message": "not found"})
            return
        self._reply(*fake.mint(parse_qs(split.query), self.headers.get("Authorization", "")))

    def do_POST(self) -> None:
        fake: FakeCallbackApi = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        parts = urlsplit(self.path).path.strip("/").split("/")
        if parts == ["api", "v1", "reaper", "verdicts"]:
            self._reply(*fake.reap(body, self.headers.get("Authorization", "")))
            return
        if len(parts) != 5 or parts[:3] != ["api", "v1", "jobs"]:
            self._reply(404, {"detail": "not found", "code": "not_found"})
            return
        self._reply(*fake.answer(parts[3], parts[4], body, self.headers.get("Authorization", "")))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def callback_api() -> Iterator[FakeCallbackApi]:
    fake = FakeCallbackApi()
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


@pytest.fixture
def job_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def runner_env(callback_api, fake_hetzner, tmp_path) -> dict[str, str]:  # noqa: F811
    """A clean environment pointing the runner at the fakes, simulating the VM steps quickly."""
    keep = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "SYSTEMROOT"}}
    return {
        **keep,
        "PYTHONPATH": str(REPO_ROOT),
        "PROVISIONING_API_URL": callback_api.base_url,
        "PROVISIONING_OIDC_AUDIENCE": AUDIENCE,
        "ACTIONS_ID_TOKEN_REQUEST_URL": f"{callback_api.base_url}/token?api-version=2.0",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
        "HCLOUD_TOKEN": "hcloud-test-token",
        "HCLOUD_API_ENDPOINT": fake_hetzner.url,
        "RUNNER_SSH_KEY_NAME": "provisioning-test",
        "RUNNER_SIMULATE": "1",
        "RUNNER_STEP_SECONDS": "0.1",
        "RUNNER_HEARTBEAT_SECONDS": "0.05",
        "RUNNER_RETRY_BACKOFF_SECONDS": "0.05",
        "RUNNER_CLAIM_RETRY_SECONDS": "3",
        "RUNNER_HCLOUD_POLL_SECONDS": "0.05",
        "RUNNER_TEMP": str(tmp_path),
    }


def run_runner(env: dict[str, str], *args: str, timeout: float = 60) -> RunResult:
    completed = subprocess.run(
        [sys.executable, "-m", "provisioning.runner", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return RunResult(completed.returncode, completed.stdout, completed.stderr)
