"""Dispatch workflow runs on GitHub Actions with a GitHub App installation token (plain httpx).

``workflow_dispatch`` with
``return_run_details: true`` answers 200 with the new run's id; GitHub Enterprise Server up to
3.20 refuses that flag (400, or 422 "not a permitted key") and answers 204 without it, so the id
then comes from ``find_run``.

Rate limits come as 403 or 429: a primary limit with ``x-ratelimit-remaining: 0`` and
``x-ratelimit-reset`` (epoch seconds), a secondary one with ``retry-after`` (seconds) or, without
it, a message saying so (then wait at least a minute). Either way the DispatchError carries the
wait in ``retry_after`` and the dispatcher schedules its next try no earlier.

Built by ``from_settings`` (every process's backend), it spends the budget every process shares
(services/budget.py): each request draws one first, and is not sent when none is left
(``BudgetSpent``); a rate-limit answer blocks the shared budget until GitHub's reset, so every
process waits, not just the one that was told.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from provisioning.backends.base import (
    MODES,
    UNFINISHED_RUN_STATUSES,
    BudgetSpent,
    DispatchError,
    DispatchResult,
    RunStatus,
    run_title,
)

logger = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
TIMEOUT_SECONDS = 10.0
TOKEN_REFRESH_MARGIN = timedelta(minutes=5)  # renew an installation token this long before expiry
APP_JWT_BACKDATE_SECONDS = 60  # GitHub's advice against clock drift
APP_JWT_LIFETIME_SECONDS = 9 * 60  # GitHub's limit is 10 minutes
FIND_RUN_LOOKBACK = timedelta(hours=6)
FIND_RUN_MAX_PAGES = 5
LIST_PER_PAGE = 100  # GitHub's largest page
LIST_MAX_PAGES = 20  # per status: 2,000 unfinished runs, far beyond any concurrency limit
PATH_MAX_CHARS = 4096  # longer than any file path: a key body without its armour
SECONDARY_LIMIT_DEFAULT_WAIT_SECONDS = 60  # a rate limit that names no wait: at least a minute
MAX_BLOCK_SECONDS = 3600  # GitHub's primary limit resets within the hour: a wilder hint is capped


def load_private_key(value: str) -> str:
    """``GITHUB_APP_PRIVATE_KEY`` is PEM text, or a path to a PEM file; returns checked PEM text.

    Errors never repeat the value: a key pasted without its PEM armour would otherwise be taken
    for a path and land in exception messages and every worker tick's log.
    """
    text = value.strip()
    if not text:
        raise ImproperlyConfigured("GITHUB_APP_PRIVATE_KEY is not set")
    if "-----BEGIN" in text:
        pem = text.replace("\\n", "\n") + "\n"  # tolerate a PEM flattened into one env line
    elif "\n" in text or len(text) > PATH_MAX_CHARS:
        raise ImproperlyConfigured(
            "GITHUB_APP_PRIVATE_KEY is neither PEM text (no -----BEGIN line) nor a file path"
        )
    else:
        try:
            pem = Path(text).expanduser().read_text()
        except OSError as exc:
            raise ImproperlyConfigured(
                "GITHUB_APP_PRIVATE_KEY is neither PEM text (no -----BEGIN line) nor a readable "
                f"file ({type(exc).__name__})"
            ) from None
    try:
        serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ImproperlyConfigured(
            "GITHUB_APP_PRIVATE_KEY does not hold an unencrypted PEM private key"
        ) from None
    return pem


def _retry_after_seconds(response: httpx.Response, message: str) -> int | None:
    """How long a rate-limited answer asks us to wait, in whole seconds; None if not limited."""
    headers = response.headers
    retry_after = headers.get("retry-after", "").strip()
    if retry_after.isdigit():
        return max(int(retry_after), 1)
    if headers.get("x-ratelimit-remaining") == "0":
        reset = headers.get("x-ratelimit-reset", "").strip()
        if reset.isdigit():
            return max(int(reset) - int(time.time()), 1)  # GitHub's clock: the wall clock
        return SECONDARY_LIMIT_DEFAULT_WAIT_SECONDS
    if response.status_code in (403, 429) and "rate limit" in message.lower():
        return SECONDARY_LIMIT_DEFAULT_WAIT_SECONDS
    return None


def _refuses_run_details(response: httpx.Response) -> bool:
    """An Enterprise Server that does not know ``return_run_details``: 400, or 422 naming the key.

    A 422 about anything else (an input the workflow does not declare) is a real error: sending
    the same inputs again without the flag would only fail the same way.
    """
    if response.status_code == 400:
        return True
    return response.status_code == 422 and "return_run_details" in _github_message(response)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _github_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict):
        message = str(body.get("message", ""))
        errors = body.get("errors")
        if errors:
            message = f"{message} {errors}".strip()
        return message[:300]
    return str(body)[:200]


class GitHubBackend:
    """Runs jobs as ``workflow_dispatch`` runs of our workflow in our repository."""

    name = "github"
    # A run's last steps follow its report and GitHub keeps its runner until they end: the
    # reported run keeps its slot until GitHub says it completed (services/finishing.py).
    holds_runner_after_report = True

    def __init__(
        self,
        *,
        repository: str,
        workflow_file: str,
        ref: str,
        app_id: str,
        installation_id: str,
        private_key: str,
        api_url: str = "https://api.github.com",
        transport: httpx.BaseTransport | None = None,
        client: httpx.Client | None = None,
        timeout: float = TIMEOUT_SECONDS,
        clock: Callable[[], datetime] = _utcnow,
        shared_budget: bool = False,
    ) -> None:
        owner, _, repo = repository.partition("/")
        if not owner or not repo:
            raise ImproperlyConfigured(
                f"GITHUB_REPOSITORY must be 'owner/repo', not {repository!r}"
            )
        self.repository = repository
        self.repo_name = repo
        self.workflow_file = workflow_file
        self.ref = ref.removeprefix("refs/heads/")
        self.app_id = str(app_id)
        self.installation_id = str(installation_id)
        self._private_key = private_key
        self.api_url = api_url.rstrip("/")
        self._clock = clock
        self.shared_budget = shared_budget  # draw every request from services/budget.py
        self._client = client or httpx.Client(
            base_url=self.api_url,
            transport=transport,
            timeout=timeout,
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "agent-provisioning",
            },
        )
        self._token_lock = threading.Lock()
        self._token: str | None = None
        self._token_expires_at: datetime | None = None
        # Flips to False once an Enterprise Server refuses ``return_run_details``.
        self._ask_for_run_details = True
        # List pages seen, by (status, page): their ETag and runs, for conditional requests.
        self._pages: dict[tuple[str, int], tuple[str, list[dict[str, Any]]]] = {}

    @classmethod
    def from_settings(cls, **overrides: Any) -> GitHubBackend:
        missing = [
            name
            for name in ("GITHUB_APP_ID", "GITHUB_APP_INSTALLATION_ID", "GITHUB_APP_PRIVATE_KEY")
            if not getattr(settings, name)
        ]
        if missing and "private_key" not in overrides:
            raise ImproperlyConfigured(
                f"PROVISIONING_RUNNER=github needs {', '.join(missing)} (a GitHub App)"
            )
        kwargs: dict[str, Any] = {
            "repository": settings.GITHUB_REPOSITORY,
            "workflow_file": settings.GITHUB_WORKFLOW_FILE,
            "ref": settings.GITHUB_REF,
            "app_id": settings.GITHUB_APP_ID,
            "installation_id": settings.GITHUB_APP_INSTALLATION_ID,
            "api_url": settings.GITHUB_API_URL,
            "shared_budget": True,
        }
        if "private_key" not in overrides:
            kwargs["private_key"] = load_private_key(settings.GITHUB_APP_PRIVATE_KEY)
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- authentication ------------------------------------------------------------------------

    def _app_jwt(self) -> str:
        now = int(time.time())  # GitHub's clock judges this JWT, not the injectable one
        claims = {
            "iat": now - APP_JWT_BACKDATE_SECONDS,
            "exp": now + APP_JWT_LIFETIME_SECONDS,
            "iss": self.app_id,
        }
        return jwt.encode(claims, self._private_key, algorithm="RS256")

    def _installation_token(self) -> str:
        with self._token_lock:
            now = self._clock()
            if (
                self._token
                and self._token_expires_at
                and now < self._token_expires_at - TOKEN_REFRESH_MARGIN
            ):
                return self._token
            response = self._send(
                "POST",
                f"/app/installations/{self.installation_id}/access_tokens",
                "get an installation token",
                purpose="token",
                auth=f"Bearer {self._app_jwt()}",
                json={"repositories": [self.repo_name], "permissions": {"actions": "write"}},
            )
            if response.status_code not in (200, 201):
                raise self._error("get an installation token", response)
            body = response.json()
            self._token = str(body["token"])
            expires_at = body.get("expires_at")
            self._token_expires_at = (
                datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
                if expires_at
                else now + timedelta(hours=1)
            )
            return self._token

    def _forget_token(self) -> None:
        with self._token_lock:
            self._token = None
            self._token_expires_at = None

    # -- HTTP ------------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        purpose: str,
        auth: str,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        if self.shared_budget:
            from provisioning.services.budget import api_budget_draw

            wait = api_budget_draw(purpose=purpose)
            if wait > 0:
                raise BudgetSpent(
                    f"the GitHub API budget is spent; {what} waits {math.ceil(wait)} s",
                    retry_after=math.ceil(wait),
                )
        try:
            response = self._client.request(
                method, path, headers={**(headers or {}), "Authorization": auth}, **kwargs
            )
        except httpx.TimeoutException as exc:
            raise DispatchError(f"GitHub did not answer in time while trying to {what}") from exc
        except httpx.HTTPError as exc:
            raise DispatchError(f"could not reach GitHub to {what}: {exc}") from exc
        if self.shared_budget:
            self._heed_limits(response, what)
        return response

    @staticmethod
    def _heed_limits(response: httpx.Response, what: str) -> None:
        """Tell the shared budget what GitHub said: a 304 did not count; a rate limit (or the
        last request of GitHub's own hour) makes every process wait until GitHub's reset."""
        from provisioning.services.budget import api_budget_block, api_budget_refund

        if response.status_code == 304:
            api_budget_refund()
            return
        limited = response.status_code in (403, 429)
        if not limited and response.headers.get("x-ratelimit-remaining") != "0":
            return
        wait = _retry_after_seconds(response, _github_message(response) if limited else "")
        if wait is not None:
            api_budget_block(
                until=_utcnow() + timedelta(seconds=min(wait, MAX_BLOCK_SECONDS)),
                reason=f"GitHub answered {response.status_code} to {what}",
            )

    def _api(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        """An API call with the installation token; one retry with a fresh token on a 401.
        `purpose` (keyword) names it in the budget's counts."""
        response = self._send(
            method, path, what, auth=f"Bearer {self._installation_token()}", **kwargs
        )
        if response.status_code == 401:
            self._forget_token()
            response = self._send(
                method, path, what, auth=f"Bearer {self._installation_token()}", **kwargs
            )
        return response

    @staticmethod
    def _error(what: str, response: httpx.Response) -> DispatchError:
        message = f"GitHub answered {response.status_code} to {what}"
        detail = _github_message(response)
        retry_after = _retry_after_seconds(response, detail)
        if detail:
            message = f"{message}: {detail}"
        if retry_after is not None:
            message = f"{message} (retry after {retry_after} s)"
        return DispatchError(message, status=response.status_code, retry_after=retry_after)

    def _repo_path(self, suffix: str) -> str:
        return f"/repos/{self.repository}/actions/{suffix}"

    # -- RunnerBackend -----------------------------------------------------------------------------

    def dispatch(self, *, job_id: UUID, attempt: int, mode: str) -> DispatchResult:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        what = f"dispatch {self.workflow_file} for job {job_id} attempt {attempt}"
        body: dict[str, Any] = {
            "ref": self.ref,
            "inputs": {"job_id": str(job_id), "attempt": str(attempt), "mode": mode},
        }
        path = self._repo_path(f"workflows/{self.workflow_file}/dispatches")
        if self._ask_for_run_details:
            response = self._api(
                "POST", path, what, purpose="dispatch", json={**body, "return_run_details": True}
            )
            if _refuses_run_details(response):
                # GitHub Enterprise Server <= 3.20 refuses the flag: dispatch without it and
                # let the claim find the run by its title.
                logger.warning(
                    "GitHub refused return_run_details (%s); dispatching without it",
                    _github_message(response),
                )
                response = self._api("POST", path, what, purpose="dispatch", json=body)
                if response.status_code == 204:  # it was the flag: stop asking for run details
                    self._ask_for_run_details = False
        else:
            response = self._api("POST", path, what, purpose="dispatch", json=body)

        if response.status_code == 204:
            return DispatchResult(run_id=None)
        if response.status_code == 200:
            details = response.json()
            run_id = details.get("workflow_run_id")
            if run_id is None:
                return DispatchResult(run_id=None)
            return DispatchResult(
                run_id=str(run_id),
                run_url=details.get("html_url") or self.run_url(run_id=str(run_id)),
            )
        raise self._error(what, response)

    def cancel_run(self, *, run_id: str) -> None:
        what = f"cancel run {run_id}"
        response = self._api(
            "POST", self._repo_path(f"runs/{run_id}/cancel"), what, purpose="cancel"
        )
        if response.status_code in (202, 200, 204):
            return
        if response.status_code == 409:  # already finished: nothing to cancel
            return
        if response.status_code == 404:
            logger.warning("GitHub does not know run %s; nothing to cancel", run_id)
            return
        raise self._error(what, response)

    def get_run(self, *, run_id: str) -> RunStatus | None:
        what = f"read run {run_id}"
        response = self._api("GET", self._repo_path(f"runs/{run_id}"), what, purpose="get_run")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._error(what, response)
        return self._run_status(response.json())

    @staticmethod
    def _run_status(run: dict[str, Any]) -> RunStatus:
        return RunStatus(
            run_id=str(run["id"]),
            status=str(run.get("status") or "unknown"),
            conclusion=run.get("conclusion"),
            html_url=run.get("html_url"),
            display_title=run.get("display_title"),
        )

    def find_run(self, *, job_id: UUID, attempt: int, mode: str = "provision") -> str | None:
        title = run_title(job_id=job_id, attempt=attempt, mode=mode)
        since = (self._clock() - FIND_RUN_LOOKBACK).strftime("%Y-%m-%dT%H:%M:%SZ")
        what = f"look up the run titled {title!r}"
        path: str | None = self._repo_path(f"workflows/{self.workflow_file}/runs")
        params: dict[str, Any] | None = {
            "event": "workflow_dispatch",
            "created": f">={since}",
            "per_page": 100,
        }
        for _ in range(FIND_RUN_MAX_PAGES):
            if path is None:
                break
            response = self._api("GET", path, what, purpose="find_run", params=params)
            if response.status_code != 200:
                raise self._error(what, response)
            # Newest first: the latest run with this title wins.
            for run in response.json().get("workflow_runs", []):
                if run.get("display_title") == title:
                    return str(run["id"])
            next_link = response.links.get("next", {}).get("url")
            path, params = (next_link, None) if next_link else (None, None)
        return None

    def list_unfinished_runs(self) -> dict[str, RunStatus]:
        """Every unfinished run of our workflow, by id: one list call per status and page
        (``?status=<s>&per_page=100``), each conditional on the page's last ETag (a 304 reuses
        what we had and does not count against GitHub's limit)."""
        runs: dict[str, RunStatus] = {}
        path = self._repo_path(f"workflows/{self.workflow_file}/runs")
        for status in sorted(UNFINISHED_RUN_STATUSES):
            for page in range(1, LIST_MAX_PAGES + 1):
                listed = self._list_page(path, status=status, page=page)
                for run in listed:
                    found = self._run_status(run)
                    runs[found.run_id] = found
                if len(listed) < LIST_PER_PAGE:
                    break
        return runs

    def _list_page(self, path: str, *, status: str, page: int) -> list[dict[str, Any]]:
        what = f"list {status} runs (page {page})"
        cached = self._pages.get((status, page))
        headers = {"If-None-Match": cached[0]} if cached else None
        response = self._api(
            "GET",
            path,
            what,
            purpose="list_runs",
            headers=headers,
            params={"status": status, "per_page": LIST_PER_PAGE, "page": page},
        )
        if response.status_code == 304 and cached is not None:
            return cached[1]
        if response.status_code != 200:
            raise self._error(what, response)
        listed = list(response.json().get("workflow_runs", []))
        etag = response.headers.get("etag")
        if etag:
            self._pages[(status, page)] = (etag, listed)
        return listed

    def run_url(self, *, run_id: str) -> str | None:
        parts = urlsplit(self.api_url)
        if parts.netloc == "api.github.com":
            web = "https://github.com"
        else:  # GitHub Enterprise Server: https://host/api/v3 -> https://host
            web = f"{parts.scheme}://{parts.netloc}"
        return f"{web}/{self.repository}/actions/runs/{run_id}"

    def close(self) -> None:
        self._client.close()
