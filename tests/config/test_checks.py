"""Production fails closed: unsafe or missing settings are deploy-check errors and stop the
web and worker processes from starting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from config.checks import production_problems
from provisioning.backends.github import load_private_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

APP_KEY = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode()
)
# The key's body without its armour: what an operator pastes by mistake.
APP_KEY_BODY = "".join(line for line in APP_KEY.splitlines() if not line.startswith("-----"))

PRODUCTION = {
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": "k3y-for-a-test-of-production-settings-0123456789-abcdefghijklmnop",
    "DJANGO_ALLOWED_HOSTS": "agents.example.com",
    "PUBLIC_BASE_URL": "https://agents.example.com",
    "PROVISIONING_RUNNER": "github",
    "GITHUB_REPOSITORY": "acme/agents",
    "GITHUB_REPOSITORY_ID": "4242",
    "METRICS_TOKEN": "scrape-token",
    "GITHUB_APP_ID": "12345",
    "GITHUB_APP_INSTALLATION_ID": "67890",
    "GITHUB_APP_PRIVATE_KEY": APP_KEY,
    "GITHUB_WEBHOOK_SECRET": "webhook-secret-for-a-test",
}
MINIMAL = {k: PRODUCTION[k] for k in ("DJANGO_DEBUG", "DJANGO_SECRET_KEY", "PUBLIC_BASE_URL")}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A clean environment: none of the test run's DJANGO_TESTING / defaults leak in.
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", ROOT)}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_deploy_with_only_a_key_and_an_https_url_fails_naming_each_missing_setting():
    result = _run(["manage.py", "check", "--deploy"], MINIMAL)

    assert result.returncode != 0
    for name in (
        "PROVISIONING_RUNNER",
        "GITHUB_REPOSITORY:",
        "GITHUB_REPOSITORY_ID",
        "METRICS_TOKEN",
    ):
        assert name in result.stderr, result.stderr


def test_check_deploy_with_a_full_production_environment_is_clean():
    result = _run(["manage.py", "check", "--deploy"], PRODUCTION)

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_without_the_github_webhook_secret_warns_and_passes():
    env = {k: v for k, v in PRODUCTION.items() if k != "GITHUB_WEBHOOK_SECRET"}
    result = _run(["manage.py", "check", "--deploy"], env)

    assert result.returncode == 0, result.stderr
    assert "config.W020" in result.stderr + result.stdout
    assert "GITHUB_WEBHOOK_SECRET" in result.stderr + result.stdout


def test_the_worker_refuses_to_start_with_unsafe_settings():
    result = _run(["manage.py", "provisioning_worker", "--once"], MINIMAL)

    assert result.returncode != 0
    assert "Refusing to start" in result.stderr
    assert "METRICS_TOKEN" in result.stderr


def test_the_web_process_refuses_to_start_with_unsafe_settings():
    unsafe = {**PRODUCTION, "PROVISIONING_OIDC_ISSUER": "http://token.example.com"}
    result = _run(["-c", "import config.wsgi"], unsafe)

    assert result.returncode != 0
    assert "PROVISIONING_OIDC_ISSUER" in result.stderr


def test_the_web_process_starts_with_safe_settings():
    result = _run(["-c", "import config.wsgi; print('started')"], PRODUCTION)

    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


SAFE = {
    "DEBUG": False,
    "ALLOW_LOOPBACK_SERVICES": False,
    "PROVISIONING_RUNNER": "github",
    "PROVISIONING_OIDC_ISSUER": "https://token.actions.githubusercontent.com",
    "PROVISIONING_OIDC_JWKS_URL": "https://token.actions.githubusercontent.com/.well-known/jwks",
    "GITHUB_REPOSITORY": "acme/agents",
    "GITHUB_REPOSITORY_ID": "4242",
    "METRICS_TOKEN": "scrape-token",
    "GITHUB_API_URL": "https://api.github.com",
    "PUBLIC_BASE_URL": "https://agents.example.com",
    "STRIPE_API_BASE": "",
    "BILLING_LOCAL_CHECKOUT": False,
    "GITHUB_APP_ID": "12345",
    "GITHUB_APP_INSTALLATION_ID": "67890",
    "GITHUB_APP_PRIVATE_KEY": APP_KEY,
}


def _problems(**changes: object) -> dict[str, str]:
    with override_settings(**{**SAFE, **changes}):
        return {p.setting: p.message for p in production_problems()}


def test_safe_production_settings_have_no_problem():
    assert _problems() == {}


def test_debug_is_local_development_and_never_checked():
    assert _problems(DEBUG=True, PROVISIONING_RUNNER="", METRICS_TOKEN="") == {}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("PROVISIONING_OIDC_ISSUER", "http://127.0.0.1:8702"),
        ("PROVISIONING_OIDC_ISSUER", "http://issuer.example.com"),
        ("PROVISIONING_OIDC_JWKS_URL", "http://127.0.0.1:8702/.well-known/jwks"),
        ("GITHUB_API_URL", "http://127.0.0.1:9000"),
        ("PUBLIC_BASE_URL", "http://agents.example.com"),
        ("STRIPE_API_BASE", "http://127.0.0.1:12111"),
        ("BILLING_LOCAL_CHECKOUT", True),
        ("PROVISIONING_RUNNER", "local"),
        ("PROVISIONING_RUNNER", ""),
    ],
)
def test_stand_ins_and_plain_http_are_refused_without_the_loopback_switch(setting, value):
    assert setting in _problems(**{setting: value})


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("PROVISIONING_OIDC_ISSUER", "http://127.0.0.1:8702"),
        ("PROVISIONING_OIDC_JWKS_URL", "http://localhost:8702/.well-known/jwks"),
        ("GITHUB_API_URL", "http://[::1]:9000"),
        ("PUBLIC_BASE_URL", "http://127.0.0.1:8000"),
        ("STRIPE_API_BASE", "http://127.0.0.1:12111"),
        ("BILLING_LOCAL_CHECKOUT", True),
        ("PROVISIONING_RUNNER", "local"),
    ],
)
def test_the_loopback_switch_allows_loopback_stand_ins(setting, value):
    assert _problems(ALLOW_LOOPBACK_SERVICES=True, **{setting: value}) == {}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("PROVISIONING_OIDC_ISSUER", "http://issuer.example.com"),
        ("GITHUB_API_URL", "http://10.0.0.5"),
        ("STRIPE_API_BASE", "https://stripe-proxy.example.com"),
    ],
)
def test_the_loopback_switch_still_refuses_anything_not_on_loopback(setting, value):
    assert setting in _problems(ALLOW_LOOPBACK_SERVICES=True, **{setting: value})


def test_a_pinned_key_file_needs_no_url_scheme():
    assert _problems(PROVISIONING_OIDC_JWKS_URL="/etc/agent-provisioning/jwks.json") == {}


def test_a_github_runner_needs_its_app_and_a_key_that_loads():
    problems = _problems(GITHUB_APP_ID="", GITHUB_APP_INSTALLATION_ID="", GITHUB_APP_PRIVATE_KEY="")

    assert {"GITHUB_APP_ID", "GITHUB_APP_INSTALLATION_ID", "GITHUB_APP_PRIVATE_KEY"} <= set(
        problems
    )


def test_a_key_pasted_without_its_armour_is_refused_and_never_echoed():
    problems = _problems(GITHUB_APP_PRIVATE_KEY=APP_KEY_BODY)

    assert "GITHUB_APP_PRIVATE_KEY" in problems
    assert APP_KEY_BODY[:40] not in problems["GITHUB_APP_PRIVATE_KEY"]


def test_check_deploy_never_prints_a_misplaced_key():
    result = _run(
        ["manage.py", "check", "--deploy"], {**PRODUCTION, "GITHUB_APP_PRIVATE_KEY": APP_KEY_BODY}
    )

    assert result.returncode != 0
    assert "GITHUB_APP_PRIVATE_KEY" in result.stderr
    assert APP_KEY_BODY[:40] not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "value",
    [
        APP_KEY_BODY,  # a long single line: not a path
        "/nonexistent/app-key.pem",
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----",
    ],
)
def test_load_private_key_refuses_without_repeating_the_value(value):
    with pytest.raises(ImproperlyConfigured) as refused:
        load_private_key(value)

    assert value[:30] not in str(refused.value)


def test_load_private_key_accepts_pem_text_flattened_into_one_line():
    flat = APP_KEY.strip().replace("\n", "\\n")

    assert load_private_key(flat).startswith("-----BEGIN PRIVATE KEY-----\n")


@pytest.mark.parametrize(("path", "redirected"), [("/metrics", True), ("/healthz", False)])
def test_only_healthz_answers_over_plain_http_when_https_is_enforced(
    db, client, settings, path, redirected
):
    settings.SECURE_SSL_REDIRECT = True
    settings.METRICS_TOKEN = "scrape-token"

    response = client.get(path, HTTP_AUTHORIZATION="Bearer scrape-token")

    assert (response.status_code == 301) is redirected
    if redirected:
        assert response["Location"].startswith("https://")


def test_favicon_ico_answers_with_the_icon(client, db):
    answer = client.get("/favicon.ico", follow=True)

    assert answer.redirect_chain and answer.redirect_chain[0][1] == 301
    assert answer.status_code == 200
    assert b"<svg" in b"".join(answer.streaming_content)


def test_a_missing_secret_key_is_one_line_not_a_traceback():
    result = _run(["manage.py", "check"], {"DJANGO_DEBUG": "0"})

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Configuration error: DJANGO_SECRET_KEY is not set. Production needs a real secret; "
        "for local work use `make run`, which sets DJANGO_DEBUG=1 and a throwaway key."
    ]
