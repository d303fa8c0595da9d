"""The runner's Hetzner budget: every request counted exactly and reported, 429s waited out.

The counts are checked against the loopback fake's own request log, so a request the runner
forgot to count (or counted twice) fails the test.
"""

from __future__ import annotations

import time

import pytest
from hcloud import APIException

from provisioning.runner.config import Settings
from provisioning.runner.hetzner import Cloud, rate_limit_pause
from tests.fakes.hetzner import FakeHetzner
from tests.runner.conftest import run_runner
from tests.runner.test_pipeline import provision
from tests.runner.test_workflow_steps import start_heartbeat_loop, stopped_within


def _paths(fake: FakeHetzner) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in fake.requests]


def test_a_build_whose_actions_take_time_counts_each_poll_and_reads_nothing_twice(
    runner_env, callback_api, fake_hetzner, job_id
):
    fake_hetzner.action_seconds = 0.3  # several polls at RUNNER_HCLOUD_POLL_SECONDS=0.05

    result = provision(runner_env, job_id)

    assert result.returncode == 0, result.stderr
    requests = _paths(fake_hetzner)
    [complete] = callback_api.of("complete")
    assert complete.body["hetzner_calls"] == len(requests)
    assert result.summary["hetzner_calls"] == len(requests)
    polls = [path for method, path in requests if path == "/v1/actions"]
    assert requests[:2] == [("GET", "/v1/server_types"), ("POST", "/v1/servers")]
    # The create and start actions are polled together, one request per poll, nothing else read.
    assert len(polls) >= 1
    assert requests[2:] == [("GET", "/v1/actions")] * len(polls)
    [query] = {tuple(r["query"]["id"]) for r in fake_hetzner.requests if r["path"] == "/v1/actions"}
    assert len(query) == 2


def test_the_workflow_steps_add_up_their_requests_and_report_them_with_the_failure(
    runner_env, callback_api, fake_hetzner, job_id, tmp_path
):
    env = {
        **runner_env,
        "RUNNER_STATE_FILE": str(tmp_path / "provision-state.json"),
        "RUNNER_FAIL_STEP": "configure",
    }
    claim = run_runner(env, "claim", "--job-id", job_id, "--attempt", "1")
    assert claim.returncode == 0, claim.stderr
    loop = start_heartbeat_loop(env)
    codes = [
        run_runner(env, step).returncode for step in ["create-server", "wait-ssh", "configure"]
    ]
    failed = run_runner(env, "fail")

    assert codes == [0, 0, 1]
    assert failed.returncode == 0, failed.stderr
    assert stopped_within(loop, 5)
    [fail] = callback_api.of("fail")
    # Reported before this attempt's VM is deleted: the delete (one request) comes after.
    assert _paths(fake_hetzner)[-1][0] == "DELETE"
    assert fail.body["hetzner_calls"] == len(fake_hetzner.requests) - 1 == 2
    assert "2 Hetzner API request(s) this attempt" in failed.stderr


def test_a_retried_attempt_looks_for_an_earlier_vm_first_and_a_first_attempt_does_not(
    runner_env, callback_api, fake_hetzner, job_id
):
    first = provision(runner_env, job_id)
    first_requests = _paths(fake_hetzner)
    second = provision(runner_env, job_id, attempt=2)

    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert ("GET", "/v1/servers") not in first_requests
    second_requests = _paths(fake_hetzner)[len(first_requests) :]
    # Attempt 2 finds attempt 1's VM with one listing and adopts it (it runs already).
    assert second_requests == [("GET", "/v1/servers")]
    assert callback_api.of("complete")[1].body["hetzner_calls"] == 1


@pytest.fixture
def tight_fake():
    """A project with a budget of 3 requests, refilled one every 0.3 s."""
    with FakeHetzner(rate_limit=3, rate_refill_seconds=0.3, ssh_keys=("k",)) as fake:
        yield fake


def _settings(fake: FakeHetzner) -> Settings:
    return Settings.from_env(
        {"HCLOUD_TOKEN": "t", "HCLOUD_API_ENDPOINT": fake.url, "RUNNER_HCLOUD_POLL_SECONDS": "0.05"}
    )


def test_a_429_waits_until_ratelimit_reset_then_the_same_request_succeeds(tight_fake):
    waits: list[tuple[float, int]] = []
    now: list[float] = []

    def wall_clock() -> float:
        now.append(time.time())
        return now[-1]

    def sleep(seconds: float) -> None:
        # The reset the fake announces now is the one its 429 carried (full_at does not move).
        waits.append((seconds, int(tight_fake.rate_headers()["RateLimit-Reset"])))
        time.sleep(seconds)

    counted: list[int] = []
    cloud = Cloud(
        _settings(tight_fake),
        sleep=sleep,
        wall_clock=wall_clock,
        on_request=lambda: counted.append(1),
    )
    for _ in range(3):
        cloud.find("managed-by=agent-provisioning")

    assert cloud.find("managed-by=agent-provisioning") == []

    [(pause, reset)] = waits
    assert pause == pytest.approx(reset - now[0], abs=1e-6)
    assert 0 < pause <= 2.0
    # Three spent the budget, one was answered 429, the same one again succeeded: no other retry.
    assert len(tight_fake.requests) == 5
    assert cloud.requests == len(counted) == 5


def test_a_429_past_the_longest_wait_fails_at_once_without_hcloud_retrying_it(tight_fake):
    slept: list[float] = []
    cloud = Cloud(_settings(tight_fake), sleep=slept.append, rate_limit_max_wait=0.0)
    for _ in range(3):
        cloud.find("managed-by=agent-provisioning")

    with pytest.raises(APIException) as refused:
        cloud.find("managed-by=agent-provisioning")

    assert refused.value.code == "rate_limit_exceeded"
    assert slept == []
    assert len(tight_fake.requests) == cloud.requests == 4


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"RateLimit-Reset": "1030"}, 30.0),
        ({"RateLimit-Reset": "990"}, 2.0),  # already past: the fallback
        ({"RateLimit-Reset": "soon"}, 2.0),
        ({}, 2.0),
    ],
)
def test_the_pause_is_the_time_left_until_ratelimit_reset(headers, expected):
    assert rate_limit_pause(headers, now=1000.0, fallback=2.0) == expected
