"""POST /github/webhook/: the GitHub App's webhook deliveries.

What the service needs from them: the moment a run of our workflow has ended, because only then
is its runner free (services/finishing.py). GitHub sends `workflow_run` with action `completed`
when a run ends, and `workflow_job` with action `completed` when its job does (a job skipped
without a runner excepted); either frees the slot the run kept after reporting. Only
`workflow_run` says the whole run is over, and it settles a job the run left behind
(services.job_settle_ended_run): one still provisioning on that run attempt (a killed runner: no
`fail` call) takes the fail path at once instead of at the next reconcile round, and one
dispatched to it and never claimed is due for its re-send now, not after the claim window. Every
other event (and `ping`) is answered 200 and ignored: a non-2xx answer would count as a failed
delivery on the App's page.

Deliveries are signed: `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body, keyed with the
App's webhook secret>` (GITHUB_WEBHOOK_SECRET). Without the secret configured the endpoint does
not exist (404); a missing signature is 401, a wrong one 403, a body that is not a JSON object
400, and none of them changes anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from provisioning import services

SIGNATURE_PREFIX = "sha256="
# GitHub's id of a run, whichever event names it.
RUN_ID_FIELD = {"workflow_run": ("workflow_run", "id"), "workflow_job": ("workflow_job", "run_id")}


def _answer(status: int, detail: str, code: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"detail": detail, "code": code, **extra}, status=status)


def signature_for(body: bytes, secret: str) -> str:
    """The X-Hub-Signature-256 value GitHub sends with `body`."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


@method_decorator(csrf_exempt, name="dispatch")
class GitHubWebhookView(View):
    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> JsonResponse:
        secret = settings.GITHUB_WEBHOOK_SECRET
        if not secret:
            return _answer(
                404, "GitHub webhooks are not configured here (GITHUB_WEBHOOK_SECRET).", "not_found"
            )
        body = request.body
        signature = request.headers.get("X-Hub-Signature-256", "")
        if not signature:
            return _answer(401, "The delivery carries no X-Hub-Signature-256 header.", "unsigned")
        if not hmac.compare_digest(signature.encode(), signature_for(body, secret).encode()):
            return _answer(403, "X-Hub-Signature-256 does not match this body.", "bad_signature")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return _answer(400, "The body is not a JSON object.", "parse_error")

        event = request.headers.get("X-GitHub-Event", "")
        if event == "ping":
            return _answer(200, "pong", "pong")
        repository = payload.get("repository")
        full_name = repository.get("full_name") if isinstance(repository, dict) else None
        if full_name and str(full_name).lower() != settings.GITHUB_REPOSITORY.lower():
            return _answer(
                200, f"Ignored: {full_name} is not this service's repository.", "ignored"
            )
        if event not in RUN_ID_FIELD or payload.get("action") != "completed":
            return _answer(
                200, f"Ignored: {event or 'no'} event, {payload.get('action')!r}.", "ignored"
            )
        holder, key = RUN_ID_FIELD[event]
        described = payload.get(holder)
        if not isinstance(described, dict):
            described = {}
        skipped = described.get("conclusion") == "skipped"
        if event == "workflow_job" and skipped:
            # Our workflow's other job (the scheduled reaper's) is skipped in every dispatched
            # run: it never had a runner, and the run goes on.
            return _answer(200, "Ignored: a skipped job ran on no runner.", "ignored")
        run_id = described.get(key)
        if (
            isinstance(run_id, bool)
            or not isinstance(run_id, int | str)
            or not str(run_id).isdigit()
        ):
            return _answer(
                400,
                f"{holder}.{key} must be a run id (digits).",
                "invalid",
                errors={f"{holder}.{key}": ["A run id (digits) is required."]},
            )
        released = services.run_finished_release(
            run_id=str(run_id), source=f"GitHub's {event} webhook"
        )
        # A run that held a slot had reported (or was cancelled by us): its job moved on already.
        settled = (
            event == "workflow_run"
            and not released
            and services.job_settle_ended_run(
                run_id=str(run_id),
                run_attempt=_attempt(described.get("run_attempt")),
                conclusion=_text(described.get("conclusion")),
                seen_by="GitHub's workflow_run webhook",
            )
        )
        if settled == "failed":
            return _answer(
                200, f"Run {run_id} ended without its report: its job took the fail path.", "failed"
            )
        if settled == "resend":
            return _answer(
                200, f"Run {run_id} ended before its claim: its job's re-send is due now.", "resend"
            )
        if released:
            return _answer(200, f"Run {run_id} has ended: its runner slot is free.", "released")
        return _answer(200, f"Run {run_id} held no slot here.", "nothing_held")


def _attempt(value: object) -> int | None:
    """The payload's run_attempt, if it is one (a positive integer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _text(value: object) -> str | None:
    return value[:40] if isinstance(value, str) else None
