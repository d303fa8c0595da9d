"""/api/v1/: the workflow run's callbacks, the reaper's verdicts and the customer's read API.

The callbacks have no trailing slash: a POST cannot follow APPEND_SLASH's redirect, and the
runner calls these exact paths.
"""

from django.urls import URLPattern, path

from provisioning.api import callbacks, customer, reaper

urlpatterns: list[URLPattern] = [
    path("jobs/<uuid:job_id>/claim", callbacks.JobClaimApi.as_view(), name="job-claim"),
    path("jobs/<uuid:job_id>/heartbeat", callbacks.JobHeartbeatApi.as_view(), name="job-heartbeat"),
    path("jobs/<uuid:job_id>/complete", callbacks.JobCompleteApi.as_view(), name="job-complete"),
    path("jobs/<uuid:job_id>/fail", callbacks.JobFailApi.as_view(), name="job-fail"),
    path(
        "jobs/<uuid:job_id>/cleanup-authorization",
        callbacks.JobCleanupAuthorizationApi.as_view(),
        name="job-cleanup-authorization",
    ),
    path("agents/", customer.AgentListApi.as_view(), name="agent-list"),
    path("agents/<uuid:agent_id>/", customer.AgentDetailApi.as_view(), name="agent-detail"),
    path("reaper/verdicts", reaper.ReaperVerdictsApi.as_view(), name="reaper-verdicts"),
]
