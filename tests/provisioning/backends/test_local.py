import json
import sys
import time
import uuid

import pytest

from provisioning.backends.local import LocalBackend

# Stands in for `python -m provisioning.runner`: records how it was started, then behaves as
# STUB_BEHAVIOUR says.
STUB = """
import json, os, sys, time
with open(os.environ["STUB_OUT"], "w") as fh:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}, fh)
print("stub runner says hello", flush=True)
behaviour = os.environ.get("STUB_BEHAVIOUR", "exit0")
if behaviour == "sleep":
    time.sleep(60)
sys.exit(0 if behaviour == "exit0" else 1)
"""


@pytest.fixture
def stub(settings, tmp_path):
    script = tmp_path / "stub_runner.py"
    script.write_text(STUB)
    out = tmp_path / "stub-out.json"
    settings.LOCAL_RUNNER_COMMAND = [sys.executable, str(script)]
    settings.LOCAL_RUNNER_LOG_DIR = tmp_path / "logs"
    settings.LOCAL_RUNNER_EXTRA_ENV = {"STUB_OUT": str(out), "STUB_BEHAVIOUR": "exit0"}
    settings.PUBLIC_BASE_URL = "http://127.0.0.1:8123"
    settings.PROVISIONING_OIDC_AUDIENCE = "aud-test"
    settings.LOCAL_OIDC_ISSUER_URL = "http://127.0.0.1:8702"
    settings.LOCAL_OIDC_REQUEST_TOKEN = "req-token"
    settings.LOCAL_HETZNER_URL = "http://127.0.0.1:8701/v1"
    settings.LOCAL_RUNNER_HEARTBEAT_SECONDS = 1
    settings.LOCAL_RUNNER_STEP_SECONDS = 0.5
    settings.LOCAL_RUNNER_FAIL_STEP = ""
    settings.LOCAL_RUNNER_KILL_AT_STEP = ""
    return out


@pytest.fixture
def local():
    backend = LocalBackend()
    yield backend
    backend.terminate_all()


def behave(settings, behaviour):
    settings.LOCAL_RUNNER_EXTRA_ENV = {
        **settings.LOCAL_RUNNER_EXTRA_ENV,
        "STUB_BEHAVIOUR": behaviour,
    }


def wait_for_file(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    time.sleep(0.05)
    return json.loads(path.read_text())


def test_dispatch_starts_the_runner_with_the_workflow_arguments(local, stub):
    job_id = uuid.uuid4()

    result = local.dispatch(job_id=job_id, attempt=3, mode="provision")
    local.wait(run_id=result.run_id, timeout=10)

    seen = wait_for_file(stub)
    assert seen["argv"] == ["run", "--mode", "provision", "--job-id", str(job_id), "--attempt", "3"]
    assert result.run_id.isdigit()
    assert 10 <= len(result.run_id) <= 11
    assert result.run_url is None


def test_dispatch_gives_the_runner_a_workflow_runs_environment(local, stub, settings):
    settings.LOCAL_RUNNER_FAIL_STEP = "configure"

    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="cleanup").run_id
    local.wait(run_id=run_id, timeout=10)

    env = wait_for_file(stub)["env"]
    assert env["PROVISIONING_API_URL"] == "http://127.0.0.1:8123"
    assert env["PROVISIONING_OIDC_AUDIENCE"] == "aud-test"
    assert env["ACTIONS_ID_TOKEN_REQUEST_URL"] == (
        f"http://127.0.0.1:8702/token?run_id={run_id}&run_attempt=1"
    )
    assert env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"] == "req-token"
    assert env["HCLOUD_TOKEN"] == "local-fake-token"
    assert env["HCLOUD_API_ENDPOINT"] == "http://127.0.0.1:8701/v1"
    assert env["RUNNER_SIMULATE"] == "1"
    assert env["RUNNER_HEARTBEAT_SECONDS"] == "1"
    assert env["RUNNER_STEP_SECONDS"] == "0.5"
    assert env["RUNNER_FAIL_STEP"] == "configure"
    assert "RUNNER_KILL_AT_STEP" not in env
    assert env["RUNNER_STATE_FILE"].endswith("provision-state.json")
    assert run_id in env["RUNNER_STATE_FILE"]


def test_the_runner_does_not_inherit_the_servers_secrets(local, stub, monkeypatch):
    monkeypatch.setenv("DJANGO_SECRET_KEY", "server-only")
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_server_only")

    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    local.wait(run_id=run_id, timeout=10)

    env = wait_for_file(stub)["env"]
    assert "DJANGO_SECRET_KEY" not in env
    assert "STRIPE_SECRET_KEY" not in env


def test_the_runners_output_goes_to_a_log_per_run(local, stub):
    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    local.wait(run_id=run_id, timeout=10)

    log = local.log_path(run_id=run_id)
    assert log.name == f"{run_id}.log"
    assert "stub runner says hello" in log.read_text()


def test_get_run_reports_a_running_run_as_in_progress(local, stub, settings):
    behave(settings, "sleep")

    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    wait_for_file(stub)

    status = local.get_run(run_id=run_id)
    assert (status.status, status.conclusion) == ("in_progress", None)


def test_get_run_reports_a_clean_exit_as_success(local, stub):
    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    local.wait(run_id=run_id, timeout=10)

    status = local.get_run(run_id=run_id)
    assert (status.status, status.conclusion) == ("completed", "success")


def test_get_run_reports_a_non_zero_exit_as_failure(local, stub, settings):
    behave(settings, "exit1")

    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    local.wait(run_id=run_id, timeout=10)

    status = local.get_run(run_id=run_id)
    assert (status.status, status.conclusion) == ("completed", "failure")


def test_cancel_run_terminates_the_runner(local, stub, settings):
    behave(settings, "sleep")
    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    wait_for_file(stub)

    local.cancel_run(run_id=run_id)

    assert local.wait(run_id=run_id, timeout=10) is not None
    status = local.get_run(run_id=run_id)
    assert (status.status, status.conclusion) == ("completed", "cancelled")


def test_cancelling_a_finished_run_is_fine(local, stub):
    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    local.wait(run_id=run_id, timeout=10)

    local.cancel_run(run_id=run_id)

    assert local.get_run(run_id=run_id).conclusion == "success"


def test_another_process_can_cancel_a_run_by_its_pid_file(local, stub, settings):
    behave(settings, "sleep")
    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    wait_for_file(stub)

    LocalBackend().cancel_run(run_id=run_id)  # knows nothing of the run but its files

    assert local.wait(run_id=run_id, timeout=10) != 0


def test_another_process_sees_a_live_run_as_in_progress_by_its_pid_file(local, stub, settings):
    """The worker re-sending an unclaimed dispatch the web process started: a live runner process
    is a run that may still claim, so it waits instead of starting a twin."""
    behave(settings, "sleep")
    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    wait_for_file(stub)
    other = LocalBackend()  # knows nothing of the run but its files

    status = other.get_run(run_id=run_id)

    assert status is not None and status.status == "in_progress" and status.may_still_claim
    local.cancel_run(run_id=run_id)
    local.wait(run_id=run_id, timeout=10)


def test_unknown_runs_are_none(local, stub):
    assert local.get_run(run_id="123") is None
    assert local.find_run(job_id=uuid.uuid4(), attempt=1) is None
    assert local.run_url(run_id="123") is None
    local.cancel_run(run_id="123")  # nothing to do, no error


def test_a_finished_run_leaves_no_zombie_or_pid_file(local, stub, settings):
    run_id = local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    local.wait(run_id=run_id, timeout=10)
    deadline = time.monotonic() + 5
    pid_file = settings.LOCAL_RUNNER_LOG_DIR / f"{run_id}.pid"
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)

    assert not pid_file.exists()
    assert local._runs[run_id].process.returncode == 0


def test_an_unknown_mode_is_a_programming_error(local, stub):
    with pytest.raises(ValueError, match="mode"):
        local.dispatch(job_id=uuid.uuid4(), attempt=1, mode="reboot")


@pytest.mark.django_db
def test_the_dispatcher_waits_for_a_live_local_run_and_re_sends_it_once_it_is_gone(
    local, stub, settings
):
    """The local backend's answer to "is the unclaimed run still there?": a live process is a
    run waiting for its build machine (kept, a NOTE says so); an exited one is re-sent."""
    from datetime import timedelta

    from django.utils import timezone

    from provisioning import selectors, services
    from provisioning.models import JobEvent
    from tests.factories import AgentFactory
    from tests.provisioning.helpers import enqueue

    behave(settings, "sleep")
    job = enqueue(AgentFactory())
    services.job_dispatch_next(backend=local)
    job.refresh_from_db()
    first = job.workflow_run_id
    wait_for_file(stub)
    window = timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)
    later = timezone.now() + window

    services.job_dispatch_next(backend=local, now=later)

    job.refresh_from_db()
    assert job.workflow_run_id == first and job.dispatched_at == later
    note = JobEvent.objects.get(job=job, action=JobEvent.Action.NOTE)
    assert note.reason.startswith("Waiting for a build machine") and "in_progress" in note.reason
    assert list(selectors.job_list_held_by_runner()) == [job]

    local.cancel_run(run_id=first)
    local.wait(run_id=first, timeout=10)
    services.job_dispatch_next(backend=local, now=later + window)

    job.refresh_from_db()
    assert job.workflow_run_id not in (None, first)
    assert list(selectors.job_list_held_by_runner()) == []
