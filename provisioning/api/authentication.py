"""Who is calling: one attempt of one workflow run, proven by its GitHub Actions OIDC token.

`WorkflowRunAuthentication` (the callbacks: dispatched runs) and `ReaperRunAuthentication` (the
reaper: scheduled or manually dispatched runs) turn `Authorization: Bearer <ID token>` into
`request.auth = RunIdentity` (oidc.verify_run_token does every check). A missing header leaves
the request anonymous, so `IsWorkflowRun` refuses it; DRF answers both with 401 and
`WWW-Authenticate: Bearer` because `authenticate_header` is defined (DRF answers 403 otherwise).
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions, status
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from provisioning.api import oidc
from provisioning.api.oidc import RunIdentity, TokenInvalid

logger = logging.getLogger(__name__)


class KeySetUnavailable(exceptions.APIException):
    """We could not fetch the issuer's keys: not the caller's fault, and worth a retry (5xx)."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The token issuer's keys are unavailable; retry shortly."
    default_code = "key_set_unavailable"


class WorkflowRun:
    """`request.user` for a verified run. Not a Django user: it has no rows and no permissions."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False
    pk = None

    def __init__(self, identity: RunIdentity) -> None:
        self.identity = identity
        self.username = f"workflow:{identity.run_id}"

    def __str__(self) -> str:
        return self.username


class WorkflowRunAuthentication(BaseAuthentication):
    keyword = "Bearer"
    # The events whose runs may call: the callbacks only serve dispatched runs.
    allowed_events: tuple[str, ...] = ("workflow_dispatch",)

    def expected_ref(self) -> str:
        """The branch the run's workflow must be on (its token's ``ref``)."""
        return str(settings.GITHUB_REF)

    def authenticate(self, request: Request) -> tuple[WorkflowRun, RunIdentity] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None  # anonymous: IsWorkflowRun answers 401
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Workflow token refused: the Authorization header must be 'Bearer <token>'.",
                code="invalid_token",
            )
        try:
            token = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(
                "Workflow token refused: malformed token.", code="invalid_token"
            ) from None
        try:
            identity = oidc.verify_run_token(
                token, allowed_events=self.allowed_events, ref=self.expected_ref()
            )
        except TokenInvalid as exc:
            if exc.reason == "key set unavailable":
                raise KeySetUnavailable() from exc
            # The reason is fixed text ("expired", "wrong audience"); the detail (what was seen)
            # goes to the log only.
            logger.info("workflow token refused: %s", exc)
            raise exceptions.AuthenticationFailed(
                f"Workflow token refused: {exc.reason}.", code="invalid_token"
            ) from exc
        return WorkflowRun(identity), identity

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class IsWorkflowRun(BasePermission):
    """Only a verified workflow run may call; anything else is 401 (no token) by DRF's rules."""

    message = "A workflow run's OIDC token is required: 'Authorization: Bearer <token>'."
    code = "not_authenticated"

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, RunIdentity)


# drf-spectacular registers each extension in an unannotated __init_subclass__: the one untyped
# call strict mypy sees in the two scheme class statements below.
class WorkflowRunAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Describes the bearer scheme in the OpenAPI schema (drf-spectacular finds it by import)."""

    target_class = "provisioning.api.authentication.WorkflowRunAuthentication"
    name = "workflowRunToken"
    description = (
        "A GitHub Actions OIDC ID token of a run of our workflow, minted fresh for every "
        "call (its jti is single-use on claim, complete and fail)."
    )

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": self.description,
        }


# --- the scheduled reaper -------------------------------------------------------------------------

# Only the workflow's schedule reaps: a dispatched run is bound to one job and may not read every
# agent's servers or write into their history.
REAPER_EVENTS = ("schedule",)


class ReaperRunAuthentication(WorkflowRunAuthentication):
    """The callbacks' token checks, for the reaper's event (`schedule` only)."""

    allowed_events: tuple[str, ...] = REAPER_EVENTS

    def expected_ref(self) -> str:
        # Scheduled runs always run on the default branch, whatever GITHUB_REF names.
        return str(settings.GITHUB_REAPER_REF)


class ReaperRunAuthenticationScheme(WorkflowRunAuthenticationScheme):  # type: ignore[no-untyped-call]
    target_class = "provisioning.api.authentication.ReaperRunAuthentication"
    name = "reaperRunToken"
    description = (
        "A GitHub Actions OIDC ID token of a scheduled run of our workflow on the reaper's "
        "branch (GITHUB_REAPER_REF), minted fresh for the call."
    )
