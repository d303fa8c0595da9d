"""The HTTP contract (paths, bodies, status codes, refusal codes), driven over HTTP with tokens
from the test issuer."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone
from django.utils.html import escape
from rest_framework.test import APIClient

from provisioning import services
from provisioning.models import (
    Agent,
    JobEvent,
    ProvisioningJob,
    Step,
    UsedTokenId,
)
from tests.factories import AgentFactory, UserFactory
from tests.fakes.oidc import bearer
from tests.provisioning.helpers import claimed, dispatch, enqueue, requeue_now

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> APIClient:
    return APIClient()


def call(api: APIClient, job_id: Any, verb: str, body: Any, token: str | None) -> Any:
    headers = bearer(token) if token else {}
    return api.post(f"/api/v1/jobs/{job_id}/{verb}", body, format="json", **headers)


def snapshot(job: ProvisioningJob) -> tuple[Any, ...]:
    """Everything a refused call must leave alone."""
    row = ProvisioningJob.objects.values().get(pk=job.pk)
    agent = Agent.objects.values().get(pk=job.agent_id)
    return (
        row,
        agent,
        JobEvent.objects.filter(job_id=job.pk).count(),
        UsedTokenId.objects.count(),
    )


@pytest.fixture
def dispatched(backend) -> tuple[ProvisioningJob, str]:
    """A queued job whose dispatch started run `run_id` (not yet claimed)."""
    job = enqueue()
    run = dispatch(job, backend)
    job.refresh_from_db()
    return job, run.run_id


@pytest.fixture
def provisioning_job(backend) -> tuple[ProvisioningJob, str]:
    job, run = claimed(backend)
    return job, run.run_id


# --- the full drive ----------------------------------------------------------------------------


def test_a_run_drives_its_job_from_claim_through_heartbeats_to_running(
    api, oidc_issuer, dispatched
):
    job, run_id = dispatched
    token = lambda: oidc_issuer.mint(run_id=run_id)  # noqa: E731 - a fresh token per call

    claim = call(api, job.pk, "claim", {"attempt": 1}, token())
    beats = [
        call(api, job.pk, "heartbeat", {"step": "create-server", "progress": 10}, token()),
        call(api, job.pk, "heartbeat", {"step": "configure", "progress": 50}, token()),
        call(api, job.pk, "heartbeat", {}, token()),
    ]
    done = call(
        api,
        job.pk,
        "complete",
        {"server_id": "4711", "ipv4": "203.0.113.7", "server_name": "agent-x"},
        token(),
    )

    assert claim.status_code == 200, claim.json()
    assert claim.json() == {
        "id": str(job.pk),
        "status": "provisioning",
        "attempt": 1,
        "agent": {"id": str(job.agent_id), "name": job.agent.name},
        "region": "us-east",
        "kind": "provision",
    }
    assert [b.status_code for b in beats] == [200, 200, 200]
    assert beats[0].json() == {"status": "provisioning"}
    assert done.status_code == 200
    assert done.json() == {"status": "running"}
    job.refresh_from_db()
    assert (job.status, job.step, job.progress, job.run_attempt) == ("running", "complete", 100, 1)
    agent = Agent.objects.get(pk=job.agent_id)
    assert (agent.server_id, str(agent.ipv4), agent.server_name) == (
        "4711",
        "203.0.113.7",
        "agent-x",
    )
    steps = list(
        JobEvent.objects.filter(job=job, action=JobEvent.Action.STEP)
        .order_by("id")
        .values_list("step", flat=True)
    )
    assert steps == ["create-server", "configure"]


def test_a_failed_attempt_is_requeued_and_the_next_run_completes_it(
    api, oidc_issuer, dispatched, backend
):
    job, first_run = dispatched
    call(api, job.pk, "claim", {"attempt": 1}, oidc_issuer.mint(run_id=first_run))

    failed = call(
        api,
        job.pk,
        "fail",
        {"error": "ansible: unreachable host", "failed_step": "configure"},
        oidc_issuer.mint(run_id=first_run),
    )
    requeue_now(job)
    second_run = dispatch(job, backend).run_id
    claim = call(api, job.pk, "claim", {"attempt": 2}, oidc_issuer.mint(run_id=second_run))
    done = call(
        api,
        job.pk,
        "complete",
        {"server_id": "4712", "ipv4": "203.0.113.8"},
        oidc_issuer.mint(run_id=second_run),
    )

    assert failed.status_code == 200
    assert failed.json() == {"status": "queued", "retry_count": 1, "attempt": 2}
    assert claim.status_code == 200
    assert claim.json()["attempt"] == 2
    assert done.json() == {"status": "running"}
    job.refresh_from_db()
    assert (job.status, job.attempt, job.retry_count) == ("running", 2, 1)


def test_a_fail_reporting_the_server_limit_requeues_without_spending_a_retry(
    api, oidc_issuer, backend
):
    job, run = claimed(backend, max_retries=0)  # a plain failure would end it

    response = call(
        api,
        job.pk,
        "fail",
        {
            "error": "create server in ash: resource_limit_exceeded: server limit exceeded",
            "failed_step": "create-server",
            "capacity": True,
        },
        oidc_issuer.mint(run_id=run.run_id),
    )

    assert response.status_code == 200, response.content
    assert response.json() == {"status": "queued", "retry_count": 0, "attempt": 2}


def test_fail_with_no_retries_left_ends_the_job_failed(api, oidc_issuer, backend):
    job, run = claimed(backend, max_retries=0)

    response = call(
        api,
        job.pk,
        "fail",
        {"error": "boom", "failed_step": "create-server"},
        oidc_issuer.mint(run_id=run.run_id),
    )

    assert response.status_code == 200
    assert response.json() == {"status": "failed", "retry_count": 0, "attempt": 1}


# --- 401: the token ---------------------------------------------------------------------------


def test_a_call_without_a_token_is_401_with_a_bearer_challenge(api, oidc_issuer, dispatched):
    job, _ = dispatched
    before = snapshot(job)

    response = call(api, job.pk, "claim", {"attempt": 1}, None)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json()["code"] == "not_authenticated"
    assert snapshot(job) == before


BAD_TOKENS = {
    "expired": (
        lambda i, run: i.mint(run_id=run, iat=int(time.time()) - 900, exp=int(time.time()) - 300),
        "expired",
    ),
    "wrong audience": (lambda i, run: i.mint(run_id=run, aud="someone-else"), "wrong audience"),
    "wrong issuer": (
        lambda i, run: i.mint(run_id=run, iss="https://token.example.com"),
        "wrong issuer",
    ),
    "wrong repository": (
        lambda i, run: i.mint(run_id=run, repository_id="999"),
        "wrong repository",
    ),
    "wrong workflow": (
        lambda i, run: i.mint(
            run_id=run,
            workflow_ref=f"{i.repository}/.github/workflows/other.yml@refs/heads/main",
        ),
        "wrong workflow",
    ),
    "wrong ref": (lambda i, run: i.mint(run_id=run, ref="refs/heads/feature"), "wrong ref"),
    "wrong event": (lambda i, run: i.mint(run_id=run, event_name="push"), "wrong event"),
    "self-hosted runner": (
        lambda i, run: i.mint(run_id=run, runner_environment="self-hosted"),
        "wrong runner environment",
    ),
    "bad signature": (
        lambda i, run: i.mint(run_id=run, sign_with=i.add_key(publish=False)),
        "bad signature",
    ),
    "unknown kid": (lambda i, run: i.mint(run_id=run, kid=i.add_key(publish=False)), "unknown key"),
    "not a jwt": (lambda i, run: "not-a-jwt", "malformed token"),
}


@pytest.mark.parametrize("verb", ["claim", "heartbeat", "complete", "fail"])
@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_a_token_that_is_not_our_workflow_runs_is_401_and_changes_nothing(
    api, oidc_issuer, provisioning_job, case, verb
):
    job, run_id = provisioning_job
    make, reason = BAD_TOKENS[case]
    body = {
        "claim": {"attempt": 1},
        "heartbeat": {"progress": 5},
        "complete": {"server_id": "1", "ipv4": "203.0.113.1"},
        "fail": {"error": "x", "failed_step": "configure"},
    }[verb]
    before = snapshot(job)

    response = call(api, job.pk, verb, body, make(oidc_issuer, run_id))

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json() == {
        "detail": f"Workflow token refused: {reason}.",
        "code": "invalid_token",
    }
    assert snapshot(job) == before


def test_a_key_set_outage_is_503_so_the_runner_retries(api, oidc_issuer, dispatched, settings):
    job, run_id = dispatched
    token = oidc_issuer.mint(run_id=run_id)
    settings.PROVISIONING_OIDC_JWKS_URL = "http://127.0.0.1:9/.well-known/jwks"  # nothing listens

    response = call(api, job.pk, "claim", {"attempt": 1}, token)

    assert response.status_code == 503
    assert response.json()["code"] == "key_set_unavailable"


# --- 403 / 404 / 409: who the run is --------------------------------------------------------


def test_a_run_never_dispatched_for_the_job_is_403_on_claim(api, oidc_issuer, dispatched):
    job, _ = dispatched
    before = snapshot(job)

    response = call(api, job.pk, "claim", {"attempt": 1}, oidc_issuer.mint(run_id="31337"))

    assert response.status_code == 403
    assert response.json()["code"] == "wrong_run"
    assert snapshot(job)[:3] == before[:3]


def test_a_run_never_dispatched_for_the_job_is_403_on_heartbeat(api, oidc_issuer, provisioning_job):
    job, _ = provisioning_job
    before = snapshot(job)

    response = call(api, job.pk, "heartbeat", {}, oidc_issuer.mint(run_id="31337"))

    assert response.status_code == 403
    assert response.json()["code"] == "wrong_run"
    assert snapshot(job) == before


def test_no_such_job_is_404(api, oidc_issuer):
    response = call(api, uuid.uuid4(), "heartbeat", {}, oidc_issuer.mint(run_id="1"))

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_a_replayed_token_is_409_and_changes_nothing(api, oidc_issuer, dispatched):
    job, run_id = dispatched
    token = oidc_issuer.mint(run_id=run_id)
    assert call(api, job.pk, "claim", {"attempt": 1}, token).status_code == 200
    job.refresh_from_db()
    before = snapshot(job)

    response = call(api, job.pk, "complete", {"server_id": "1", "ipv4": "203.0.113.1"}, token)

    assert response.status_code == 409
    assert response.json()["code"] == "token_replayed"
    assert snapshot(job) == before


def test_claim_for_another_attempt_is_409_fenced_out(api, oidc_issuer, dispatched):
    job, run_id = dispatched
    before = snapshot(job)

    response = call(api, job.pk, "claim", {"attempt": 2}, oidc_issuer.mint(run_id=run_id))

    assert response.status_code == 409
    assert response.json()["code"] == "fenced_out"
    assert snapshot(job)[:3] == before[:3]


def test_claiming_a_job_twice_is_409_invalid_transition(api, oidc_issuer, provisioning_job):
    job, run_id = provisioning_job

    response = call(api, job.pk, "claim", {"attempt": 1}, oidc_issuer.mint(run_id=run_id))

    assert response.status_code == 409
    assert response.json()["code"] == "invalid_transition"


@pytest.mark.parametrize(
    ("verb", "body"),
    [
        ("heartbeat", {"step": "configure", "progress": 40}),
        ("complete", {"server_id": "1", "ipv4": "203.0.113.1"}),
        ("fail", {"error": "late", "failed_step": "configure"}),
        ("claim", {"attempt": 1}),
    ],
)
def test_a_late_call_from_an_earlier_attempts_run_is_409_and_changes_nothing(
    api, oidc_issuer, backend, verb, body
):
    job, old_run = claimed(backend)
    services.job_fail(job_id=job.pk, run=old_run, error="lost", failed_step=Step.WAIT_SSH)
    requeue_now(job)
    new_run = dispatch(job, backend)
    services.job_claim(job_id=job.pk, attempt=2, run=new_run)
    before = snapshot(job)

    response = call(api, job.pk, verb, body, oidc_issuer.mint(run_id=old_run.run_id))

    assert response.status_code == 409
    assert response.json()["code"] == "fenced_out"
    assert snapshot(job)[:3] == before[:3]


def test_a_late_call_from_an_earlier_run_attempt_of_the_same_run_is_409(
    api, oidc_issuer, provisioning_job
):
    job, run_id = provisioning_job  # claimed by run attempt 1
    before = snapshot(job)

    response = call(api, job.pk, "heartbeat", {}, oidc_issuer.mint(run_id=run_id, run_attempt=2))

    assert response.status_code == 409
    assert response.json()["code"] == "fenced_out"
    assert snapshot(job) == before


def test_a_repeated_complete_with_a_fresh_token_is_200_and_changes_nothing(
    api, oidc_issuer, provisioning_job
):
    job, run_id = provisioning_job
    body = {"server_id": "4711", "ipv4": "203.0.113.7"}
    assert call(api, job.pk, "complete", body, oidc_issuer.mint(run_id=run_id)).status_code == 200
    before = snapshot(job)

    again = call(
        api, job.pk, "complete", {**body, "ipv4": "198.51.100.1"}, oidc_issuer.mint(run_id=run_id)
    )

    assert again.status_code == 200
    assert again.json() == {"status": "running"}
    after = snapshot(job)
    assert after[:3] == before[:3]  # only the fresh token's jti was recorded


def test_a_repeated_fail_with_a_fresh_token_is_200_and_changes_nothing(
    api, oidc_issuer, provisioning_job
):
    job, run_id = provisioning_job
    body = {"error": "boom", "failed_step": "configure"}
    first = call(api, job.pk, "fail", body, oidc_issuer.mint(run_id=run_id))
    before = snapshot(job)

    again = call(api, job.pk, "fail", body, oidc_issuer.mint(run_id=run_id))

    assert again.status_code == 200
    assert again.json() == first.json()
    assert snapshot(job)[:3] == before[:3]


# --- 400: bodies ------------------------------------------------------------------------------

BAD_BODIES = [
    ("claim", {}, "attempt"),
    ("claim", {"attempt": "1"}, "attempt"),
    ("claim", {"attempt": True}, "attempt"),
    ("claim", {"attempt": 0}, "attempt"),
    ("claim", {"attempt": 1.5}, "attempt"),
    ("claim", [1], "non_field_errors"),
    ("heartbeat", {"progress": 101}, "progress"),
    ("heartbeat", {"progress": -1}, "progress"),
    ("heartbeat", {"progress": "50"}, "progress"),
    ("heartbeat", {"step": "unknown-step"}, "step"),
    ("heartbeat", {"step": "timeout"}, "step"),  # set by the server only
    ("heartbeat", {"step": 3}, "step"),
    ("complete", {"ipv4": "203.0.113.1"}, "server_id"),
    ("complete", {"server_id": 4711, "ipv4": "203.0.113.1"}, "server_id"),
    ("complete", {"server_id": "4711", "ipv4": "not-an-ip"}, "ipv4"),
    ("complete", {"server_id": "4711", "ipv4": "2001:db8::1"}, "ipv4"),
    ("complete", {"server_id": "x" * 65, "ipv4": "203.0.113.1"}, "server_id"),
    ("fail", {"error": "x" * 4001, "failed_step": "configure"}, "error"),
    ("fail", {"error": "x", "failed_step": "nope"}, "failed_step"),
    ("fail", {"error": ["x"], "failed_step": "configure"}, "error"),
    ("fail", {"failed_step": "configure"}, "error"),
]


@pytest.mark.parametrize(("verb", "body", "field"), BAD_BODIES)
def test_a_malformed_body_is_400_and_changes_nothing(
    api, oidc_issuer, provisioning_job, verb, body, field
):
    job, run_id = provisioning_job
    before = snapshot(job)

    response = call(api, job.pk, verb, body, oidc_issuer.mint(run_id=run_id))

    assert response.status_code == 400, response.json()
    payload = response.json()
    assert payload["code"] == "invalid"
    assert payload["detail"]
    assert field in payload["errors"]
    assert snapshot(job) == before  # not even the token was spent


def test_a_body_that_is_not_json_is_400_invalid(api, oidc_issuer, provisioning_job):
    job, run_id = provisioning_job
    before = snapshot(job)

    response = api.post(
        f"/api/v1/jobs/{job.pk}/heartbeat",
        data="{not json",
        content_type="application/json",
        **bearer(oidc_issuer.mint(run_id=run_id)),
    )

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert snapshot(job) == before


def test_the_longest_allowed_error_is_accepted(api, oidc_issuer, provisioning_job):
    job, run_id = provisioning_job
    error = "".join(chr(ord("a") + i % 26) for i in range(4000))

    response = call(
        api,
        job.pk,
        "fail",
        {"error": error, "failed_step": "configure"},
        oidc_issuer.mint(run_id=run_id),
    )

    assert response.status_code == 200
    job.refresh_from_db()
    # The job keeps all of it; the event keeps its first 3800 characters and the outcome.
    assert (job.status, job.failed_step, job.error) == ("queued", "configure", error)
    event = JobEvent.objects.get(job=job, action="fail")
    assert event.reason[:3800] == error[:3800]
    assert event.reason[3800:].startswith(" (retry 1 of ")
    assert len(event.reason) <= 4000


# --- the customer's read API -------------------------------------------------------------------


def test_the_customer_sees_their_agents_newest_first_with_the_latest_job(api, backend):
    user = UserFactory()
    older = AgentFactory(owner=user, name="older")
    newer = AgentFactory(owner=user, name="newer")
    claimed(backend, newer)
    enqueue(older)  # waits: the customer already has a job provisioning
    AgentFactory(name="someone-elses")
    api.force_login(user)

    response = api.get("/api/v1/agents/")

    assert response.status_code == 200
    body = response.json()
    assert [a["name"] for a in body] == ["newer", "older"]
    assert body[0]["job"]["status"] == "provisioning"
    assert body[0]["job"]["step"] == "claim"
    assert body[0]["message"] == "A build machine picked up your order."
    assert body[0]["ipv4"] is None
    assert body[1]["job"]["status"] == "queued"
    assert body[1]["job"]["queue_position"] == 1
    assert body[1]["message"] == (
        "Your order is in the queue: agents are built in the order they were paid for."
    )
    assert body[1]["job"]["estimated_ready_at"] is not None
    assert body[0]["job"]["estimated_ready_at"] is None


def test_a_running_agent_shows_its_address_and_a_failed_one_a_safe_message(api, backend):
    user = UserFactory()
    ok_job, ok_run = claimed(backend, AgentFactory(owner=user, name="ok"))
    services.job_complete(job_id=ok_job.pk, run=ok_run, server_id="1", ipv4="203.0.113.9")
    bad_job, bad_run = claimed(backend, AgentFactory(owner=user, name="bad"), max_retries=0)
    secret = "Traceback: HCLOUD_TOKEN=abc123 at /home/runner/secret"
    services.job_fail(job_id=bad_job.pk, run=bad_run, error=secret, failed_step=Step.CONFIGURE)
    api.force_login(user)

    body = {a["name"]: a for a in api.get("/api/v1/agents/").json()}

    assert body["ok"]["ipv4"] == "203.0.113.9"
    # The dashboard's words: the API and the pages share one presenter.
    assert body["ok"]["message"] == "Your agent is up and running."
    assert body["bad"]["job"]["status"] == "failed"
    assert body["bad"]["message"] == "Installing the agent software on your server failed."
    assert "abc123" not in str(body)


def test_an_ended_agent_says_so(api, backend):
    user = UserFactory()
    agent = AgentFactory(owner=user, ended_at=timezone.now())
    api.force_login(user)

    body = api.get(f"/api/v1/agents/{agent.pk}/").json()

    assert (body["ended"], body["message"], body["job"]) == (True, "This agent has ended.", None)


def test_reading_an_agent_times_out_its_silent_job(api, backend, settings):
    user = UserFactory()
    job, _ = claimed(backend, AgentFactory(owner=user))
    silent = timezone.now() - timedelta(seconds=settings.JOB_TIMEOUT_SECONDS + 60)
    ProvisioningJob.objects.filter(pk=job.pk).update(last_heartbeat_at=silent)
    api.force_login(user)

    body = api.get(f"/api/v1/agents/{job.agent_id}/").json()

    assert body["job"]["status"] == "queued"
    assert body["job"]["retry_count"] == 1
    assert body["job"]["attempt"] == 2
    assert body["message"] == (
        "The build stopped reporting progress and was stopped, "
        "so we are trying again automatically."
    )
    assert JobEvent.objects.filter(job=job, action=JobEvent.Action.TIMEOUT).count() == 1


def test_another_customers_agent_is_404(api):
    theirs = AgentFactory()
    enqueue(theirs)
    api.force_login(UserFactory())

    response = api.get(f"/api/v1/agents/{theirs.pk}/")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_the_agent_api_refuses_anonymous_callers(api):
    agent = AgentFactory()

    listing = api.get("/api/v1/agents/")
    detail = api.get(f"/api/v1/agents/{agent.pk}/")

    assert listing.status_code == 403
    assert detail.status_code == 403
    assert listing.json()["code"] == "not_authenticated"


def test_a_workflow_token_does_not_open_the_customer_api(api, oidc_issuer):
    response = api.get("/api/v1/agents/", **bearer(oidc_issuer.mint(run_id="1")))

    assert response.status_code == 403


# --- the schema ---------------------------------------------------------------------------------


def test_the_openapi_schema_generates_without_warnings_and_validates(tmp_path):
    target = tmp_path / "schema.yaml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))

    text = target.read_text()
    for path in ("/api/v1/jobs/{job_id}/claim", "/api/v1/agents/{agent_id}/", "workflowRunToken"):
        assert path in text


def test_the_schema_and_docs_are_served(api):
    # The contract is public: no login needed for the schema or its docs page.
    assert api.get("/api/schema/").status_code == 200
    assert api.get("/api/docs/").status_code == 200
    api.force_login(UserFactory())
    assert api.get("/api/schema/").status_code == 200


def test_the_api_says_what_the_dashboard_says(api, backend):
    """One presenter: every agent's `message` is the sentence its status block shows."""
    user = UserFactory()
    running_job, running_run = claimed(backend, AgentFactory(owner=user, name="running"))
    services.job_complete(job_id=running_job.pk, run=running_run, server_id="1", ipv4="203.0.113.9")
    failed_job, failed_run = claimed(backend, AgentFactory(owner=user, name="failed"))
    ProvisioningJob.objects.filter(pk=failed_job.pk).update(max_retries=0)
    services.job_fail(job_id=failed_job.pk, run=failed_run, error="x", failed_step=Step.WAIT_SSH)
    claimed(backend, AgentFactory(owner=user, name="provisioning"))
    enqueue(AgentFactory(owner=user, name="queued"))  # waits: the customer has one provisioning
    AgentFactory(owner=user, name="no job yet")
    AgentFactory(owner=user, name="ended", ended_at=timezone.now(), end_reason="Refunded.")
    api.force_login(user)

    agents = api.get("/api/v1/agents/").json()

    assert len(agents) == 6
    for agent in agents:
        block = api.get(f"/agents/{agent['id']}/status/").content.decode()
        assert f'<p class="status__sentence">{escape(agent["message"])}</p>' in block, agent


# --- the run's Hetzner call count (limits.py) ------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, "12", 1.5, True, None])
def test_a_bad_hetzner_call_count_is_400_and_changes_nothing(
    api, oidc_issuer, provisioning_job, bad
):
    job, run_id = provisioning_job
    before = snapshot(job)

    body = {"server_id": "1", "ipv4": "203.0.113.9", "hetzner_calls": bad}
    response = call(api, job.pk, "complete", body, oidc_issuer.mint(run_id=run_id))

    assert response.status_code == 400, response.json()
    assert "hetzner_calls" in str(response.json())
    assert snapshot(job) == before


@pytest.mark.parametrize("verb", ["complete", "fail"])
def test_the_runs_hetzner_call_count_is_stored(api, oidc_issuer, provisioning_job, verb):
    job, run_id = provisioning_job
    body: dict[str, Any] = (
        {"server_id": "1", "ipv4": "203.0.113.9"}
        if verb == "complete"
        else {"error": "boom", "failed_step": "configure"}
    )

    response = call(
        api, job.pk, verb, {**body, "hetzner_calls": 9}, oidc_issuer.mint(run_id=run_id)
    )

    assert response.status_code == 200, response.json()
    job.refresh_from_db()
    assert job.hetzner_calls == 9
