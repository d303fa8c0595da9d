"""`POST /api/v1/reaper/verdicts`: the scheduled reaper asks which of our VMs may be deleted.

Authenticated like the run callbacks (a GitHub Actions OIDC token of our workflow file on our
branch, every check of `oidc.verify_run_token`) except that the run is a scheduled one
(`event_name` `schedule`) or a manual `workflow_dispatch`: see ReaperRunAuthentication in
authentication.py. No `jti` is spent: the call only reads, apart from the audit notes it leaves
on the jobs whose VMs are condemned.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from provisioning import reaper
from provisioning.api.authentication import ReaperRunAuthentication
from provisioning.api.callbacks import WorkflowRunApi
from provisioning.api.errors import ErrorSerializer, ValidationErrorSerializer
from provisioning.api.fields import StrictCharField
from provisioning.models import Actor

MAX_SERVERS = 1000


class ManagedServerSerializer(serializers.Serializer[Any]):
    server_id = StrictCharField(max_length=32, help_text="Hetzner server id.")
    name = StrictCharField(max_length=128, required=False, allow_blank=True, default="")
    job_id = StrictCharField(
        max_length=64,
        required=False,
        allow_blank=True,
        default="",
        help_text="The server's `job-id` label (blank if it has none).",
    )
    agent_id = StrictCharField(
        max_length=64,
        required=False,
        allow_blank=True,
        default="",
        help_text="The server's `agent-id` label (blank if it has none).",
    )
    created = serializers.DateTimeField(
        required=False, allow_null=True, default=None, help_text="When Hetzner created it."
    )

    class Meta:
        ref_name = "ReaperServer"

    def validate_server_id(self, value: str) -> str:
        if not value.isdigit():
            raise serializers.ValidationError("A Hetzner server id is digits only.")
        return value


class ReaperKeepSerializer(serializers.Serializer[Any]):
    server_id = serializers.CharField()
    reason = serializers.CharField()

    class Meta:
        ref_name = "ReaperKeep"


class ReaperVerdictSerializer(serializers.Serializer[Any]):
    server_id = serializers.CharField()
    verdict = serializers.ChoiceField(choices=["delete", "keep"])
    reason = serializers.CharField()

    class Meta:
        ref_name = "ReaperVerdict"


class ReaperVerdictsApi(WorkflowRunApi):
    authentication_classes = [ReaperRunAuthentication]

    class InputSerializer(serializers.Serializer[Any]):
        servers = serializers.ListField(
            child=ManagedServerSerializer(), max_length=MAX_SERVERS, allow_empty=True
        )

        class Meta:
            ref_name = "ReaperVerdictsRequest"

    class OutputSerializer(serializers.Serializer[Any]):
        delete = serializers.ListField(
            child=serializers.CharField(), help_text="Server ids to delete; nothing else."
        )
        keep = ReaperKeepSerializer(many=True, help_text="Every server kept, with why.")
        verdicts = ReaperVerdictSerializer(
            many=True, help_text="Every server sent, in order, with its verdict and why."
        )

        class Meta:
            ref_name = "ReaperVerdictsResponse"

    @extend_schema(
        operation_id="reaper_verdicts",
        tags=["reaper"],
        summary="Which managed VMs may be deleted",
        description="The scheduled reaper sends every VM labelled managed-by=agent-provisioning; "
        "the answer lists the ids to delete and a reason for every verdict. Rules: "
        "provisioning/reaper.py. Each delete verdict leaves a `note` JobEvent on the related job.",
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            400: OpenApiResponse(ValidationErrorSerializer, description="Bad body."),
            401: OpenApiResponse(
                ErrorSerializer,
                description="No token, or not one of a scheduled/dispatched run of our workflow.",
            ),
            503: OpenApiResponse(ErrorSerializer, description="Token issuer keys unavailable."),
        },
    )
    def post(self, request: Request) -> Response:
        data = self.validated(self.InputSerializer, request)
        servers = [reaper.ManagedServer(**item) for item in data["servers"]]
        identity = self.run(request)
        verdicts = reaper.reaper_judge(servers=servers, actor=Actor.workflow(identity.run_id))
        answer = {
            "delete": [v.server_id for v in verdicts if v.delete],
            "keep": [
                {"server_id": v.server_id, "reason": v.reason} for v in verdicts if not v.delete
            ],
            "verdicts": [
                {
                    "server_id": v.server_id,
                    "verdict": "delete" if v.delete else "keep",
                    "reason": v.reason,
                }
                for v in verdicts
            ],
        }
        return Response(self.OutputSerializer(answer).data)
