"""The runner end to end: the real CLI against loopback fakes of our API, GitHub OIDC and Hetzner."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.runner.conftest import AUDIENCE, REPO_ROOT, REQUEST_TOKEN, run_runner


def provision(env, job_id, attempt=1, **extra_env):
    return run_runner(
        {**env, **extra_env},
        "run",
        "--mode",
        "provision",
        "--job-id",
        job_id,
        "--attempt",
        str(attempt),
    )


def job_labels(job_id, attempt, agent_id=None):
    labels = {"managed-by": "agent-provisioning", "job-id": job_id, "attempt": str(attempt)}
    if agent_id:
        labels["agent-id"] = agent_id
    return labels


def test_happy_path_claims_beats_creates_in_ash_and_completes(
    runner_env, callback_api, fake_hetzner, job_id
):
    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    verbs = callback_api.verbs()
    assert verbs[0] == "claim"
    assert verbs[-1] == "complete"
    assert "fail" not in verbs
    assert callback_api.of("claim")[0].body == {"attempt": 1}
    steps = [c.body.get("step") for c in callback_api.of("heartbeat")]
    assert {"create-server", "wait-ssh", "configure", "health-check"} <= set(steps)
    assert len(steps) > 4, "the background loop beats between step changes too"
    assert all(0 <= c.body["progress"] <= 100 for c in callback_api.of("heartbeat"))
    [server] = fake_hetzner.servers
    assert server["name"] == f"agent-{job_id}"
    assert server["labels"] == job_labels(job_id, 1, callback_api.agent_id)
    assert server["location"]["name"] == "ash"
    assert server["server_type"]["name"] == "cpx22"  # us-east's default
    assert server["image"]["name"] == "ubuntu-24.04"
    assert server["x_fake_ssh_keys"] == ["provisioning-test"]
    assert callback_api.of("complete")[0].body == {
        "server_id": str(server["id"]),
        "ipv4": server["public_net"]["ipv4"]["ip"],
        "server_name": f"agent-{job_id}",
        # Every request the fake saw, counted exactly: look up the type, create, nothing more
        # (its actions finish at once, and the create answered with the address).
        "hetzner_calls": 2,
    }
    assert len(fake_hetzner.requests) == 2
    assert result.summary["completed"] is True
    assert result.summary["hetzner_calls"] == 2
    assert "2 Hetzner API request(s) this attempt" in result.stderr


def test_every_request_carries_a_fresh_token_for_our_audience(runner_env, callback_api, job_id):
    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    tokens = [c.token for c in callback_api.calls]
    assert len(tokens) == len(set(tokens))
    assert callback_api.reused_tokens == []
    for request in callback_api.token_requests:
        assert request["authorization"] == f"bearer {REQUEST_TOKEN}"
        assert request["query"] == {"api-version": ["2.0"], "audience": [AUDIENCE]}


def test_region_comes_from_the_claim_and_an_unavailable_location_falls_through(
    runner_env, callback_api, fake_hetzner, job_id
):
    callback_api.region = "eu-central"
    fake_hetzner.make_unavailable("fsn1")

    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    assert [s["location"]["name"] for s in fake_hetzner.servers] == ["nbg1"]


def test_a_retried_attempt_adopts_the_vm_an_earlier_attempt_made(
    runner_env, callback_api, fake_hetzner, job_id
):
    earlier = fake_hetzner.add_server(name=f"agent-{job_id}", labels=job_labels(job_id, 1))

    result = provision(runner_env, job_id, attempt=2)

    assert result.returncode == 0, result.stderr
    assert [s["id"] for s in fake_hetzner.servers] == [earlier["id"]]
    assert callback_api.of("complete")[0].body["server_id"] == str(earlier["id"])
    assert not [r for r in fake_hetzner.requests if r["method"] == "POST"]


def test_a_name_taken_without_our_labels_found_is_adopted_on_uniqueness_error(
    runner_env, callback_api, fake_hetzner, job_id
):
    # Hetzner's label index can lag a fresh create: the list is empty, the name is taken.
    earlier = fake_hetzner.add_server(name=f"agent-{job_id}", labels=job_labels(job_id, 1))
    original = fake_hetzner._list_servers
    calls = {"n": 0}

    def lagging(query):
        calls["n"] += 1
        if calls["n"] == 1:
            return fake_hetzner._page("servers", [], query)
        return original(query)

    fake_hetzner._list_servers = lagging

    result = provision(runner_env, job_id, attempt=2)

    assert result.returncode == 0, result.stderr
    assert [s["id"] for s in fake_hetzner.servers] == [earlier["id"]]
    assert callback_api.of("complete")[0].body["server_id"] == str(earlier["id"])


def test_failure_at_configure_reports_the_step_and_tail_and_deletes_its_own_vm(
    runner_env, callback_api, fake_hetzner, job_id
):
    result = provision(runner_env, job_id, RUNNER_FAIL_STEP="configure")

    assert result.returncode == 1
    [fail] = callback_api.of("fail")
    assert fail.body["failed_step"] == "configure"
    assert "FAILED!" in fail.body["error"]
    assert "TASK [Create the agent user]" in fail.body["error"]
    assert len(fail.body["error"]) <= 3000
    assert "complete" not in callback_api.verbs()
    assert fake_hetzner.servers == []
    assert [s["name"] for s in fake_hetzner.deleted_servers] == [f"agent-{job_id}"]


def test_failure_after_adopting_keeps_the_adopted_vm(
    runner_env, callback_api, fake_hetzner, job_id
):
    earlier = fake_hetzner.add_server(name=f"agent-{job_id}", labels=job_labels(job_id, 1))

    result = provision(runner_env, job_id, attempt=2, RUNNER_FAIL_STEP="health-check")

    assert result.returncode == 1
    assert callback_api.of("fail")[0].body["failed_step"] == "health-check"
    assert [s["id"] for s in fake_hetzner.servers] == [earlier["id"]]
    assert fake_hetzner.deleted_servers == []


def test_a_refused_claim_stops_without_creating_or_deleting_anything(
    runner_env, callback_api, fake_hetzner, job_id
):
    fake_hetzner.add_server(name=f"agent-{job_id}", labels=job_labels(job_id, 1))
    callback_api.script["claim"] = [(409, {"detail": "job is not queued", "code": "not_queued"})]

    result = provision(runner_env, job_id)

    assert result.returncode == 3
    assert callback_api.verbs() == ["claim"]
    assert fake_hetzner.requests == []
    assert len(fake_hetzner.servers) == 1


def test_a_refused_heartbeat_stops_the_run_and_deletes_only_its_own_vm(
    runner_env, callback_api, fake_hetzner, job_id
):
    callback_api.refuse_heartbeats_after = 1  # create-server's beat passes, later ones do not

    result = provision(runner_env, job_id)

    assert result.returncode == 4
    verbs = callback_api.verbs()
    assert "complete" not in verbs
    assert "fail" not in verbs
    assert fake_hetzner.servers == []
    assert len(fake_hetzner.deleted_servers) == 1


def test_a_lost_complete_answer_is_retried_with_a_fresh_token_and_the_vm_kept(
    runner_env, callback_api, fake_hetzner, job_id
):
    callback_api.script["complete"] = [(502, {"detail": "bad gateway", "code": "bad_gateway"})]

    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    first, second = callback_api.of("complete")
    assert first.token != second.token
    assert first.body == second.body
    assert len(fake_hetzner.servers) == 1
    assert fake_hetzner.deleted_servers == []


def test_a_refused_complete_never_deletes_the_vm(runner_env, callback_api, fake_hetzner, job_id):
    callback_api.script["complete"] = [(409, {"detail": "fenced out", "code": "fenced_out"})]

    result = provision(runner_env, job_id)

    assert result.returncode == 4
    assert len(fake_hetzner.servers) == 1


def test_cleanup_deletes_every_vm_of_the_job_and_nothing_else(
    runner_env, callback_api, fake_hetzner, job_id
):
    fake_hetzner.add_server(name=f"agent-{job_id}", labels=job_labels(job_id, 1))
    fake_hetzner.add_server(name="stray-twin", labels=job_labels(job_id, 2))
    other = fake_hetzner.add_server(
        name="agent-other", labels=job_labels("11111111-2222-3333-4444-555555555555", 1)
    )
    unmanaged = fake_hetzner.add_server(name="database", labels={"job-id": job_id})

    result = run_runner(
        runner_env, "run", "--mode", "cleanup", "--job-id", job_id, "--attempt", "1"
    )

    assert result.returncode == 0, result.stderr
    assert sorted(s["id"] for s in fake_hetzner.servers) == sorted([other["id"], unmanaged["id"]])
    assert len(fake_hetzner.deleted_servers) == 2
    assert callback_api.verbs() == ["cleanup-authorization"]  # asked first, with its own token


@pytest.mark.parametrize(
    "refusal",
    [
        (403, {"detail": "Run 1 was never dispatched for job x.", "code": "wrong_run"}),
        (
            409,
            {
                "detail": "Job x may not be cleaned up: it is running.",
                "code": "cleanup_not_allowed",
            },
        ),
    ],
    ids=["not-its-cleanup-run", "job-not-failed"],
)
def test_a_cleanup_the_service_refuses_deletes_nothing(
    runner_env, callback_api, fake_hetzner, job_id, refusal
):
    fake_hetzner.add_server(name=f"agent-{job_id}", labels=job_labels(job_id, 1))
    callback_api.script["cleanup-authorization"] = [refusal]

    result = run_runner(
        runner_env, "run", "--mode", "cleanup", "--job-id", job_id, "--attempt", "1"
    )

    assert result.returncode == 3, result.stderr  # refused
    assert len(fake_hetzner.servers) == 1
    assert fake_hetzner.deleted_servers == []
    assert "deleting nothing" in result.stderr


@pytest.mark.parametrize(
    ("mode", "kind"), [("provision", "deprovision"), ("deprovision", "provision")]
)
def test_a_run_whose_mode_is_not_the_jobs_kind_stops_at_claim(
    runner_env, callback_api, fake_hetzner, job_id, mode, kind
):
    fake_hetzner.add_server(
        name="agent-keep",
        labels={"managed-by": "agent-provisioning", "agent-id": callback_api.agent_id},
    )
    callback_api.kind = kind

    result = run_runner(runner_env, "run", "--mode", mode, "--job-id", job_id, "--attempt", "1")

    assert result.returncode == 3, result.stderr  # refused
    assert callback_api.verbs() == ["claim"]
    assert len(fake_hetzner.servers) == 1 and fake_hetzner.deleted_servers == []


def deprovision(env, job_id, attempt=1, **extra_env):
    return run_runner(
        {**env, **extra_env},
        "run",
        "--mode",
        "deprovision",
        "--job-id",
        job_id,
        "--attempt",
        str(attempt),
    )


def test_deprovision_deletes_every_vm_of_the_agent_and_completes_with_empty_ids(
    runner_env, callback_api, fake_hetzner, job_id
):
    agent = callback_api.agent_id
    first_job, second_job = str(uuid.uuid4()), str(uuid.uuid4())
    # The agent's VMs: two attempts of its first job (a twin the runner lost) and a later job's.
    ours = [
        fake_hetzner.add_server(name=f"agent-{first_job}", labels=job_labels(first_job, 1, agent)),
        fake_hetzner.add_server(name="twin", labels=job_labels(first_job, 2, agent)),
        fake_hetzner.add_server(
            name=f"agent-{second_job}", labels=job_labels(second_job, 1, agent)
        ),
    ]
    other_agent = fake_hetzner.add_server(
        name="agent-other", labels=job_labels(str(uuid.uuid4()), 1, str(uuid.uuid4()))
    )
    unmanaged = fake_hetzner.add_server(name="database", labels={"agent-id": agent})

    result = deprovision(runner_env, job_id, attempt=2)

    assert result.returncode == 0, result.stderr
    verbs = callback_api.verbs()
    assert verbs[0] == "claim" and verbs[-1] == "complete"
    assert "fail" not in verbs
    assert callback_api.of("claim")[0].body == {"attempt": 2}
    # One listing and one delete per VM (their delete actions finish at once).
    assert callback_api.of("complete")[0].body == {"server_id": "", "ipv4": "", "hetzner_calls": 4}
    assert len(fake_hetzner.requests) == 4
    assert sorted(s["id"] for s in fake_hetzner.deleted_servers) == sorted(s["id"] for s in ours)
    assert sorted(s["id"] for s in fake_hetzner.servers) == sorted(
        [other_agent["id"], unmanaged["id"]]
    )
    # Deletion is reported as step claim with rising progress; complete only at the end.
    beats = [(c.body.get("step"), c.body.get("progress")) for c in callback_api.of("heartbeat")]
    assert {step for step, _ in beats} == {"claim"}
    progress = [p for _, p in beats if p is not None]
    assert progress[0] == 10 and max(progress) == 90
    assert not [r for r in fake_hetzner.requests if r["method"] == "POST"]


def test_deprovision_with_nothing_to_delete_still_completes(
    runner_env, callback_api, fake_hetzner, job_id
):
    result = deprovision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    assert callback_api.of("complete")[0].body == {"server_id": "", "ipv4": "", "hetzner_calls": 1}
    assert fake_hetzner.deleted_servers == []


def test_deprovision_reports_a_vm_it_cannot_delete_as_a_failure(
    runner_env, callback_api, fake_hetzner, job_id
):
    agent = callback_api.agent_id
    fake_hetzner.add_server(name="agent-x", labels=job_labels(str(uuid.uuid4()), 1, agent))
    fake_hetzner.fail_next(
        "DELETE", "/v1/servers/", status=503, code="unavailable", message="unavailable"
    )

    result = deprovision(runner_env, job_id)

    assert result.returncode == 1
    assert "complete" not in callback_api.verbs()
    [fail] = callback_api.of("fail")
    assert fail.body["failed_step"] == "claim"
    assert "unavailable" in fail.body["error"]
    assert len(fake_hetzner.servers) == 1


def test_a_refused_deprovision_claim_deletes_nothing(
    runner_env, callback_api, fake_hetzner, job_id
):
    fake_hetzner.add_server(
        name="agent-x", labels=job_labels(str(uuid.uuid4()), 1, callback_api.agent_id)
    )
    callback_api.script["claim"] = [(409, {"detail": "not queued", "code": "invalid_transition"})]

    result = deprovision(runner_env, job_id)

    assert result.returncode == 3
    assert fake_hetzner.requests == []


def test_a_fenced_deprovision_stops_before_deleting(runner_env, callback_api, fake_hetzner, job_id):
    agent = callback_api.agent_id
    fake_hetzner.add_server(name="agent-x", labels=job_labels(str(uuid.uuid4()), 1, agent))
    callback_api.refuse_heartbeats_after = 0

    result = deprovision(runner_env, job_id)

    assert result.returncode == 4
    assert "complete" not in callback_api.verbs()
    assert len(fake_hetzner.servers) == 1


def test_the_kill_knob_exits_137_leaving_the_vm_and_saying_nothing(
    runner_env, callback_api, fake_hetzner, job_id
):
    result = provision(runner_env, job_id, RUNNER_KILL_AT_STEP="configure")

    assert result.returncode == 137
    assert len(fake_hetzner.servers) == 1
    assert "fail" not in callback_api.verbs()
    assert "complete" not in callback_api.verbs()


def test_sigterm_reports_the_step_and_deletes_its_own_vm(
    runner_env, callback_api, fake_hetzner, job_id
):
    env = {**runner_env, "RUNNER_STEP_SECONDS": "30"}
    process = subprocess.Popen(
        [sys.executable, "-m", "provisioning.runner", "run", "--job-id", job_id, "--attempt", "1"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while "wait-ssh" not in [c.body.get("step") for c in callback_api.of("heartbeat")]:
        assert time.monotonic() < deadline, "runner never reached wait-ssh"
        time.sleep(0.05)

    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=20)

    assert process.returncode == 1
    [fail] = callback_api.of("fail")
    assert fail.body["failed_step"] == "wait-ssh"
    assert "SIGTERM" in fail.body["error"]
    assert fake_hetzner.servers == []


def test_missing_configuration_is_a_clear_error(runner_env, job_id):
    env = {k: v for k, v in runner_env.items() if k != "PROVISIONING_API_URL"}

    result = run_runner(env, "run", "--job-id", job_id, "--attempt", "1")

    assert result.returncode == 2
    assert "PROVISIONING_API_URL" in result.stderr


def test_a_job_id_must_be_a_uuid(runner_env):
    result = run_runner(runner_env, "run", "--job-id", "job-1,managed-by", "--attempt", "1")

    assert result.returncode == 2
    assert "not a UUID" in result.stderr


def test_state_file_is_private_to_a_run_by_default(runner_env, job_id, tmp_path):
    assert "RUNNER_STATE_FILE" not in runner_env
    provision(runner_env, job_id)

    assert not (tmp_path / "provision-state.json").exists()


def test_a_vm_that_cannot_be_deleted_is_left_for_cleanup_and_the_failure_still_reported(
    runner_env, callback_api, fake_hetzner, job_id
):
    fake_hetzner.fail_next("DELETE", "/v1/servers/", status=503, code="unavailable")

    result = provision(runner_env, job_id, RUNNER_FAIL_STEP="wait-ssh")

    assert result.returncode == 1
    assert callback_api.of("fail")[0].body["failed_step"] == "wait-ssh"
    assert len(fake_hetzner.servers) == 1
    assert "could not delete server" in result.stderr


# -- server types per region, and what Hetzner answers when it cannot build ---------------------


def posted_locations(fake_hetzner):
    return [
        r["body"]["location"]
        for r in fake_hetzner.requests
        if r["method"] == "POST" and r["path"] == "/v1/servers"
    ]


@pytest.mark.parametrize(
    ("region", "server_type", "location"),
    [("eu-central", "cx23", "fsn1"), ("ap-southeast", "cpx22", "sin"), ("us-west", "cpx22", "hil")],
)
def test_each_region_builds_its_own_current_server_type(
    runner_env, callback_api, fake_hetzner, job_id, region, server_type, location
):
    callback_api.region = region

    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    [server] = fake_hetzner.servers
    assert (server["server_type"]["name"], server["location"]["name"]) == (server_type, location)


def test_runner_server_types_overrides_one_region_and_keeps_the_others(
    runner_env, callback_api, fake_hetzner, job_id
):
    callback_api.region = "eu-central"

    result = provision(runner_env, job_id, RUNNER_SERVER_TYPES="eu-central=cax11,us-east=cpx32")

    assert result.returncode == 0, result.stderr
    assert fake_hetzner.servers[0]["server_type"]["name"] == "cax11"


@pytest.mark.parametrize(
    ("region", "types", "expected"),
    [
        ("us-east", "us-east=cpx11", "ash: deprecated (unavailable after 2026-01-01)"),
        ("ap-southeast", '{"ap-southeast": "cx23"}', "sin: not sold there"),
        ("us-east", "us-east=cx99", "does not exist"),
    ],
    ids=["deprecated", "not-sold-in-the-region", "unknown"],
)
def test_a_server_type_the_region_cannot_order_fails_create_server_before_creating(
    runner_env, callback_api, fake_hetzner, job_id, region, types, expected
):
    callback_api.region = region

    result = provision(runner_env, job_id, RUNNER_SERVER_TYPES=types)

    assert result.returncode == 1
    [fail] = callback_api.of("fail")
    assert fail.body["failed_step"] == "create-server"
    assert expected in fail.body["error"]
    assert "RUNNER_SERVER_TYPES" in fail.body["error"]
    assert "capacity" not in fail.body
    assert posted_locations(fake_hetzner) == []
    assert [r["query"] for r in fake_hetzner.requests if r["path"] == "/v1/server_types"]


def test_the_old_single_server_type_variable_is_refused(runner_env, job_id):
    result = provision(runner_env, job_id, RUNNER_SERVER_TYPE="cpx11")

    assert result.returncode == 2
    assert "RUNNER_SERVER_TYPES" in result.stderr


def test_a_location_that_stopped_selling_the_type_is_skipped_before_ordering(
    runner_env, callback_api, fake_hetzner, job_id
):
    callback_api.region = "eu-central"
    fake_hetzner.stop_selling("cx23", "fsn1")

    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    assert posted_locations(fake_hetzner) == ["nbg1"]


def test_an_unsupported_location_invalid_input_tries_the_next_location(
    runner_env, callback_api, fake_hetzner, job_id
):
    # The listing still names fsn1, but an order there is refused as invalid_input.
    callback_api.region = "eu-central"
    fake_hetzner.stop_selling("cx23", "fsn1", still_listed=True)
    fake_hetzner.make_unavailable("nbg1")

    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    assert posted_locations(fake_hetzner) == ["fsn1", "nbg1", "hel1"]
    assert fake_hetzner.servers[0]["location"]["name"] == "hel1"


def test_an_unknown_ssh_key_fails_at_the_first_location_without_trying_others(
    runner_env, callback_api, fake_hetzner, job_id
):
    callback_api.region = "eu-central"

    result = provision(runner_env, job_id, RUNNER_SSH_KEY_NAME="nobody-has-this-key")

    assert result.returncode == 1
    [fail] = callback_api.of("fail")
    assert "invalid_input" in fail.body["error"]
    assert posted_locations(fake_hetzner) == ["fsn1"]


def test_the_projects_server_limit_is_reported_as_capacity_not_as_a_failure(
    runner_env, callback_api, fake_hetzner, job_id
):
    callback_api.region = "eu-central"
    fake_hetzner.server_limit = 1
    fake_hetzner.add_server(name="someone-else")

    result = provision(runner_env, job_id)

    assert result.returncode == 1
    [fail] = callback_api.of("fail")
    assert fail.body["failed_step"] == "create-server"
    assert fail.body["capacity"] is True
    assert "resource_limit_exceeded" in fail.body["error"]
    assert posted_locations(fake_hetzner) == ["fsn1"]  # a project-wide limit: no other location
    assert len(fake_hetzner.servers) == 1


def test_the_server_limit_in_the_workflow_steps_reaches_the_failure_step(
    runner_env, callback_api, fake_hetzner, job_id, tmp_path
):
    env = {**runner_env, "RUNNER_STATE_FILE": str(tmp_path / "state.json")}
    fake_hetzner.server_limit = 0
    assert run_runner(env, "claim", "--job-id", job_id, "--attempt", "1").returncode == 0

    assert run_runner(env, "create-server").returncode == 1
    assert run_runner(env, "fail").returncode == 0

    [fail] = callback_api.of("fail")
    assert fail.body["capacity"] is True and fail.body["failed_step"] == "create-server"
