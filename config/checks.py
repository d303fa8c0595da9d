"""Production fails closed: the settings a deployment must get right, checked in one place.

Outside DEBUG, every problem found here is an Error of `manage.py check --deploy` (non-zero exit,
naming the setting), and the web and worker processes refuse to start
(`refuse_unsafe_production()`, called from `config/wsgi.py` and the worker command).

`DJANGO_ALLOW_LOOPBACK_SERVICES=1` is the one switch that lets a production-mode deployment talk to
loopback stand-ins (an http OIDC issuer, `STRIPE_API_BASE`, an http `GITHUB_API_URL`, an http
`PUBLIC_BASE_URL`, the local runner backend and checkout page): a test deployment against fakes.
Even then every such URL must point at a loopback address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from provisioning.backends.github import load_private_key

LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True)
class Problem:
    setting: str
    message: str
    id: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.message}"


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_problem(setting: str, url: str, *, allow_loopback: bool, id: str) -> Problem | None:
    """An https URL, or (with the loopback switch) any URL on a loopback address."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "https":
        return None
    if allow_loopback and scheme == "http" and is_loopback_url(url):
        return None
    if scheme == "http" and is_loopback_url(url):
        why = "is a plain-HTTP loopback address; set DJANGO_ALLOW_LOOPBACK_SERVICES=1 for a test deployment against local stand-ins, else use https"
    else:
        why = f"must be an https URL (got {scheme or 'no'} scheme)"
    return Problem(setting, why, id)


def _loopback_only(setting: str, url: str, *, allow_loopback: bool, id: str) -> Problem | None:
    """A development stand-in: refused, unless the switch is on and it is on a loopback address."""
    if not url:
        return None
    if not allow_loopback:
        return Problem(
            setting,
            "points at a development stand-in; unset it in production "
            "(DJANGO_ALLOW_LOOPBACK_SERVICES=1 allows loopback stand-ins for test deployments)",
            id,
        )
    if not is_loopback_url(url):
        return Problem(setting, "must point at a loopback address when set", id)
    return None


def production_problems(config: Any = None) -> list[Problem]:
    """Every unsafe or missing production setting. Empty under DEBUG (local development)."""
    s = config if config is not None else settings
    if s.DEBUG:
        return []
    loopback = bool(s.ALLOW_LOOPBACK_SERVICES)
    found: list[Problem | None] = []

    runner = s.PROVISIONING_RUNNER
    if not runner:
        found.append(
            Problem(
                "PROVISIONING_RUNNER",
                "is not set; production dispatches with 'github' (or 'local' for a test deployment)",
                "config.E001",
            )
        )
    elif runner == "local" and not loopback:
        found.append(
            Problem(
                "PROVISIONING_RUNNER",
                "is 'local' (runs against loopback fakes); use 'github', or set "
                "DJANGO_ALLOW_LOOPBACK_SERVICES=1 for a test deployment",
                "config.E001",
            )
        )
    if runner == "github":
        found.extend(_github_app_problems(s))
    found.append(
        _url_problem(
            "PROVISIONING_OIDC_ISSUER",
            s.PROVISIONING_OIDC_ISSUER,
            allow_loopback=loopback,
            id="config.E002",
        )
    )
    jwks = s.PROVISIONING_OIDC_JWKS_URL
    if urlsplit(jwks).scheme.lower() in ("http", "https"):  # else a pinned key file: fine
        found.append(
            _url_problem(
                "PROVISIONING_OIDC_JWKS_URL", jwks, allow_loopback=loopback, id="config.E003"
            )
        )
    for name, id in (("GITHUB_REPOSITORY", "config.E004"), ("GITHUB_REPOSITORY_ID", "config.E005")):
        if not getattr(s, name):
            found.append(Problem(name, "is not set: tokens are checked against it", id))
    if not s.METRICS_TOKEN:
        found.append(
            Problem("METRICS_TOKEN", "is not set: /metrics would be public", "config.E006")
        )
    found.append(
        _url_problem("GITHUB_API_URL", s.GITHUB_API_URL, allow_loopback=loopback, id="config.E007")
    )
    found.append(
        _url_problem(
            "PUBLIC_BASE_URL", s.PUBLIC_BASE_URL, allow_loopback=loopback, id="config.E008"
        )
    )
    found.append(
        _loopback_only(
            "STRIPE_API_BASE", s.STRIPE_API_BASE, allow_loopback=loopback, id="config.E009"
        )
    )
    if s.BILLING_LOCAL_CHECKOUT and not loopback:
        found.append(
            Problem(
                "BILLING_LOCAL_CHECKOUT",
                "is on: anyone logged in could order agents without paying; turn it off",
                "config.E010",
            )
        )
    return [p for p in found if p is not None]


def _github_app_problems(s: Any) -> list[Problem | None]:
    """The App that dispatches runs: its ids, and a private key that loads (never echoed)."""
    found: list[Problem | None] = []
    for name in ("GITHUB_APP_ID", "GITHUB_APP_INSTALLATION_ID"):
        if not getattr(s, name):
            found.append(
                Problem(
                    name,
                    "is not set: PROVISIONING_RUNNER=github dispatches with a GitHub App",
                    "config.E011",
                )
            )
    try:
        load_private_key(s.GITHUB_APP_PRIVATE_KEY)
    except ImproperlyConfigured as exc:
        found.append(
            Problem(
                "GITHUB_APP_PRIVATE_KEY",
                str(exc).removeprefix("GITHUB_APP_PRIVATE_KEY "),
                "config.E012",
            )
        )
    return found


@register(Tags.security, deploy=True)
def check_production_settings(
    app_configs: Sequence[Any] | None, **kwargs: Any
) -> list[CheckMessage]:
    return [Error(str(p), hint=None, id=p.id) for p in production_problems()]


@register(Tags.security, deploy=True)
def check_github_webhook(app_configs: Sequence[Any] | None, **kwargs: Any) -> list[CheckMessage]:
    """Not unsafe, only slower: without the App's webhook a finished run's slot is found by
    listing GitHub's runs, RUN_FINISH_POLL_SECONDS after its report."""
    if settings.PROVISIONING_RUNNER != "github" or settings.GITHUB_WEBHOOK_SECRET:
        return []
    return [
        Warning(
            "GITHUB_WEBHOOK_SECRET is not set: GitHub's workflow_run webhook cannot be checked, so "
            "a finished run's runner slot is freed only by listing runs, "
            f"{settings.RUN_FINISH_POLL_SECONDS} s or more after its report.",
            hint="Set the GitHub App's webhook URL to <PUBLIC_BASE_URL>/github/webhook/, its "
            "secret to GITHUB_WEBHOOK_SECRET, and subscribe it to 'Workflow runs'.",
            id="config.W020",
        )
    ]


def refuse_unsafe_production() -> None:
    """Called as the web and worker processes start: refuse to serve with unsafe settings."""
    if settings.TESTING:
        return
    problems = production_problems()
    if problems:
        raise ImproperlyConfigured(
            "Refusing to start with unsafe production settings:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
