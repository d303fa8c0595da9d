"""/api/v1/: the workflow run's callbacks and the customer's read API.

The callbacks have no trailing slash (DESIGN.md's contract): a POST cannot follow APPEND_SLASH's
redirect.
"""

from django.urls import URLPattern, path

from provisioning import apis, apis_reaper

urlpatterns: list[URLPattern] = [
    path("jobs/<uuid:job_id>/claim", apis.JobClaimApi.as_view(), name="job-claim"),
    path("jobs/<uuid:job_id>/heartbeat", apis.JobHeartbeatApi.as_view(), name="job-heartbeat"),
    path("jobs/<uuid:job_id>/complete", apis.JobCompleteApi.as_view(), name="job-complete"),
    path("jobs/<uuid:job_id>/fail", apis.JobFailApi.as_view(), name="job-fail"),
    path("agents/", apis.AgentListApi.as_view(), name="agent-list"),
    path("agents/<uuid:agent_id>/", apis.AgentDetailApi.as_view(), name="agent-detail"),
    path("reaper/verdicts", apis_reaper.ReaperVerdictsApi.as_view(), name="reaper-verdicts"),
]
