"""Verify the GitHub Actions OIDC ID tokens our workflow runs present on their callbacks.

``verify_run_token(token)`` either returns the run's identity or raises ``TokenInvalid`` with a
precise reason. Every setting is read at call time, so tests can change them per test.

Checks: RS256 signature by a key from the issuer's JWKS, issuer,
audience, expiry (30 s leeway), the required claims, ``repository_id``, ``workflow_ref`` (our
workflow file on our branch), ``ref``, ``event_name`` and ``runner_environment``. ``sub`` is
deliberately not parsed: its format differs between repositories; the id claims do not.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from jwt import PyJWKClient

logger = logging.getLogger(__name__)

ALGORITHMS = ["RS256"]
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "jti"]
DEFAULT_EVENTS: tuple[str, ...] = ("workflow_dispatch",)


class TokenInvalid(Exception):
    """The token does not prove a run of our workflow. ``reason`` is short and fixed
    (e.g. "expired", "wrong audience"); ``detail`` adds what was seen, for logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class RunIdentity:
    """Who called: one attempt of one workflow run, as the verified token says."""

    run_id: str
    run_attempt: int
    jti: str
    expires_at: datetime
    repository: str
    workflow_ref: str
    actor_id: str | None
    event_name: str = "workflow_dispatch"


# -- key sources ---------------------------------------------------------------------------------


class _FileJWKClient(PyJWKClient):
    """A PyJWKClient whose key set is a JSON file on disk instead of a URL.

    PyJWKClient only accepts http(s) URIs, so it gets a placeholder and ``fetch_data`` - the
    documented override point - reads the file. Cache, lifespan and the refresh on an unknown
    kid (re-reading the file) are PyJWKClient's own.
    """

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__("http://jwks-file.invalid/", **kwargs)
        self.path = path

    def fetch_data(self) -> Any:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise jwt.PyJWKClientConnectionError(
                f"cannot read JWKS file {self.path}: {exc}"
            ) from exc
        data = self._as_jwk_set_payload(data)
        if self.jwk_set_cache is not None:
            self.jwk_set_cache.put(data)
        self._last_successful_fetch = time.monotonic()
        return data


_clients: dict[tuple[str, float, float], PyJWKClient] = {}
_clients_lock = threading.Lock()
# Built signing keys by (client, kid) with their expiry (time.monotonic()).
_keys: dict[tuple[int, str], tuple[Any, float]] = {}


def jwk_client(source: str) -> PyJWKClient:
    """The key set client for `source` (an https URL or a file), one per source and settings.

    PROVISIONING_OIDC_JWKS_REFRESH_COOLDOWN_SECONDS is the minimum gap between forced refreshes
    on an unknown kid, so a stream of tokens with made-up kids cannot make us hammer the issuer.
    """
    lifespan = float(settings.PROVISIONING_OIDC_JWKS_LIFESPAN_SECONDS)
    cooldown = float(settings.PROVISIONING_OIDC_JWKS_REFRESH_COOLDOWN_SECONDS)
    key = (source, lifespan, cooldown)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            kwargs: dict[str, Any] = {
                "lifespan": lifespan,
                "cooldown_duration": cooldown,
                "timeout": 10,
            }
            scheme = urlsplit(source).scheme.lower()
            if scheme in ("http", "https"):
                client = PyJWKClient(source, **kwargs)
            else:
                path = Path(source.removeprefix("file://"))
                client = _FileJWKClient(path, **kwargs)
            _clients[key] = client
        return client


def reset_key_cache() -> None:
    """Forget every cached key set (tests; a deploy never needs this)."""
    with _clients_lock:
        _clients.clear()
        _keys.clear()


# -- verification --------------------------------------------------------------------------------


def _required(name: str, value: object) -> str:
    """The value of setting `name`, which verification cannot do without."""
    if not value:
        raise ImproperlyConfigured(f"{name} must be set to verify workflow-run tokens")
    return str(value)


_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


def _unverified_header(token: str) -> dict[str, Any]:
    """The token's header, to pick the key: only its first segment is decoded here.

    jwt.get_unverified_header would decode and check every segment, character by character in
    Python (~0.4 ms for a 1.8 kB GitHub token), and jwt.decode does that again right after; the
    payload and signature are checked there, once.
    """
    segment, dot, _rest = token.partition(".")
    segment = segment.rstrip("=")
    if not dot or len(segment) % 4 == 1 or not _SEGMENT.fullmatch(segment):
        raise TokenInvalid("malformed token", "the header is not base64url")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise TokenInvalid("malformed token", f"the header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise TokenInvalid("malformed token", "the header is not a JSON object")
    return header


def _signing_key(client: PyJWKClient, token: str) -> Any:
    header = _unverified_header(token)
    if header.get("alg") not in ALGORITHMS:
        raise TokenInvalid("bad signature", f"algorithm {header.get('alg')!r} is not RS256")
    kid = header.get("kid")
    if not kid:
        raise TokenInvalid("unknown key", "token header has no kid")
    cached = _keys.get((id(client), kid))
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    try:
        key = client.get_signing_key(kid).key
        # PyJWKClient caches the key set's JSON but rebuilds the RSA key object on every call
        # (~0.3 ms); keep the built key for the key set's lifespan so a rotated-out key still
        # stops working within that time.
        _keys[(id(client), kid)] = (
            key,
            time.monotonic() + client.jwk_set_cache.lifespan
            if client.jwk_set_cache
            else time.monotonic() + 300,
        )
        return key
    except jwt.PyJWKClientConnectionError as exc:
        # Not the caller's fault, but we cannot vouch for the token either.
        logger.warning("OIDC key set unavailable: %s", exc)
        raise TokenInvalid("key set unavailable", str(exc)) from exc
    except (jwt.PyJWKClientError, jwt.PyJWKSetError) as exc:
        raise TokenInvalid("unknown key", f"kid {kid!r}") from exc


def _decode(token: str, key: Any, *, issuer: str, audience: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            key,
            algorithms=ALGORITHMS,
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenInvalid("expired") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenInvalid(f"missing claim {exc.claim}") from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenInvalid("wrong audience", str(exc)) from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenInvalid("wrong issuer", str(exc)) from exc
    except jwt.ImmatureSignatureError as exc:
        raise TokenInvalid("not yet valid", str(exc)) from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenInvalid("bad signature") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise TokenInvalid("bad signature", str(exc)) from exc
    except jwt.DecodeError as exc:
        raise TokenInvalid("malformed token", str(exc)) from exc
    except jwt.InvalidTokenError as exc:
        raise TokenInvalid("invalid claims", str(exc)) from exc


def _claim(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if value is None or value == "":
        raise TokenInvalid(f"missing claim {name}")
    return str(value)


def _same_workflow_ref(seen: str, expected: str) -> bool:
    """``owner/repo/.github/workflows/<file>@<ref>``: owner/repo without case, the rest exactly."""
    seen_owner, _, seen_rest = seen.partition("/")
    seen_repo, _, seen_path = seen_rest.partition("/")
    owner, _, rest = expected.partition("/")
    repo, _, path = rest.partition("/")
    return (
        f"{seen_owner}/{seen_repo}".casefold() == f"{owner}/{repo}".casefold() and seen_path == path
    )


def verify_run_token(
    token: str, *, allowed_events: Collection[str] = DEFAULT_EVENTS, ref: str | None = None
) -> RunIdentity:
    """Verify a workflow run's OIDC ID token; return its identity or raise ``TokenInvalid``.

    ``allowed_events``: the ``event_name`` values accepted (callbacks: ``workflow_dispatch``;
    a scheduled reaper could pass ``("schedule",)``). ``ref``: the branch the run must be on;
    GITHUB_REF unless given (scheduled runs are always on the default branch: GITHUB_REAPER_REF).

    The ``owner/repo`` part of ``workflow_ref`` is compared without case: GitHub writes the
    repository's canonical case, the setting is typed by hand, and GitHub names are
    case-insensitive. The id claim is what binds the token to our repository.
    """
    issuer = _required("PROVISIONING_OIDC_ISSUER", settings.PROVISIONING_OIDC_ISSUER).rstrip("/")
    audience = _required("PROVISIONING_OIDC_AUDIENCE", settings.PROVISIONING_OIDC_AUDIENCE)
    jwks_source = _required("PROVISIONING_OIDC_JWKS_URL", settings.PROVISIONING_OIDC_JWKS_URL)
    repository = _required("GITHUB_REPOSITORY", settings.GITHUB_REPOSITORY)
    repository_id = _required("GITHUB_REPOSITORY_ID", settings.GITHUB_REPOSITORY_ID)
    workflow_file = settings.GITHUB_WORKFLOW_FILE
    branch = str(settings.GITHUB_REF if ref is None else ref).removeprefix("refs/heads/")
    runner_environments = settings.PROVISIONING_OIDC_RUNNER_ENVIRONMENTS
    if isinstance(runner_environments, str):
        runner_environments = [runner_environments]

    if not isinstance(token, str) or not token:
        raise TokenInvalid("malformed token", "empty")
    key = _signing_key(jwk_client(jwks_source), token)
    claims = _decode(token, key, issuer=issuer, audience=audience)

    expected_ref = f"refs/heads/{branch}"
    expected_workflow_ref = f"{repository}/.github/workflows/{workflow_file}@{expected_ref}"
    checks = [
        ("repository_id", str(repository_id), "wrong repository"),
        ("workflow_ref", expected_workflow_ref, "wrong workflow"),
        ("ref", expected_ref, "wrong ref"),
    ]
    for name, expected, reason in checks:
        seen = _claim(claims, name)
        compare = _same_workflow_ref if name == "workflow_ref" else str.__eq__
        if not compare(seen, expected):
            raise TokenInvalid(reason, f"{name} {seen!r}")
    event_name = _claim(claims, "event_name")
    if event_name not in allowed_events:
        raise TokenInvalid("wrong event", f"event_name {event_name!r}")
    runner_environment = _claim(claims, "runner_environment")
    if runner_environment not in runner_environments:
        raise TokenInvalid("wrong runner environment", f"runner_environment {runner_environment!r}")

    run_id = _claim(claims, "run_id")
    try:
        run_attempt = int(_claim(claims, "run_attempt"))
    except ValueError as exc:
        raise TokenInvalid("invalid claims", "run_attempt is not a number") from exc
    actor_id = claims.get("actor_id")
    return RunIdentity(
        run_id=run_id,
        run_attempt=run_attempt,
        jti=str(claims["jti"]),
        expires_at=datetime.fromtimestamp(int(claims["exp"]), tz=UTC),
        repository=str(claims.get("repository") or repository),
        workflow_ref=expected_workflow_ref,
        actor_id=str(actor_id) if actor_id not in (None, "") else None,
        event_name=event_name,
    )
