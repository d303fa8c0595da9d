"""`python -m provisioning.runner reap`: lists our VMs, asks the (fake) service, deletes its picks."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from tests.runner.conftest import run_runner

OLD = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)


def managed(fake_hetzner, name, *, job_id=None, agent_id=None, created=OLD):
    labels = {"managed-by": "agent-provisioning", "attempt": "1"}
    if job_id:
        labels["job-id"] = job_id
    if agent_id:
        labels["agent-id"] = agent_id
    return fake_hetzner.add_server(name=name, labels=labels, created=created)


def summary(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_reap_sends_every_managed_vm_and_deletes_exactly_what_it_is_told(
    runner_env, callback_api, fake_hetzner
):
    job, agent = str(uuid.uuid4()), str(uuid.uuid4())
    doomed = managed(fake_hetzner, "agent-doomed", job_id=job, agent_id=agent)
    kept = managed(fake_hetzner, "agent-kept", job_id=str(uuid.uuid4()))
    unlabelled = managed(fake_hetzner, "agent-bare")
    foreign = fake_hetzner.add_server(name="database", labels={"team": "data"})

    def answer(servers):
        return 200, {
            "delete": [str(doomed["id"])],
            "keep": [
                {"server_id": str(kept["id"]), "reason": "current VM"},
                {"server_id": str(unlabelled["id"]), "reason": "too young"},
            ],
            "verdicts": [
                {"server_id": str(doomed["id"]), "verdict": "delete", "reason": "agent ended"}
            ],
        }

    callback_api.reaper_answer = answer

    result = run_runner(runner_env, "reap")

    assert result.returncode == 0, result.stderr
    [call] = callback_api.of("reaper")
    sent = {s["server_id"]: s for s in call.body["servers"]}
    assert set(sent) == {str(doomed["id"]), str(kept["id"]), str(unlabelled["id"])}
    assert sent[str(doomed["id"])] == {
        "server_id": str(doomed["id"]),
        "name": "agent-doomed",
        "job_id": job,
        "agent_id": agent,
        "created": "2025-01-01T12:00:00+00:00",
    }
    assert sent[str(unlabelled["id"])]["job_id"] == ""
    assert [s["id"] for s in fake_hetzner.deleted_servers] == [doomed["id"]]
    assert sorted(s["id"] for s in fake_hetzner.servers) == sorted(
        [kept["id"], unlabelled["id"], foreign["id"]]
    )
    assert summary(result)["deleted"] == [str(doomed["id"])]
    assert summary(result)["kept"] == 2
    assert "agent ended" in result.stderr
    assert "too young" in result.stderr


def test_reap_never_deletes_a_server_it_did_not_list(runner_env, callback_api, fake_hetzner):
    listed = managed(fake_hetzner, "agent-listed", job_id=str(uuid.uuid4()))
    foreign = fake_hetzner.add_server(name="database", labels={})
    callback_api.reaper_answer = lambda servers: (
        200,
        {"delete": [str(foreign["id"]), "999999999"], "keep": [], "verdicts": []},
    )

    result = run_runner(runner_env, "reap")

    assert result.returncode == 0, result.stderr
    assert fake_hetzner.deleted_servers == []
    assert {s["id"] for s in fake_hetzner.servers} == {listed["id"], foreign["id"]}
    assert sorted(summary(result)["refused"]) == sorted([str(foreign["id"]), "999999999"])


def test_reap_deletes_nothing_when_the_service_refuses(runner_env, callback_api, fake_hetzner):
    managed(fake_hetzner, "agent-a", job_id=str(uuid.uuid4()))
    callback_api.reaper_answer = lambda servers: (
        401,
        {"detail": "Workflow token refused: wrong workflow.", "code": "invalid_token"},
    )

    result = run_runner(runner_env, "reap")

    assert result.returncode == 1
    assert fake_hetzner.deleted_servers == []
    assert "wrong workflow" in result.stderr


def test_reap_deletes_nothing_when_told_to_delete_more_than_the_limit(
    runner_env, callback_api, fake_hetzner
):
    servers = [managed(fake_hetzner, f"agent-{i}", job_id=str(uuid.uuid4())) for i in range(4)]
    callback_api.reaper_answer = lambda sent: (
        200,
        {"delete": [s["server_id"] for s in sent], "keep": [], "verdicts": []},
    )

    result = run_runner({**runner_env, "RUNNER_REAP_MAX_DELETES": "3"}, "reap")

    assert result.returncode == 1
    assert fake_hetzner.deleted_servers == []
    assert len(fake_hetzner.servers) == len(servers)
    assert "RUNNER_REAP_MAX_DELETES=3" in result.stderr


def test_reap_with_no_managed_servers_asks_nothing(runner_env, callback_api, fake_hetzner):
    fake_hetzner.add_server(name="database", labels={})

    result = run_runner(runner_env, "reap")

    assert result.returncode == 0, result.stderr
    assert callback_api.of("reaper") == []
    assert summary(result)["listed"] == 0


def test_reap_needs_the_hetzner_token(runner_env):
    env = {k: v for k, v in runner_env.items() if k != "HCLOUD_TOKEN"}

    result = run_runner(env, "reap")

    assert result.returncode == 2
    assert "HCLOUD_TOKEN" in result.stderr
