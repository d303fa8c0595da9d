"""The service's workflow API, called with a fresh GitHub OIDC token every time.

`claim`, `heartbeat`, `complete` and `fail` are `POST {base}/api/v1/jobs/{id}/<verb>`; the
scheduled reaper asks `POST {base}/api/v1/reaper/verdicts`. Errors come back as
`{"detail", "code"}`. A token is single-use on the server (its `jti`), so nothing
here caches one: every request — including each retry — mints its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from .config import Settings


class ApiError(Exception):
    """The service answered with a refusal (4xx)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail

    @property
    def is_fenced(self) -> bool:
        """This run no longer owns the job (moved on, another attempt, or gone)."""
        return self.status in (404, 409)


class ApiUnavailable(Exception):
    """No usable answer: connection error, timeout, 5xx or a body that is not our JSON."""


class TokenSource:
    """Mints GitHub Actions OIDC ID tokens for our audience."""

    def __init__(self, settings: Settings, http: httpx.Client) -> None:
        settings.require("token_request_url", "token_request_token", "oidc_audience")
        url = settings.token_request_url
        separator = "&" if "?" in url else "?"
        self._url = f"{url}{separator}audience={quote(settings.oidc_audience, safe='')}"
        self._request_token = settings.token_request_token
        self._http = http

    def mint(self) -> str:
        try:
            response = self._http.get(
                self._url, headers={"Authorization": f"bearer {self._request_token}"}
            )
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"OIDC token request failed: {exc!r}") from exc
        if response.status_code != 200:
            raise ApiUnavailable(f"OIDC token request answered HTTP {response.status_code}")
        try:
            value = response.json()["value"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiUnavailable("OIDC token response has no 'value'") from exc
        if not isinstance(value, str) or not value:
            raise ApiUnavailable("OIDC token response has an empty 'value'")
        return value


class _ServiceClient:
    """Posts JSON to our service with a fresh OIDC token per request. One per thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        log: Callable[[str], None] = lambda _msg: None,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        settings.require("api_url")
        self._settings = settings
        self._http = httpx.Client(timeout=settings.http_timeout_seconds)
        self._tokens = TokenSource(settings, self._http)
        self._log = log
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def _post_url(self, url: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        token = self._tokens.mint()
        try:
            response = self._http.post(
                url,
                json=body,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"{verb}: {exc!r}") from exc
        if response.status_code >= 500:
            raise ApiUnavailable(f"{verb}: HTTP {response.status_code}")
        try:
            payload = response.json()
        except ValueError as exc:
            if response.status_code >= 400:
                raise ApiError(response.status_code, "unknown", response.text[:200]) from exc
            raise ApiUnavailable(f"{verb}: HTTP {response.status_code} without JSON") from exc
        if response.status_code >= 400:
            payload = payload if isinstance(payload, dict) else {}
            raise ApiError(
                response.status_code,
                str(payload.get("code") or "error"),
                str(payload.get("detail") or response.reason_phrase),
            )
        return payload if isinstance(payload, dict) else {}

    def _retrying(
        self, call: Callable[[], dict[str, Any]], verb: str, tries: int
    ) -> dict[str, Any]:
        """Retry only when no answer arrived; each try mints a fresh token."""
        delay = self._settings.retry_backoff_seconds
        for attempt in range(1, tries + 1):
            try:
                return call()
            except ApiUnavailable as exc:
                if attempt == tries:
                    raise
                self._log(f"{verb} got no answer ({exc}); retrying in {delay:.1f}s")
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")


class CallbackApi(_ServiceClient):
    """One job's callbacks. Not shared between threads: make one per thread."""

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        *,
        log: Callable[[str], None] = lambda _msg: None,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings, log=log, sleep=sleep)
        self._clock = clock
        self._base = f"{settings.api_url}/api/v1/jobs/{job_id}"

    def _post(self, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._post_url(f"{self._base}/{verb}", verb, body)

    def _post_with_retries(self, verb: str, body: dict[str, Any], tries: int) -> dict[str, Any]:
        return self._retrying(lambda: self._post(verb, body), verb, tries)

    def claim(self, attempt: int) -> dict[str, Any]:
        """Claim the job; waits out `dispatch_pending` (the server has not stored our run yet)."""
        deadline = self._clock() + self._settings.claim_retry_seconds
        delay = max(self._settings.retry_backoff_seconds / 2, 0.01)
        while True:
            try:
                return self._post("claim", {"attempt": attempt})
            except ApiError as exc:
                if exc.code != "dispatch_pending" or self._clock() + delay > deadline:
                    raise
                self._log(f"claim: dispatch not recorded yet; retrying in {delay:.1f}s")
            except ApiUnavailable as exc:
                if self._clock() + delay > deadline:
                    raise
                self._log(f"claim got no answer ({exc}); retrying in {delay:.1f}s")
            self._sleep(delay)
            delay = min(delay * 2, 10.0)

    def heartbeat(self, step: str | None, progress: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if step:
            body["step"] = step
        if progress is not None:
            body["progress"] = progress
        return self._post("heartbeat", body)

    def complete(
        self,
        *,
        server_id: str,
        ipv4: str,
        server_name: str | None,
        hetzner_calls: int | None = None,
    ) -> dict[str, Any]:
        """`hetzner_calls`: the requests this attempt sent to Hetzner (the service learns from
        them how many builds its Hetzner budget allows at once)."""
        body: dict[str, Any] = {"server_id": server_id, "ipv4": ipv4}
        if server_name:
            body["server_name"] = server_name
        if hetzner_calls is not None:
            body["hetzner_calls"] = hetzner_calls
        return self._post_with_retries("complete", body, tries=6)

    def fail(
        self,
        *,
        error: str,
        failed_step: str,
        capacity: bool = False,
        hetzner_calls: int | None = None,
    ) -> dict[str, Any]:
        """`capacity`: Hetzner's server limit stopped the build, not a fault of this job; the
        service requeues it without spending a retry and holds new builds back.
        `hetzner_calls`: as for `complete`, the requests sent up to this report."""
        body: dict[str, Any] = {"error": error[-4000:], "failed_step": failed_step}
        if capacity:
            body["capacity"] = True
        if hetzner_calls is not None:
            body["hetzner_calls"] = hetzner_calls
        return self._post_with_retries("fail", body, tries=4)

    def authorize_cleanup(self) -> dict[str, Any]:
        """Ask whether this run may delete the job's VMs; ApiError (403/409/404) means no."""
        return self._post_with_retries("cleanup-authorization", {}, tries=4)


class ReaperApi(_ServiceClient):
    """`POST {base}/api/v1/reaper/verdicts`: which of our VMs may go. Read-only on the server."""

    def verdicts(self, servers: list[dict[str, str]]) -> dict[str, Any]:
        url = f"{self._settings.api_url}/api/v1/reaper/verdicts"
        return self._retrying(
            lambda: self._post_url(url, "reaper verdicts", {"servers": servers}),
            "reaper verdicts",
            tries=4,
        )
