import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from provisioning import backends
from provisioning.backends import DispatchError, DispatchResult, RunStatus
from provisioning.backends.base import run_title
from provisioning.backends.github import GitHubBackend
from tests.fakes.github import (
    RATE_LIMIT_RESET_SECONDS,
    SECONDARY_RETRY_AFTER_SECONDS,
    FakeGitHub,
    installed_fake_github,
    new_rsa_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def fake() -> FakeGitHub:
    return FakeGitHub(repository="acme/agents", workflow_file="provision.yml")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def github(fake: FakeGitHub, clock: Clock) -> GitHubBackend:
    return fake.backend(clock=clock)


def test_dispatch_sends_the_job_inputs_and_asks_for_the_run_id(github, fake):
    job_id = uuid.uuid4()

    result = github.dispatch(job_id=job_id, attempt=2, mode="provision")

    [sent] = fake.dispatches
    assert sent.workflow_file == "provision.yml"
    assert sent.ref == "main"
    assert sent.inputs == {"job_id": str(job_id), "attempt": "2", "mode": "provision"}
    assert sent.return_run_details is True
    assert result == DispatchResult(
        run_id=sent.run_id, run_url=f"https://github.com/acme/agents/actions/runs/{sent.run_id}"
    )


def test_dispatch_sends_the_github_api_headers(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="cleanup")

    request = fake.requests[-1]
    assert request.headers["accept"] == "application/vnd.github+json"
    assert request.headers["x-github-api-version"] == "2022-11-28"
    assert request.headers["authorization"].startswith("Bearer ghs_")


def test_the_installation_token_is_scoped_to_our_repository_and_actions(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert fake.token_requests == [
        {"repositories": ["agents"], "permissions": {"actions": "write"}}
    ]


def test_the_installation_token_is_reused_across_calls(github, fake):
    for attempt in (1, 2, 3):
        github.dispatch(job_id=uuid.uuid4(), attempt=attempt, mode="provision")

    assert len(fake.tokens) == 1
    assert len(fake.dispatches) == 3


def test_the_installation_token_is_renewed_five_minutes_before_it_expires(github, fake, clock):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    clock.now += timedelta(minutes=54)
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    assert len(fake.tokens) == 1

    clock.now += timedelta(minutes=2)
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert len(fake.tokens) == 2


def test_a_revoked_installation_token_is_replaced_once(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    fake.tokens.clear()  # GitHub forgot the token (revoked)

    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert len(fake.tokens) == 1
    assert len(fake.dispatches) == 2


def test_an_app_jwt_signed_by_another_key_cannot_get_a_token(fake):
    other = FakeGitHub(repository="acme/agents", private_key=new_rsa_key())
    github = fake.backend(private_key=other.private_key_pem)

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.status == 401
    assert "installation token" in str(excinfo.value)
    assert fake.dispatches == []


def test_a_502_is_a_transient_dispatch_error_with_githubs_message(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")  # token cached
    fake.fail_next(1, status=502)

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.status == 502
    assert excinfo.value.is_transient
    assert "502" in str(excinfo.value)
    assert "Server Error" in str(excinfo.value)
    assert "retry after 30" in str(excinfo.value)


def test_dispatch_works_again_after_the_failures_pass(github, fake):
    fake.fail_next(2, status=502)
    for _ in range(2):
        with pytest.raises(DispatchError):
            github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    result = github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert result.run_id == fake.dispatches[-1].run_id


def test_a_timeout_is_a_transient_dispatch_error(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    fake.timeout_next()

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.status is None
    assert excinfo.value.is_transient
    assert "in time" in str(excinfo.value)


def test_an_unknown_workflow_is_a_permanent_dispatch_error(fake, clock):
    github = fake.backend(workflow_file="missing.yml", clock=clock)

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.status == 404
    assert not excinfo.value.is_transient


def test_an_enterprise_server_without_run_details_gives_no_run_id(github, fake):
    fake.legacy_ghes = True

    result = github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert result == DispatchResult(run_id=None)
    assert len(fake.dispatches) == 1
    assert fake.dispatches[0].return_run_details is False


def test_an_unknown_mode_is_a_programming_error(github):
    with pytest.raises(ValueError, match="mode"):
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="reboot")


def test_cancel_run_cancels_an_active_run(github, fake):
    run_id = github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id

    github.cancel_run(run_id=run_id)

    assert fake.cancelled == [run_id]


def test_cancelling_a_finished_run_is_fine(github, fake):
    fake.set_run("42", status="completed", conclusion="success")

    github.cancel_run(run_id="42")

    assert fake.cancelled == []


def test_cancel_run_reports_a_github_outage(github, fake):
    fake.set_run("42", status="in_progress")
    github.get_run(run_id="42")
    fake.fail_next(status=503)

    with pytest.raises(DispatchError):
        github.cancel_run(run_id="42")


def test_get_run_reads_status_and_conclusion(github, fake):
    fake.set_run("42", status="completed", conclusion="failure", display_title="t")

    assert github.get_run(run_id="42") == RunStatus(
        run_id="42",
        status="completed",
        conclusion="failure",
        html_url="https://github.com/acme/agents/actions/runs/42",
        display_title="t",
    )


def test_get_run_of_an_unknown_run_is_none(github):
    assert github.get_run(run_id="404404") is None


def test_find_run_matches_the_run_title(github, fake):
    job_id = uuid.uuid4()
    fake.legacy_ghes = True
    github.dispatch(job_id=job_id, attempt=1, mode="provision")
    github.dispatch(job_id=uuid.uuid4(), attempt=2, mode="provision")
    github.dispatch(job_id=job_id, attempt=2, mode="provision")

    found = github.find_run(job_id=job_id, attempt=2)

    assert found == fake.dispatches[2].run_id
    params = fake.requests[-1].url.params
    assert params["event"] == "workflow_dispatch"
    assert params["created"].startswith(">=")


def test_find_run_without_a_match_is_none(github):
    assert github.find_run(job_id=uuid.uuid4(), attempt=1) is None


def test_run_url_points_at_the_web_ui(github):
    assert github.run_url(run_id="9") == "https://github.com/acme/agents/actions/runs/9"


def test_run_url_on_enterprise_server_drops_the_api_prefix(fake):
    github = fake.backend(api_url="https://ghe.example.com/api/v3")

    assert github.run_url(run_id="9") == "https://ghe.example.com/acme/agents/actions/runs/9"


@pytest.mark.django_db  # from_settings: the shared API budget lives in the database
def test_the_private_key_may_be_a_file_path(fake, settings, tmp_path):
    key_file = tmp_path / "app.pem"
    key_file.write_text(fake.private_key_pem)
    settings.GITHUB_REPOSITORY = "acme/agents"
    settings.GITHUB_APP_ID = fake.app_id
    settings.GITHUB_APP_INSTALLATION_ID = fake.installation_id
    settings.GITHUB_APP_PRIVATE_KEY = str(key_file)

    github = GitHubBackend.from_settings(transport=fake.transport)

    assert github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id


@pytest.mark.django_db  # from_settings: the shared API budget lives in the database
def test_get_backend_gives_the_installed_fake(settings):
    gen = installed_fake_github(settings)
    fake = next(gen)
    try:
        backend = backends.get_backend()
        result = backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
        assert backend.name == "github"
        assert result.run_id == fake.dispatches[0].run_id
    finally:
        gen.close()
    assert backends._backend is None


def test_get_backend_builds_the_configured_backend_once(settings):
    settings.PROVISIONING_RUNNER = "local"
    backends.reset_backend()
    try:
        first = backends.get_backend()
        assert first.name == "local"
        assert backends.get_backend() is first
    finally:
        backends.reset_backend()


def test_after_one_refusal_of_run_details_the_flag_is_no_longer_sent(github, fake):
    fake.legacy_ghes = True
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    dispatch_posts = [r for r in fake.requests if r.url.path.endswith("/dispatches")]
    assert len(dispatch_posts) == 3  # refused, resent without the flag, then straight without


def test_a_422_is_a_permanent_dispatch_error_with_githubs_message(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")  # token cached
    fake.fail_next(status=422)

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.status == 422
    assert not excinfo.value.is_transient


def test_an_unknown_input_is_a_permanent_422_and_no_reason_to_drop_run_details(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")  # token cached
    # A workflow that no longer declares `mode` (say, an older branch): GitHub names the input.
    fake.workflow_inputs = {"job_id": None, "attempt": None}
    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.status == 422
    assert not excinfo.value.is_transient
    assert "Unexpected inputs provided" in str(excinfo.value)
    posts = [r for r in fake.requests if r.url.path.endswith("/dispatches")]
    assert len(posts) == 2  # the first dispatch, then one refused: not re-sent without the flag
    assert json.loads(posts[-1].content)["return_run_details"] is True
    fake.workflow_inputs = {"job_id": None, "attempt": None, "mode": None}
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    assert fake.dispatches[-1].return_run_details is True  # still asking for run details


@pytest.mark.parametrize("status", [400, 422])
def test_an_enterprise_server_refusing_run_details_with_400_or_422_gets_a_plain_dispatch(
    github, fake, status
):
    fake.legacy_ghes, fake.legacy_ghes_status = True, status

    result = github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert result == DispatchResult(run_id=None)
    assert [d.return_run_details for d in fake.dispatches] == [False]


@pytest.mark.parametrize("status", [403, 429])
def test_a_primary_rate_limit_says_when_it_resets(github, fake, status):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")  # token cached
    fake.rate_limit_next(status=status)

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    error = excinfo.value
    assert error.status == status
    assert error.is_transient
    assert error.retry_after is not None
    assert RATE_LIMIT_RESET_SECONDS - 5 <= error.retry_after <= RATE_LIMIT_RESET_SECONDS
    assert "rate limit exceeded" in str(error)


@pytest.mark.parametrize("status", [403, 429])
def test_a_secondary_rate_limit_passes_on_retry_after(github, fake, status):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    fake.rate_limit_next(status=status, secondary=True)

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.retry_after == SECONDARY_RETRY_AFTER_SECONDS
    assert excinfo.value.is_transient
    assert f"retry after {SECONDARY_RETRY_AFTER_SECONDS} s" in str(excinfo.value)


def test_a_plain_403_is_permanent_and_names_no_wait(github, fake):
    github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    fake.fail_next(status=403)

    with pytest.raises(DispatchError) as excinfo:
        github.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    assert excinfo.value.retry_after is None
    assert not excinfo.value.is_transient


def test_find_run_never_takes_the_cleanup_run_of_the_same_attempt(github, fake):
    job_id = uuid.uuid4()
    fake.legacy_ghes = True
    github.dispatch(job_id=job_id, attempt=1, mode="provision")
    github.dispatch(job_id=job_id, attempt=1, mode="cleanup")  # newer: listed first

    assert github.find_run(job_id=job_id, attempt=1) == fake.dispatches[0].run_id
    assert github.find_run(job_id=job_id, attempt=1, mode="cleanup") == fake.dispatches[1].run_id
    assert fake.runs[fake.dispatches[1].run_id]["display_title"] == run_title(
        job_id=job_id, attempt=1, mode="cleanup"
    )
