"""The reaper's verdicts over HTTP: POST /api/v1/reaper/verdicts with a scheduled run's token.

State is built through the real services; tokens come from the test OIDC issuer.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from provisioning import reaper, services
from provisioning.models import JobEvent, ProvisioningJob, UsedTokenId
from tests.factories import AgentFactory
from tests.fakes.hetzner import FakeHetzner
from tests.fakes.oidc import bearer
from tests.fakes.runner_backend import RecordingBackend
from tests.provisioning.helpers import claimed

pytestmark = pytest.mark.django_db

URL = "/api/v1/reaper/verdicts"
REAPER_RUN = "9000000001"


@pytest.fixture
def api() -> APIClient:
    return APIClient()


@pytest.fixture
def token(oidc_issuer):
    """A fresh token of a scheduled run of our workflow."""
    return lambda **claims: oidc_issuer.mint(
        run_id=REAPER_RUN, **{"event_name": "schedule", **claims}
    )


def ago(**delta: float) -> str:
    return (timezone.now() - timedelta(**delta)).isoformat()


OLD = {"hours": 2}
YOUNG = {"seconds": 60}


def _label(thing: Any) -> str:
    """A job or agent (its id), a bare id, or None (no label)."""
    if thing is None:
        return ""
    return str(getattr(thing, "pk", thing))


def vm(server_id: Any, *, job=None, agent=None, age=None, name: str = "") -> dict[str, Any]:
    """One server as the workflow describes it: labels and creation time."""
    return {
        "server_id": str(server_id),
        "name": name or f"agent-{server_id}",
        "job_id": _label(job),
        "agent_id": _label(agent),
        "created": ago(**(age or OLD)),
    }


def ask(api: APIClient, token: str | None, servers: list[dict[str, Any]]) -> Any:
    headers = bearer(token) if token else {}
    return api.post(URL, {"servers": servers}, format="json", **headers)


def verdicts(response: Any) -> dict[str, tuple[str, str]]:
    assert response.status_code == 200, response.content
    body = response.json()
    by_id = {v["server_id"]: (v["verdict"], v["reason"]) for v in body["verdicts"]}
    assert set(body["delete"]) == {k for k, (v, _) in by_id.items() if v == "delete"}
    assert {k["server_id"] for k in body["keep"]} == {
        k for k, (v, _) in by_id.items() if v == "keep"
    }
    assert all(reason for _, reason in by_id.values())
    return by_id


def running(backend, server_id: str = "4242") -> ProvisioningJob:
    job, run = claimed(backend)
    return services.job_complete(job_id=job.pk, run=run, server_id=server_id, ipv4="203.0.113.9")


# --- verdicts ---------------------------------------------------------------------------------


def test_an_unknown_vm_past_the_grace_period_is_deleted(api, token):
    answer = verdicts(ask(api, token(), [vm(101, job=uuid.uuid4(), agent=uuid.uuid4())]))

    assert answer["101"][0] == "delete"
    assert "no job or agent" in answer["101"][1]


def test_an_unknown_vm_inside_the_grace_period_is_kept(api, token, settings):
    settings.REAPER_GRACE_SECONDS = 600

    answer = verdicts(
        ask(
            api,
            token(),
            [vm(102, age=YOUNG), vm(103, age={"seconds": 700}), vm(104) | {"created": None}],
        )
    )

    assert answer["102"][0] == "keep" and "grace period" in answer["102"][1]
    assert answer["103"][0] == "delete"
    assert answer["104"][0] == "keep" and "creation time is unknown" in answer["104"][1]


def test_vms_with_garbage_labels_count_as_unknown(api, token):
    servers = [vm(105) | {"job_id": "job-1,managed-by", "agent_id": "not a uuid"}]

    answer = verdicts(ask(api, token(), servers))

    assert answer["105"][0] == "delete"


def test_a_running_agents_vm_is_always_kept_and_its_duplicates_go(api, token, backend):
    job = running(backend, server_id="201")

    answer = verdicts(
        ask(
            api,
            token(),
            [
                vm(201, job=job, agent=job.agent, age={"days": 400}),
                vm(201, job=None, agent=None),  # sent twice: judged once, as first described
                vm(202, job=job, agent=job.agent),  # a twin the run lost track of
                vm(203, job=job, agent=job.agent, age=YOUNG),
            ],
        )
    )

    assert answer["201"] == ("keep", f"current VM of agent {job.agent_id}")
    assert answer["202"][0] == "delete" and "orphan duplicate" in answer["202"][1]
    assert answer["203"][0] == "keep"


def test_a_running_agents_vm_is_kept_even_without_labels_the_database_knows(api, token, backend):
    job = running(backend, server_id="204")

    answer = verdicts(ask(api, token(), [vm(204, agent=job.agent)]))

    assert answer["204"][0] == "keep"


@pytest.mark.parametrize(
    "labels",
    [
        {},  # no labels the database knows
        {"job": "failed"},  # labelled with another, failed job: rule 7 would delete it
        {"agent": "ended"},  # labelled with an ended agent: rule 6 would delete it
    ],
    ids=["unlabelled", "labelled-failed-job", "labelled-ended-agent"],
)
def test_a_running_agents_current_vm_is_kept_whatever_its_labels_say(api, token, backend, labels):
    job = running(backend, server_id="205")
    other, _run = claimed(backend)
    services.job_cancel(job_id=other.pk, actor="operator:test")
    ended = AgentFactory(ended_at=timezone.now())
    server = vm(
        205,
        job=other if labels.get("job") else None,
        agent=ended if labels.get("agent") else None,
        age={"days": 30},
    )

    answer = verdicts(ask(api, token(), [server]))

    assert answer["205"] == ("keep", f"current VM of agent {job.agent_id}")


def test_a_failed_provisions_vm_is_deleted_with_a_note_on_the_job(api, token, backend):
    job, _run = claimed(backend)
    services.job_cancel(job_id=job.pk, actor="operator:ann", reason="stuck")

    answer = verdicts(ask(api, token(), [vm(301, job=job, agent=job.agent, name="agent-x")]))

    assert answer["301"][0] == "delete"
    assert "failed provision" in answer["301"][1]
    [note] = JobEvent.objects.filter(job=job, action=JobEvent.Action.NOTE)
    assert note.actor == f"workflow:{REAPER_RUN}"
    assert note.reason.startswith("reaper deleting VM '301' (name reported by the run: 'agent-x')")


def test_an_ended_agents_vms_are_deleted_even_its_recorded_one(api, token, backend):
    job = running(backend, server_id="401")
    services.agent_end(agent_id=job.agent_id, actor="stripe", reason="subscription deleted")

    answer = verdicts(
        ask(api, token(), [vm(401, job=job, agent=job.agent), vm(402, agent=job.agent)])
    )

    assert answer["401"][0] == "delete"
    assert "ended" in answer["401"][1]
    assert answer["402"][0] == "delete"
    assert JobEvent.objects.filter(action=JobEvent.Action.NOTE).count() == 2


def test_a_queued_or_provisioning_jobs_vm_is_kept_however_old(api, token, backend):
    building, _run = claimed(backend)
    waiting = services.job_enqueue(agent=AgentFactory())

    answer = verdicts(
        ask(
            api,
            token(),
            [
                vm(501, job=building, agent=building.agent, age={"days": 3}),
                vm(502, job=waiting, agent=waiting.agent, age={"days": 3}),
                vm(503, agent=building.agent, age={"days": 3}),  # no job label: its agent builds
            ],
        )
    )

    assert answer["501"] == ("keep", f"its job {building.pk} is provisioning")
    assert answer["502"] == ("keep", f"its job {waiting.pk} is queued")
    assert answer["503"][0] == "keep"
    assert not JobEvent.objects.filter(action=JobEvent.Action.NOTE).exists()


def test_labels_that_disagree_with_the_database_are_left_for_an_operator(api, token, backend):
    job = running(backend, server_id="601")
    other = AgentFactory()

    answer = verdicts(ask(api, token(), [vm(602, job=job, agent=other)]))

    assert answer["602"][0] == "keep" and "disagree" in answer["602"][1]


def test_keeps_write_nothing(api, token, backend):
    job = running(backend, server_id="701")
    before = JobEvent.objects.count()

    verdicts(ask(api, token(), [vm(701, job=job, agent=job.agent)]))

    assert JobEvent.objects.count() == before


# --- who may ask ------------------------------------------------------------------------------


def test_a_scheduled_run_may_ask_and_no_token_is_spent(api, token):
    same = token()

    assert ask(api, same, []).status_code == 200
    assert ask(api, same, []).status_code == 200  # read-only: no single-use jti
    assert UsedTokenId.objects.count() == 0


def test_a_dispatched_run_may_not_ask_nor_write_into_any_history(api, token):
    job, _run = claimed(RecordingBackend())
    services.job_cancel(job_id=job.pk, actor="operator:test")
    before = JobEvent.objects.count()

    refused = ask(api, token(event_name="workflow_dispatch"), [vm(702, job=job, agent=job.agent)])

    assert refused.status_code == 401
    assert JobEvent.objects.count() == before


@pytest.mark.parametrize(
    "claims",
    [
        {"workflow_ref": "example/agent-provisioning/.github/workflows/other.yml@refs/heads/main"},
        {"event_name": "push"},
        {
            "ref": "refs/heads/feature",
            "workflow_ref": "example/agent-provisioning/.github/workflows/provision.yml"
            "@refs/heads/feature",
        },
        {"repository_id": "1"},
    ],
)
def test_other_tokens_are_refused_with_401(api, token, claims):
    response = ask(api, token(**claims), [vm(801)])

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json()["code"] in ("invalid_token", "authentication_failed")
    assert not JobEvent.objects.exists()


def test_the_reaper_is_judged_by_github_reaper_ref_not_github_ref(api, token, settings):
    """Scheduled runs always run on the default branch, while dispatches may use another."""
    settings.GITHUB_REF, settings.GITHUB_REAPER_REF = "release", "main"
    on_main = {
        "ref": "refs/heads/main",
        "workflow_ref": f"{settings.GITHUB_REPOSITORY}/.github/workflows/provision.yml"
        "@refs/heads/main",
    }
    on_release = {
        "ref": "refs/heads/release",
        "workflow_ref": f"{settings.GITHUB_REPOSITORY}/.github/workflows/provision.yml"
        "@refs/heads/release",
    }

    assert ask(api, token(**on_main), []).status_code == 200
    assert ask(api, token(**on_release), []).status_code == 401


def test_no_token_is_401(api, oidc_issuer):
    response = ask(api, None, [])

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"servers": "all"},
        {"servers": [{"server_id": 5}]},
        {"servers": [{"server_id": "5; rm -rf"}]},
        {"servers": [{"server_id": "5", "created": "yesterday"}]},
    ],
)
def test_a_bad_body_is_400(api, token, body):
    response = api.post(URL, body, format="json", **bearer(token()))

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"


# --- the whole loop: the runner's reap command against this server and the fake cloud ----------


@pytest.fixture
def cloud():
    with FakeHetzner() as fake:
        yield fake


@pytest.mark.django_db(transaction=True)
def test_the_runner_reaps_an_orphan_and_an_ended_agents_vm_and_leaves_a_running_agents(
    live_server,
    oidc_issuer,
    cloud,
    backend,
    capsys,
):
    from provisioning.runner.config import Settings as RunnerSettings
    from provisioning.runner.reap import run_reap

    long_ago = timezone.now() - timedelta(hours=3)

    def labels(job: Any, agent: Any) -> dict[str, str]:
        return {
            "managed-by": "agent-provisioning",
            "job-id": _label(job),
            "agent-id": _label(agent),
            "attempt": "1",
        }

    def add(name: str, job: Any, agent: Any, created=long_ago) -> str:
        server = cloud.add_server(name=name, labels=labels(job, agent), created=created)
        return str(server["id"])

    # A running agent, its VM recorded on it.
    job, run = claimed(backend)
    live = add(f"agent-{job.pk}", job, job.agent)
    services.job_complete(job_id=job.pk, run=run, server_id=live, ipv4="203.0.113.9")
    # An ended agent (its deprovision lost, say).
    ended_job, ended_run = claimed(backend)
    gone = add(f"agent-{ended_job.pk}", ended_job, ended_job.agent)
    services.job_complete(job_id=ended_job.pk, run=ended_run, server_id=gone, ipv4="203.0.113.8")
    services.agent_end(agent_id=ended_job.agent_id, actor="stripe", reason="refund")
    # VMs no job knows: one old, one just created.
    orphan = add("agent-orphan", uuid.uuid4(), uuid.uuid4())
    fresh = add("agent-fresh", uuid.uuid4(), uuid.uuid4(), created=timezone.now())

    oidc_issuer.claim_overrides = {"event_name": "schedule"}
    settings = RunnerSettings.from_env(
        {
            "PROVISIONING_API_URL": live_server.url,
            "PROVISIONING_OIDC_AUDIENCE": oidc_issuer.audience,
            "ACTIONS_ID_TOKEN_REQUEST_URL": oidc_issuer.token_request_url(run_id=REAPER_RUN),
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": oidc_issuer.request_token,
            "HCLOUD_TOKEN": "hcloud-test-token",
            "HCLOUD_API_ENDPOINT": cloud.url,
            "RUNNER_HCLOUD_POLL_SECONDS": "0.05",
        }
    )

    code = run_reap(settings)

    assert code == 0, capsys.readouterr().err
    assert sorted(str(s["id"]) for s in cloud.deleted_servers) == sorted([gone, orphan])
    assert sorted(str(s["id"]) for s in cloud.servers) == sorted([live, fresh])
    notes = JobEvent.objects.filter(action=JobEvent.Action.NOTE)
    assert [(n.job_id, n.actor) for n in notes] == [(ended_job.pk, f"workflow:{REAPER_RUN}")]


def test_the_rules_are_applied_in_the_documented_order():
    """RULES[i] is rule i+1 of the module docstring (each rule's docstring starts with its number)."""
    numbers = [rule.__doc__.split(".")[0] for rule in reaper.RULES]

    assert numbers == [str(n) for n in range(1, 9)]
    for n in range(1, 9):
        assert f"  {n}. " in reaper.__doc__
