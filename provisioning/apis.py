"""The HTTP API: the workflow run's callbacks (OIDC bearer) and the customer's read API (session).

Each view validates its body, makes one service or selector call, and answers. Refusals are
raised (domain errors, DRF's own) and shaped by the one handler in apis_errors.py. Validation
happens before any write, so a bad body changes nothing and spends no token.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from provisioning import selectors, services
from provisioning.authentication import IsWorkflowRun, WorkflowRunAuthentication
from provisioning.models import (
    RUNNER_STEPS,
    Agent,
    JobKind,
    JobStatus,
    ProvisioningJob,
    Region,
    Step,
    step_message,
)

RUNNER_STEP_CHOICES = [(s.value, s.label) for s in RUNNER_STEPS]


# --- strict fields: JSON types as sent, no coercion ("3" is not an integer, 7 is not a string) --


class StrictIntegerField(serializers.IntegerField):
    default_error_messages = {"invalid": "A JSON integer is required."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    default_error_messages = {"invalid": "A JSON string is required."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIPv4Field(serializers.IPAddressField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        if data == "" and self.allow_blank:
            return ""
        return super().to_internal_value(data)


# --- error shapes (for the schema; the handler writes them) -------------------------------------


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField(help_text="Stable machine-readable reason, e.g. fenced_out.")

    class Meta:
        ref_name = "Error"


class ValidationErrorSerializer(ErrorSerializer):
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text="Field name (or non_field_errors) to its messages.",
    )

    class Meta:
        ref_name = "ValidationError"


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
    def validated(serializer_class: type[serializers.Serializer], request: Request) -> Any:
        payload = serializer_class(data=request.data)
        payload.is_valid(raise_exception=True)
        return payload.validated_data


class ClaimedAgentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()

    class Meta:
        ref_name = "JobClaimAgent"


class JobClaimApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer):
        attempt = StrictIntegerField(
            min_value=1, help_text="The attempt the run was dispatched for."
        )

        class Meta:
            ref_name = "JobClaimRequest"

    class OutputSerializer(serializers.Serializer):
        id = serializers.UUIDField()
        status = serializers.CharField(help_text='Always "provisioning".')
        attempt = serializers.IntegerField()
        agent = ClaimedAgentSerializer()
        region = serializers.ChoiceField(choices=Region.choices)

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
        job = services.job_claim(job_id=job_id, attempt=data["attempt"], run=request.auth)
        answer = {
            "id": job.pk,
            "status": job.status,
            "attempt": job.attempt,
            "agent": {"id": job.agent_id, "name": job.agent.name},
            "region": job.region,
        }
        return Response(self.OutputSerializer(answer).data)


class JobHeartbeatApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer):
        step = serializers.ChoiceField(choices=RUNNER_STEP_CHOICES, required=False)
        progress = StrictIntegerField(min_value=0, max_value=100, required=False)

        class Meta:
            ref_name = "JobHeartbeatRequest"

    class OutputSerializer(serializers.Serializer):
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
        services.job_heartbeat(job_id=job_id, run=request.auth, **data)
        return Response({"status": JobStatus.PROVISIONING})


class JobCompleteApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer):
        # Blank only for a deprovision (the VM is gone); the service refuses a blank provision.
        server_id = StrictCharField(max_length=64, allow_blank=True)
        ipv4 = StrictIPv4Field(protocol="IPv4", allow_blank=True)
        server_name = StrictCharField(max_length=128, required=False, allow_blank=True)

        class Meta:
            ref_name = "JobCompleteRequest"

    class OutputSerializer(serializers.Serializer):
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
        job = services.job_complete(job_id=job_id, run=request.auth, **data)
        return Response({"status": job.status})


class JobFailApi(WorkflowRunApi):
    class InputSerializer(serializers.Serializer):
        error = StrictCharField(
            max_length=services.MAX_ERROR_CHARS, help_text="What went wrong: the log's tail."
        )
        failed_step = serializers.ChoiceField(choices=RUNNER_STEP_CHOICES)

        class Meta:
            ref_name = "JobFailRequest"

    class OutputSerializer(serializers.Serializer):
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
        job = services.job_fail(job_id=job_id, run=request.auth, **data)
        return Response(self.OutputSerializer(job).data)


# --- the customer's read API ------------------------------------------------------------------


def customer_message(agent: Agent, job: ProvisioningJob | None) -> str:
    """One plain sentence for the customer; never the raw error text (it is for operators)."""
    if agent.ended_at is not None:
        return "This agent has ended."
    if job is None:
        return step_message(None, failed=False)
    if job.status == JobStatus.RUNNING:
        if job.kind == JobKind.DEPROVISION:
            return "Your agent's server has been removed."
        return "Your agent is ready."
    if job.status == JobStatus.FAILED:
        return step_message(job.failed_step or job.step, failed=True)
    if job.status == JobStatus.QUEUED:
        waiting = step_message(Step.DISPATCH, failed=False)
        if job.retry_count and job.failed_step:
            return f"{step_message(job.failed_step, failed=True)} Trying again. {waiting}"
        return waiting
    return step_message(job.step, failed=False)


class AgentJobSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=JobKind.choices)
    status = serializers.ChoiceField(choices=JobStatus.choices)
    step = serializers.CharField(help_text="A step name, or empty before the first one.")
    failed_step = serializers.CharField(help_text="Set once an attempt failed.")
    progress = serializers.IntegerField(allow_null=True, min_value=0, max_value=100)
    attempt = serializers.IntegerField()
    retry_count = serializers.IntegerField()
    max_retries = serializers.IntegerField()
    queue_position = serializers.IntegerField(
        allow_null=True, help_text="1 = next to go; null unless queued."
    )
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    completed_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "AgentJob"


class AgentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    region = serializers.ChoiceField(choices=Region.choices)
    created_at = serializers.DateTimeField()
    ended = serializers.BooleanField()
    ended_at = serializers.DateTimeField(allow_null=True)
    ipv4 = serializers.IPAddressField(
        protocol="IPv4", allow_null=True, help_text="Set while the agent is running."
    )
    message = serializers.CharField(help_text="What is happening, in plain words.")
    job = AgentJobSerializer(allow_null=True, help_text="The agent's latest job.")

    class Meta:
        ref_name = "Agent"


def _latest_job_checked(agent: Agent) -> ProvisioningJob | None:
    """The agent's latest job (prefetched), after the seed's on-demand timeout check."""
    jobs = list(agent.jobs.all())
    job = jobs[0] if jobs else None
    if job is None or job.status != JobStatus.PROVISIONING:
        return job
    now = timezone.now()
    # Only a job that looks stale pays for the locking check; the service re-checks under lock.
    if job.is_stale(now=now, timeout_seconds=settings.JOB_TIMEOUT_SECONDS) or (
        job.is_past_deadline(now=now, deadline_seconds=settings.JOB_DEADLINE_SECONDS)
    ):
        services.job_timeout_if_stale(job_id=job.pk, now=now)
        job = selectors.job_get(job_id=job.pk)
    return job


def agent_view(agent: Agent) -> dict[str, Any]:
    job = _latest_job_checked(agent)
    running = (
        job is not None
        and job.status == JobStatus.RUNNING
        and job.kind == JobKind.PROVISION
        and agent.ended_at is None
    )
    return {
        "id": agent.pk,
        "name": agent.name,
        "region": agent.region,
        "created_at": agent.created_at,
        "ended": agent.ended_at is not None,
        "ended_at": agent.ended_at,
        "ipv4": agent.ipv4 if running else None,
        "message": customer_message(agent, job),
        "job": None
        if job is None
        else {
            "id": job.pk,
            "kind": job.kind,
            "status": job.status,
            "step": job.step,
            "failed_step": job.failed_step,
            "progress": job.progress,
            "attempt": job.attempt,
            "retry_count": job.retry_count,
            "max_retries": job.max_retries,
            "queue_position": selectors.job_queue_position(job=job),
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "completed_at": job.completed_at,
        },
    }


class CustomerApi(APIView):
    authentication_classes = [SessionAuthentication]
    permission_classes = [IsAuthenticated]


_CUSTOMER_REFUSALS = {
    403: OpenApiResponse(ErrorSerializer, description="Not logged in: code `not_authenticated`."),
}


class AgentListApi(CustomerApi):
    @extend_schema(
        operation_id="agent_list",
        tags=["customer"],
        summary="My agents, newest first, each with its latest job",
        description="Reading runs the on-demand timeout check on a silent provisioning job.",
        responses={200: AgentSerializer(many=True), **_CUSTOMER_REFUSALS},
    )
    def get(self, request: Request) -> Response:
        agents = selectors.agent_list_for_user(user=request.user)
        return Response(AgentSerializer([agent_view(a) for a in agents], many=True).data)


class AgentDetailApi(CustomerApi):
    @extend_schema(
        operation_id="agent_detail",
        tags=["customer"],
        summary="One of my agents with its latest job",
        responses={
            200: AgentSerializer,
            **_CUSTOMER_REFUSALS,
            404: OpenApiResponse(
                ErrorSerializer, description="No such agent, or not yours: code `not_found`."
            ),
        },
    )
    def get(self, request: Request, agent_id: UUID) -> Response:
        agent = selectors.agent_get_for_user(user=request.user, agent_id=agent_id)
        if agent is None:
            raise exceptions.NotFound("No such agent.")
        return Response(AgentSerializer(agent_view(agent)).data)
