"""The workflow run's callbacks: claim, heartbeat, complete, fail (OIDC bearer token).

Each view validates its body, makes one service call, and answers. Refusals are raised (domain
errors, DRF's own) and shaped by the one handler in errors.py. Validation happens before any
write, so a bad body changes nothing and spends no token.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from provisioning import services
from provisioning.api.authentication import IsWorkflowRun, WorkflowRunAuthentication
from provisioning.api.errors import ErrorSerializer, ValidationErrorSerializer
from provisioning.api.fields import (
    RUNNER_STEP_CHOICES,
    StrictCharField,
    StrictIntegerField,
    StrictIPv4Field,
)
from provisioning.api.oidc import RunIdentity
from provisioning.models import JobKind, JobStatus, Region


def _refusals(**by_status: str) -> dict[int, OpenApiResponse]:
    """400 and 401 for every callback, plus the per-call refusals."""
    answers = {
        400: OpenApiResponse(
            ValidationErrorSerializer,
            description="Bad body (wrong types, out of range, unknown step): code `invalid`. "
            "Nothing changed.",
        ),
        401: OpenApiResponse(
            ErrorSerializer,
            description="No token, or it is invalid, expired, or not from a run of our "
            "workflow (issuer, audience, repository, workflow, ref, event, runner environment): "
            "code `not_authenticated` or `invalid_token`. Answer carries `WWW-Authenticate: Bearer`.",
        ),
        403: OpenApiResponse(
            ErrorSerializer,
            description="A run never dispatched for this job: code `wrong_run`.",
        ),
        404: OpenApiResponse(ErrorSerializer, description="No such job: code `not_found`."),
        503: OpenApiResponse(
            ErrorSerializer,
            description="The token issuer's keys could not be fetched: code "
            "`key_set_unavailable`. Retry with a fresh token.",
        ),
    }
    for code, description in by_status.items():
        answers[int(code.removeprefix("s"))] = OpenApiResponse(
            ErrorSerializer, description=description
        )
    return answers


class WorkflowRunApi(APIView):
    """Base of the run's callbacks: OIDC bearer token only; request.auth is the RunIdentity."""

    authentication_classes = [WorkflowRunAuthentication]
    permission_classes = [IsWorkflowRun]
    throttle_classes: list[Any] = []

    @staticmethod
    def validated(serializer_class: type[serializers.Serializer[Any]], request: Request) -> Any:
        payload = serializer_class(data=request.data)
        payload.is_valid(raise_exception=True)
        return payload.validated_data

    @staticmethod
    def run(request: Request) -> RunIdentity:
        """The verified run behind this request (IsWorkflowRun let only such requests in)."""
        identity = request.auth
        if not isinstance(identity, RunIdentity):
            raise exceptions.NotAuthenticated()
        return identity


class ClaimedAgentSerializer(serializers.Serializer[Any]):
    id = serializers.UUIDField()
    name = serializers.CharField()

    class Meta:
        ref_name = "JobClaimAgent"


class JobClaimApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer[Any]):
        attempt = StrictIntegerField(
            min_value=1, help_text="The attempt the run was dispatched for."
        )

        class Meta:
            ref_name = "JobClaimRequest"

    class OutputSerializer(serializers.Serializer[Any]):
        id = serializers.UUIDField()
        status = serializers.CharField(help_text='Always "provisioning".')
        attempt = serializers.IntegerField()
        agent = ClaimedAgentSerializer()
        region = serializers.ChoiceField(choices=Region.choices)
        kind = serializers.ChoiceField(
            choices=JobKind.choices,
            help_text="What the run was dispatched to do; a run whose mode differs must stop.",
        )

        class Meta:
            ref_name = "JobClaimResponse"

    @extend_schema(
        operation_id="job_claim",
        tags=["workflow run"],
        summary="Claim a dispatched job (queued → provisioning)",
        description="Only the run whose id the dispatch stored, for the job's current attempt. "
        "Stores the run's run_attempt; the token's jti is spent.",
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            **_refusals(
                s409="Not queued (`invalid_transition`), another attempt or an earlier run "
                "(`fenced_out`), the customer already has a job provisioning (`user_busy`), the "
                "dispatch is still being recorded (`dispatch_pending`: retry), or the token was "
                "already used (`token_replayed`)."
            ),
        },
    )
    def post(self, request: Request, job_id: UUID) -> Response:
        data = self.validated(self.InputSerializer, request)
        job = services.job_claim(job_id=job_id, attempt=data["attempt"], run=self.run(request))
        answer = {
            "id": job.pk,
            "status": job.status,
            "attempt": job.attempt,
            "agent": {"id": job.agent_id, "name": job.agent.name},
            "region": job.region,
            "kind": job.kind,
        }
        return Response(self.OutputSerializer(answer).data)


class JobHeartbeatApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer[Any]):
        step = serializers.ChoiceField(choices=RUNNER_STEP_CHOICES, required=False)
        progress = StrictIntegerField(min_value=0, max_value=100, required=False)

        class Meta:
            ref_name = "JobHeartbeatRequest"

    class OutputSerializer(serializers.Serializer[Any]):
        status = serializers.CharField(help_text='Always "provisioning".')

        class Meta:
            ref_name = "JobHeartbeatResponse"

    @extend_schema(
        operation_id="job_heartbeat",
        tags=["workflow run"],
        summary="Report that the run is alive, optionally its step and progress",
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            **_refusals(
                s409="The job is not provisioning (`invalid_transition`) or this run no longer "
                "owns it (`fenced_out`): stop working on it."
            ),
        },
    )
    def post(self, request: Request, job_id: UUID) -> Response:
        data = self.validated(self.InputSerializer, request)
        services.job_heartbeat(job_id=job_id, run=self.run(request), **data)
        return Response({"status": JobStatus.PROVISIONING})


class JobCompleteApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer[Any]):
        # Blank only for a deprovision (the VM is gone); the service refuses a blank provision.
        server_id = StrictCharField(max_length=64, allow_blank=True)
        ipv4 = StrictIPv4Field(protocol="IPv4", allow_blank=True)
        server_name = StrictCharField(max_length=128, required=False, allow_blank=True)
        hetzner_calls = StrictIntegerField(
            min_value=0,
            max_value=1_000_000,
            required=False,
            help_text="Hetzner API calls this run made (bounds how many builds run at once).",
        )

        class Meta:
            ref_name = "JobCompleteRequest"

    class OutputSerializer(serializers.Serializer[Any]):
        status = serializers.CharField(help_text='Always "running".')

        class Meta:
            ref_name = "JobCompleteResponse"

    @extend_schema(
        operation_id="job_complete",
        tags=["workflow run"],
        summary="Report success (provisioning → running)",
        description="Repeated by the same run attempt with a fresh token: 200, nothing changes.",
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            **_refusals(
                s409="Fenced out (`fenced_out`), the job is not provisioning and was not "
                "completed by this run (`invalid_transition`), or the token was already used "
                "(`token_replayed`)."
            ),
        },
    )
    def post(self, request: Request, job_id: UUID) -> Response:
        data = self.validated(self.InputSerializer, request)
        job = services.job_complete(job_id=job_id, run=self.run(request), **data)
        return Response({"status": job.status})


class JobFailApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer[Any]):
        error = StrictCharField(
            max_length=services.MAX_ERROR_CHARS, help_text="What went wrong: the log's tail."
        )
        failed_step = serializers.ChoiceField(choices=RUNNER_STEP_CHOICES)
        capacity = serializers.BooleanField(
            required=False,
            default=False,
            help_text="True: Hetzner's server limit stopped the build; requeued without "
            "spending a retry, and builds wait for capacity.",
        )
        hetzner_calls = StrictIntegerField(
            min_value=0,
            max_value=1_000_000,
            required=False,
            help_text="Hetzner API calls this run made (bounds how many builds run at once).",
        )

        class Meta:
            ref_name = "JobFailRequest"

    class OutputSerializer(serializers.Serializer[Any]):
        status = serializers.CharField(
            help_text='"queued": a new run will retry it; "failed": retries spent.'
        )
        retry_count = serializers.IntegerField()
        attempt = serializers.IntegerField()

        class Meta:
            ref_name = "JobFailResponse"

    @extend_schema(
        operation_id="job_fail",
        tags=["workflow run"],
        summary="Report failure (provisioning → queued for a retry, or failed)",
        description="Repeated by the same run: 200, nothing changes.",
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            **_refusals(
                s409="Fenced out (`fenced_out`), the job is not provisioning "
                "(`invalid_transition`), or the token was already used (`token_replayed`)."
            ),
        },
    )
    def post(self, request: Request, job_id: UUID) -> Response:
        data = self.validated(self.InputSerializer, request)
        job = services.job_fail(job_id=job_id, run=self.run(request), **data)
        return Response(self.OutputSerializer(job).data)


class JobCleanupAuthorizationApi(WorkflowRunApi):
    class OutputSerializer(serializers.Serializer[Any]):
        id = serializers.UUIDField()
        approved = serializers.BooleanField(help_text="Always true: a refusal is an error answer.")
        label_selector = serializers.CharField(
            help_text="The Hetzner label selector of the VMs the run may delete."
        )

        class Meta:
            ref_name = "JobCleanupAuthorization"

    @extend_schema(
        operation_id="job_authorize_cleanup",
        tags=["workflow run"],
        summary="Ask before deleting a failed job's VMs (mode: cleanup)",
        description="Only the cleanup run the service dispatched for this job, and only for a "
        "failed provision that was claimed. Any other run must delete nothing. Changes no state; "
        "the approval is recorded in the job's history and the token's jti is spent.",
        request=None,
        responses={
            200: OutputSerializer,
            **_refusals(
                s409="Not a failed, claimed provision (`cleanup_not_allowed`), or the token was "
                "already used (`token_replayed`)."
            ),
        },
    )
    def post(self, request: Request, job_id: UUID) -> Response:
        job = services.job_authorize_cleanup(job_id=job_id, run=self.run(request))
        return Response({"id": job.pk, "approved": True, "label_selector": f"job-id={job.pk}"})
