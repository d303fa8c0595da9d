"""Pytest fixtures around the development OIDC issuer (provisioning.localdev.oidc_issuer).

``oidc_issuer`` starts the issuer on a free loopback port with the claims the current Django
settings expect, and points the verifier's settings (issuer, JWKS URL, audience) and the local
runner backend's (LOCAL_OIDC_ISSUER_URL, LOCAL_OIDC_REQUEST_TOKEN) at it. Tests then mint
tokens with ``oidc_issuer.mint(run_id=..., **claim_overrides)``.

Register in a conftest with ``pytest_plugins = ["tests.fakes.oidc"]``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.api import oidc
from provisioning.localdev.oidc_issuer import DevOidcIssuer

TEST_REQUEST_TOKEN = "test-request-token"


@functools.cache
def _shared_issuer_key() -> rsa.RSAPrivateKey:
    """The issuer's first key, shared by every test: RSA key generation is slow."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def bearer(token: str) -> dict[str, str]:
    """Headers for Django's test client / DRF's APIClient: ``client.post(url, **bearer(t))``."""
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def configure_settings_for(issuer: DevOidcIssuer, settings: Any) -> None:
    settings.PROVISIONING_OIDC_ISSUER = issuer.issuer
    settings.PROVISIONING_OIDC_JWKS_URL = issuer.jwks_url
    settings.PROVISIONING_OIDC_AUDIENCE = issuer.audience
    settings.PROVISIONING_OIDC_RUNNER_ENVIRONMENTS = ["github-hosted"]
    # A rotated key is fetched at once instead of after the production cooldown.
    settings.PROVISIONING_OIDC_JWKS_REFRESH_COOLDOWN_SECONDS = 0
    settings.LOCAL_OIDC_ISSUER_URL = issuer.base_url
    settings.LOCAL_OIDC_REQUEST_TOKEN = issuer.request_token


def running_issuer(settings: Any) -> Iterator[DevOidcIssuer]:
    """Generator behind the ``oidc_issuer`` fixture, for test modules that declare their own."""
    issuer = DevOidcIssuer(
        repository=settings.GITHUB_REPOSITORY,
        repository_id=str(settings.GITHUB_REPOSITORY_ID),
        workflow_file=settings.GITHUB_WORKFLOW_FILE,
        ref=settings.GITHUB_REF,
        audience=getattr(settings, "PROVISIONING_OIDC_AUDIENCE", "") or "agent-provisioning",
        request_token=TEST_REQUEST_TOKEN,
        private_key=_shared_issuer_key(),
    )
    oidc.reset_key_cache()
    with issuer:
        configure_settings_for(issuer, settings)
        yield issuer
    oidc.reset_key_cache()


@pytest.fixture
def oidc_issuer(settings: Any) -> Iterator[DevOidcIssuer]:
    """A running dev issuer whose tokens pass ``oidc.verify_run_token`` as configured."""
    yield from running_issuer(settings)
