"""A fake GitHub REST API served through ``httpx.MockTransport``.

Our GitHub client runs for real up to the socket; the fake checks what a real GitHub would
(the App JWT's signature and issuer, the installation token on every call) and records what it
received so tests can assert on it::

    def test_x(fake_github):
        ...
        assert fake_github.dispatched_inputs() == [{"job_id": ..., "attempt": "1", "mode": "provision"}]

Knobs: ``fail_next(n, status=502)``, ``timeout_next(n)``, ``rate_limit_next(n, status=403,
secondary=False)`` (a primary limit: ``x-ratelimit-remaining: 0`` and ``x-ratelimit-reset``; a
secondary one: ``retry-after``), ``legacy_ghes = True`` (``legacy_ghes_status``, 400 or 422, on
``return_run_details``, then 204), ``set_run(run_id, status=..., conclusion=...)``,
``token_ttl``. A dispatch is checked against the workflow's inputs as GitHub does: an input the
workflow does not declare, a missing required one or a choice outside its options is a 422. Register the fixture with ``pytest_plugins = ["tests.fakes.github"]``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning import backends
from provisioning.backends.github import GitHubBackend

APP_ID = "123456"
INSTALLATION_ID = "7654321"


@functools.cache
def shared_app_key() -> rsa.RSAPrivateKey:
    """One App key for the whole test session: RSA key generation is slow."""
    return new_rsa_key()


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# The inputs .github/workflows/provision.yml declares (tests/workflows checks they agree).
WORKFLOW_INPUTS: dict[str, tuple[str, ...] | None] = {
    "job_id": None,
    "attempt": None,
    "mode": ("provision", "cleanup", "deprovision"),
}
RATE_LIMIT_RESET_SECONDS = 120  # how far ahead a primary limit's x-ratelimit-reset points
SECONDARY_RETRY_AFTER_SECONDS = 90


def _json(status: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


@dataclass
class Dispatch:
    workflow_file: str
    ref: str
    inputs: dict[str, str]
    return_run_details: bool
    run_id: str | None


@dataclass
class FakeGitHub:
    repository: str = "example/agent-provisioning"
    workflow_file: str = "provision.yml"
    app_id: str = APP_ID
    installation_id: str = INSTALLATION_ID
    token_ttl: timedelta = timedelta(hours=1)
    legacy_ghes: bool = False
    legacy_ghes_status: int = 400  # GitHub Enterprise refuses return_run_details with 400 or 422
    private_key: rsa.RSAPrivateKey = field(default_factory=lambda: shared_app_key())
    # What the workflow on the dispatched ref declares (a test may play an older branch).
    workflow_inputs: dict[str, tuple[str, ...] | None] = field(
        default_factory=lambda: dict(WORKFLOW_INPUTS)
    )

    def __post_init__(self) -> None:
        self.dispatches: list[Dispatch] = []
        self.runs: dict[str, dict[str, Any]] = {}
        self.cancelled: list[str] = []
        self.requests: list[httpx.Request] = []
        self.tokens: dict[str, datetime] = {}
        self.token_requests: list[dict[str, Any]] = []
        self.not_modified = 0  # 304 answers to conditional list requests
        # status codes, "timeout", or ("primary" | "secondary", status) for a rate limit
        self._failures: list[int | str | tuple[str, int]] = []
        self._run_ids = itertools.count(18_000_000_001)
        self._lock = threading.Lock()
        self.transport = httpx.MockTransport(self.handle)

    # -- setup -----------------------------------------------------------------------------------

    @property
    def private_key_pem(self) -> str:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    def backend(self, **overrides: Any) -> GitHubBackend:
        kwargs: dict[str, Any] = {
            "repository": self.repository,
            "workflow_file": self.workflow_file,
            "ref": "main",
            "app_id": self.app_id,
            "installation_id": self.installation_id,
            "private_key": self.private_key_pem,
            "api_url": "https://api.github.com",
            "transport": self.transport,
        }
        kwargs.update(overrides)
        return GitHubBackend(**kwargs)

    def fail_next(self, count: int = 1, *, status: int = 502) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    def timeout_next(self, count: int = 1) -> None:
        with self._lock:
            self._failures.extend(["timeout"] * count)

    def rate_limit_next(
        self, count: int = 1, *, status: int = 403, secondary: bool = False
    ) -> None:
        """The next ``count`` calls hit a rate limit (403 or 429, as GitHub may answer either)."""
        with self._lock:
            self._failures.extend([("secondary" if secondary else "primary", status)] * count)

    def set_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            run = self.runs.setdefault(run_id, self._new_run(run_id, title=""))
            run.update(fields)
            return run

    def dispatched_inputs(self) -> list[dict[str, str]]:
        return [d.inputs for d in self.dispatches]

    # -- the API ---------------------------------------------------------------------------------

    def _new_run(self, run_id: str, *, title: str) -> dict[str, Any]:
        return {
            "id": int(run_id),
            "name": "provision",
            "display_title": title,
            "event": "workflow_dispatch",
            "status": "queued",
            "conclusion": None,
            "html_url": f"https://github.com/{self.repository}/actions/runs/{run_id}",
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            failure = self._failures.pop(0) if self._failures else None
        if failure == "timeout":
            raise httpx.ReadTimeout("fake GitHub timed out", request=request)
        if isinstance(failure, tuple):
            return self._rate_limited(*failure)
        if failure is not None:
            status = int(failure)
            if status >= 500:
                return _json(status, {"message": "Server Error"}, {"retry-after": "30"})
            return _json(status, {"message": "Validation Failed"})

        path = request.url.path
        if request.method == "POST" and (
            m := re.fullmatch(r"/app/installations/([^/]+)/access_tokens", path)
        ):
            return self._access_token(request, m.group(1))

        auth = self._check_token(request)
        if auth is not None:
            return auth

        prefix = f"/repos/{self.repository}/actions"
        if not path.startswith(prefix + "/"):
            return _json(404, {"message": "Not Found"})
        rest = path[len(prefix) :]
        if request.method == "POST" and (m := re.fullmatch(r"/workflows/([^/]+)/dispatches", rest)):
            return self._dispatch(request, m.group(1))
        if request.method == "GET" and (m := re.fullmatch(r"/workflows/([^/]+)/runs", rest)):
            return self._list_runs(request, m.group(1))
        if request.method == "GET" and (m := re.fullmatch(r"/runs/(\d+)", rest)):
            run = self.runs.get(m.group(1))
            return _json(200, run) if run else _json(404, {"message": "Not Found"})
        if request.method == "POST" and (m := re.fullmatch(r"/runs/(\d+)/cancel", rest)):
            return self._cancel(m.group(1))
        return _json(404, {"message": "Not Found"})

    @staticmethod
    def _rate_limited(kind: str, status: int) -> httpx.Response:
        if kind == "secondary":
            return _json(
                status,
                {"message": "You have exceeded a secondary rate limit. Please wait a few minutes."},
                {"retry-after": str(SECONDARY_RETRY_AFTER_SECONDS)},
            )
        reset = int(datetime.now(UTC).timestamp()) + RATE_LIMIT_RESET_SECONDS
        return _json(
            status,
            {"message": f"API rate limit exceeded for installation ID {INSTALLATION_ID}."},
            {
                "x-ratelimit-limit": "5000",
                "x-ratelimit-remaining": "0",
                "x-ratelimit-used": "5000",
                "x-ratelimit-reset": str(reset),
                "x-ratelimit-resource": "core",
            },
        )

    def _access_token(self, request: httpx.Request, installation_id: str) -> httpx.Response:
        scheme, _, app_jwt = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return _json(401, {"message": "A JSON web token could not be decoded"})
        try:
            claims = jwt.decode(
                app_jwt,
                self.private_key.public_key(),
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"]},
            )
        except jwt.InvalidTokenError as exc:
            return _json(401, {"message": f"A JSON web token could not be decoded: {exc}"})
        if str(claims["iss"]) != self.app_id:
            return _json(401, {"message": "Integration not found"})
        if claims["exp"] - claims["iat"] > 600:
            return _json(
                401, {"message": "'Expiration time' claim ('exp') is too far in the future"}
            )
        if installation_id != self.installation_id:
            return _json(404, {"message": "Not Found"})
        body = json.loads(request.content or b"{}")
        self.token_requests.append(body)
        with self._lock:
            token = f"ghs_fake{len(self.tokens) + 1:04d}"
            expires_at = datetime.now(UTC) + self.token_ttl
            self.tokens[token] = expires_at
        return _json(
            201,
            {
                "token": token,
                "expires_at": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "permissions": body.get("permissions", {}),
                "repository_selection": "selected",
            },
        )

    def _check_token(self, request: httpx.Request) -> httpx.Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expires_at = self.tokens.get(token)
        if scheme.lower() not in ("bearer", "token") or expires_at is None:
            return _json(401, {"message": "Bad credentials"})
        if expires_at <= datetime.now(UTC):
            return _json(401, {"message": "Bad credentials"})
        if request.headers.get("x-github-api-version") != "2022-11-28":
            return _json(400, {"message": "missing X-GitHub-Api-Version"})
        return None

    def _dispatch(self, request: httpx.Request, workflow_file: str) -> httpx.Response:
        if workflow_file != self.workflow_file:
            return _json(404, {"message": "Not Found"})
        body = json.loads(request.content)
        details = bool(body.get("return_run_details"))
        if details and self.legacy_ghes:
            return _json(
                self.legacy_ghes_status,
                {"message": 'Invalid request.\n\n"return_run_details" is not a permitted key.'},
            )
        inputs = body.get("inputs", {})
        if any(not isinstance(v, str) for v in inputs.values()):
            return _json(422, {"message": "Invalid value for inputs: values must be strings"})
        unexpected = sorted(set(inputs) - set(self.workflow_inputs))
        if unexpected:
            return _json(422, {"message": f"Unexpected inputs provided: {json.dumps(unexpected)}"})
        for name, options in self.workflow_inputs.items():
            if name not in inputs:
                return _json(422, {"message": f"Required input '{name}' not provided"})
            if options is not None and inputs[name] not in options:
                return _json(
                    422,
                    {
                        "message": f"Provided value '{inputs[name]}' for input '{name}' not in "
                        f"the list of allowed values"
                    },
                )
        with self._lock:
            run_id = str(next(self._run_ids))
            # The workflow's run-name: "<mode> <job id> attempt <n>".
            title = f"{inputs['mode']} {inputs['job_id']} attempt {inputs['attempt']}"
            self.runs[run_id] = self._new_run(run_id, title=title)
            self.dispatches.append(
                Dispatch(
                    workflow_file=workflow_file,
                    ref=body.get("ref", ""),
                    inputs=inputs,
                    return_run_details=details,
                    run_id=run_id,
                )
            )
        if not details:
            return httpx.Response(204)
        return _json(
            200,
            {
                "workflow_run_id": int(run_id),
                "run_url": f"https://api.github.com/repos/{self.repository}/actions/runs/{run_id}",
                "html_url": f"https://github.com/{self.repository}/actions/runs/{run_id}",
            },
        )

    def _list_runs(self, request: httpx.Request, workflow_file: str) -> httpx.Response:
        """GitHub's list: newest first, filtered by `event` and `status`, `per_page` (at most
        100) and `page`, a `Link: rel="next"` while more remain, and an ETag: a request naming
        the current one with If-None-Match gets 304 (which GitHub does not count)."""
        if workflow_file != self.workflow_file:
            return _json(404, {"message": "Not Found"})
        params = request.url.params
        event, status = params.get("event"), params.get("status")
        per_page = min(int(params.get("per_page", "30")), 100)
        page = max(int(params.get("page", "1")), 1)
        with self._lock:
            runs = [
                dict(r)
                for r in self.runs.values()
                if (event is None or r["event"] == event)
                and (status is None or r["status"] == status or r["conclusion"] == status)
            ]
        runs.sort(key=lambda r: r["id"], reverse=True)
        body = {"total_count": len(runs), "workflow_runs": runs[(page - 1) * per_page :][:per_page]}
        etag = (
            '"' + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32] + '"'
        )
        if request.headers.get("if-none-match") == etag:
            self.not_modified += 1
            return httpx.Response(304, headers={"etag": etag})
        headers = {"etag": etag}
        if page * per_page < len(runs):
            next_url = request.url.copy_set_param("page", str(page + 1))
            headers["link"] = f'<{next_url}>; rel="next"'
        return _json(200, body, headers)

    def _cancel(self, run_id: str) -> httpx.Response:
        run = self.runs.get(run_id)
        if run is None:
            return _json(404, {"message": "Not Found"})
        if run["status"] == "completed":
            return _json(409, {"message": "Cannot cancel a workflow run that is completed."})
        self.cancelled.append(run_id)
        run.update(status="completed", conclusion="cancelled")
        return _json(202, {})


def installed_fake_github(settings: Any) -> Iterator[FakeGitHub]:
    """Generator behind the ``fake_github`` fixture, for modules that declare their own."""
    fake = FakeGitHub(
        repository=settings.GITHUB_REPOSITORY, workflow_file=settings.GITHUB_WORKFLOW_FILE
    )
    settings.PROVISIONING_RUNNER = "github"
    settings.GITHUB_APP_ID = fake.app_id
    settings.GITHUB_APP_INSTALLATION_ID = fake.installation_id
    settings.GITHUB_APP_PRIVATE_KEY = fake.private_key_pem
    settings.GITHUB_API_URL = "https://api.github.com"
    backends.set_backend(GitHubBackend.from_settings(transport=fake.transport))
    try:
        yield fake
    finally:
        backends.reset_backend()


@pytest.fixture
def fake_github(settings: Any) -> Iterator[FakeGitHub]:
    """A fake GitHub installed as the process's runner backend (``backends.get_backend()``)."""
    yield from installed_fake_github(settings)
