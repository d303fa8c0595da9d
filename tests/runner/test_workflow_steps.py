"""The per-step commands, chained the way .github/workflows/provision.yml chains them."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.runner.conftest import REPO_ROOT, run_runner

PROVISION_STEPS = ["create-server", "wait-ssh", "configure", "health-check", "complete"]


@pytest.fixture
def step_env(runner_env, tmp_path):
    return {**runner_env, "RUNNER_STATE_FILE": str(tmp_path / "provision-state.json")}


def start_heartbeat_loop(env):
    return subprocess.Popen(
        [sys.executable, "-m", "provisioning.runner", "heartbeat-loop"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stopped_within(process, seconds):
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
    return True


def test_the_workflow_steps_provision_and_the_heartbeat_loop_stops_after_complete(
    step_env, callback_api, fake_hetzner, job_id
):
    assert run_runner(step_env, "claim", "--job-id", job_id, "--attempt", "1").returncode == 0
    loop = start_heartbeat_loop(step_env)

    codes = [run_runner(step_env, step).returncode for step in PROVISION_STEPS]

    assert codes == [0, 0, 0, 0, 0]
    assert stopped_within(loop, 5), "heartbeat loop kept running after complete"
    [server] = fake_hetzner.servers
    assert callback_api.of("complete")[0].body["server_id"] == str(server["id"])
    assert "fail" not in callback_api.verbs()


def test_a_failed_step_is_reported_by_the_failure_step_which_deletes_the_vm(
    step_env, callback_api, fake_hetzner, job_id
):
    env = {**step_env, "RUNNER_FAIL_STEP": "configure"}
    run_runner(env, "claim", "--job-id", job_id, "--attempt", "1")
    loop = start_heartbeat_loop(env)
    codes = [
        run_runner(env, step).returncode for step in ["create-server", "wait-ssh", "configure"]
    ]

    result = run_runner(env, "fail")

    assert codes == [0, 0, 1]
    assert result.returncode == 0, result.stderr
    [fail] = callback_api.of("fail")
    assert fail.body["failed_step"] == "configure"
    assert "FAILED!" in fail.body["error"]
    assert fake_hetzner.servers == []
    assert stopped_within(loop, 5)


def test_a_cancelled_step_is_reported_as_such(step_env, callback_api, fake_hetzner, job_id):
    env = {**step_env, "RUNNER_STEP_SECONDS": "30"}
    run_runner(env, "claim", "--job-id", job_id, "--attempt", "1")
    run_runner(env, "create-server")
    step = subprocess.Popen(
        [sys.executable, "-m", "provisioning.runner", "wait-ssh"],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while "wait-ssh" not in [c.body.get("step") for c in callback_api.of("heartbeat")]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # That beat is sent after the step installed its signal handlers.
    step.send_signal(2)  # SIGINT, what GitHub sends first on cancel
    step.communicate(timeout=20)

    result = run_runner(env, "fail")

    assert step.returncode == 1
    assert result.returncode == 0
    [fail] = callback_api.of("fail")
    assert fail.body["failed_step"] == "wait-ssh"
    assert "SIGINT" in fail.body["error"]
    assert fake_hetzner.servers == []


def test_a_fenced_heartbeat_stops_the_next_step_and_the_failure_step_only_deletes(
    step_env, callback_api, fake_hetzner, job_id
):
    callback_api.refuse_heartbeats_after = 1  # create-server's own beat passes
    env = {**step_env, "RUNNER_HEARTBEAT_SECONDS": "0.05"}
    run_runner(env, "claim", "--job-id", job_id, "--attempt", "1")
    assert run_runner(env, "create-server").returncode == 0
    loop = start_heartbeat_loop(env)
    assert stopped_within(loop, 5), "heartbeat loop should stop when fenced out"

    step = run_runner(env, "wait-ssh")
    result = run_runner(env, "fail")

    assert step.returncode == 4
    assert result.returncode == 0
    assert "fail" not in callback_api.verbs()
    assert "complete" not in callback_api.verbs()
    assert fake_hetzner.servers == []


def test_after_a_refused_claim_the_failure_step_touches_nothing(
    step_env, callback_api, fake_hetzner, job_id
):
    callback_api.script["claim"] = [
        (403, {"detail": "run was not dispatched", "code": "wrong_run"})
    ]

    claim = run_runner(step_env, "claim", "--job-id", job_id, "--attempt", "1")
    later = run_runner(step_env, "create-server")
    result = run_runner(step_env, "fail")

    assert claim.returncode == 3
    assert later.returncode == 1
    assert result.returncode == 0
    assert callback_api.verbs() == ["claim"]
    assert fake_hetzner.requests == []


def test_the_failure_step_without_any_state_does_nothing(step_env, callback_api):
    result = run_runner(step_env, "fail")

    assert result.returncode == 0
    assert callback_api.calls == []


def test_the_workflow_steps_deprovision_every_vm_of_the_agent(
    step_env, callback_api, fake_hetzner, job_id
):
    labels = {"managed-by": "agent-provisioning", "agent-id": callback_api.agent_id}
    fake_hetzner.add_server(name="agent-a", labels={**labels, "job-id": "a", "attempt": "1"})
    fake_hetzner.add_server(name="agent-b", labels={**labels, "job-id": "b", "attempt": "2"})
    other = fake_hetzner.add_server(
        name="agent-c", labels={**labels, "agent-id": "someone-else", "job-id": "c"}
    )
    claim = run_runner(
        step_env, "claim", "--mode", "deprovision", "--job-id", job_id, "--attempt", "1"
    )
    assert claim.returncode == 0, claim.stderr
    loop = start_heartbeat_loop(step_env)

    codes = [run_runner(step_env, step).returncode for step in ["delete-servers", "complete"]]

    assert codes == [0, 0]
    assert stopped_within(loop, 5)
    assert [s["id"] for s in fake_hetzner.servers] == [other["id"]]
    # Counted across the step processes: one listing, two deletes.
    assert callback_api.of("complete")[0].body == {"server_id": "", "ipv4": "", "hetzner_calls": 3}
    assert len(fake_hetzner.requests) == 3


def test_the_heartbeat_loop_stops_when_its_state_file_disappears(
    step_env, callback_api, fake_hetzner, job_id, tmp_path
):
    assert run_runner(step_env, "claim", "--job-id", job_id, "--attempt", "1").returncode == 0
    loop = start_heartbeat_loop(step_env)
    deadline = time.monotonic() + 10
    while not callback_api.of("heartbeat"):
        assert time.monotonic() < deadline, "the loop never beat"
        time.sleep(0.02)

    (tmp_path / "provision-state.json").unlink()

    assert stopped_within(loop, 5), "heartbeat loop kept beating without its state file"
    assert "is gone" in loop.stderr.read()
