"""The customer's read API: my agents and one agent, each with its latest job (session login).

What the customer reads (`message`, `ipv4` while running) comes from the dashboard's presenter
(provisioning/web/presenters.py), so the API and the pages always say the same thing.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from provisioning import selectors
from provisioning.api.errors import ErrorSerializer
from provisioning.models import Agent, JobKind, JobStatus, Region
from provisioning.web.presenters import agent_present


class AgentJobSerializer(serializers.Serializer[Any]):
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
        allow_null=True,
        help_text=(
            "Place among the jobs waiting for a build slot, in the order they are dispatched "
            "(1 = next to go); null unless queued and waiting its turn (null too in a retry's "
            "backoff and once dispatched, while GitHub finds a build machine)."
        ),
    )
    estimated_ready_at = serializers.DateTimeField(
        allow_null=True,
        help_text=(
            "When the agent should be ready (for a deprovision: its server gone), estimated from "
            "the queue ahead, the builds in flight, the build slots in force and recent build "
            "times in the agent's region; null unless queued."
        ),
    )
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    completed_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "AgentJob"


class AgentSerializer(serializers.Serializer[Any]):
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


def agent_view(agent: Agent) -> dict[str, Any]:
    """The agent as AgentSerializer renders it: its latest job (checked for a timeout) and what
    the presenter says about them."""
    job, status = agent_present(agent)
    return {
        "id": agent.pk,
        "name": agent.name,
        "region": agent.region,
        "created_at": agent.created_at,
        "ended": status.is_ended,
        "ended_at": agent.ended_at,
        "ipv4": status.ipv4,
        "message": status.sentence,
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
            "queue_position": status.queue_position,
            "estimated_ready_at": status.estimated_ready_at,
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
