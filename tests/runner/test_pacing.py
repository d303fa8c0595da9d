"""The runner's waits, paced by an injected clock: minutes of retries and polling in no real time.

The subprocess tests (test_pipeline.py, test_workflow_steps.py) prove the CLI's wiring with short
real intervals; these drive the same classes in-process with `tests.fakes.clock.FakeClock`, so
they can use production-sized intervals and assert exactly how each wait was paced.
"""

from __future__ import annotations

import threading

import pytest

from provisioning.runner.api import ApiError, CallbackApi
from provisioning.runner.config import Settings
from provisioning.runner.hetzner import Cloud, CloudError, Vm
from provisioning.runner.pipeline import Runner, heartbeat_loop
from provisioning.runner.state import RunState
from tests.fakes.clock import FakeClock

PENDING = (409, {"detail": "run not recorded yet", "code": "dispatch_pending"})


@pytest.fixture
def settings(runner_env) -> Settings:
    return Settings.from_env(
        {
            **runner_env,
            # production-sized intervals: only virtual time passes
            "RUNNER_RETRY_BACKOFF_SECONDS": "2",
            "RUNNER_CLAIM_RETRY_SECONDS": "60",
            "RUNNER_STEP_SECONDS": "30",
            "RUNNER_HEARTBEAT_SECONDS": "20",
            "RUNNER_HCLOUD_POLL_SECONDS": "1",
        }
    )


def test_a_pending_dispatch_is_waited_out_at_claim(settings, callback_api, job_id):
    callback_api.script["claim"] = [PENDING, PENDING]
    clock = FakeClock()
    api = CallbackApi(settings, job_id, sleep=clock.sleep, clock=clock.now)

    answer = api.claim(1)

    api.close()
    assert answer["status"] == "provisioning"
    assert callback_api.verbs() == ["claim", "claim", "claim"]
    assert clock.sleeps == [1.0, 2.0]  # half the backoff, then doubling


def test_a_claim_still_pending_at_its_deadline_gives_up(settings, callback_api, job_id):
    callback_api.script["claim"] = [PENDING] * 50
    clock = FakeClock()
    api = CallbackApi(settings, job_id, sleep=clock.sleep, clock=clock.now)

    with pytest.raises(ApiError) as refused:
        api.claim(1)

    api.close()
    assert refused.value.code == "dispatch_pending"
    # Doubling up to 10 s apart; after 55 s another 10 s would pass the 60 s deadline.
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    assert len(callback_api.of("claim")) == 9


class CountingStop(threading.Event):
    """The heartbeat loop's stop event: records each wait and answers "stop" after `beats`."""

    def __init__(self, beats: int) -> None:
        super().__init__()
        self.beats = beats
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return len(self.waits) > self.beats


def test_the_heartbeat_loop_beats_every_interval_until_stopped(settings, callback_api, job_id):
    stop = CountingStop(beats=3)
    fenced: list[str] = []

    heartbeat_loop(
        settings=settings,
        job_id=job_id,
        read=lambda: ("configure", 60, False),
        on_fenced=fenced.append,
        stop=stop,
        log=lambda _l: None,
    )

    assert stop.waits == [20.0] * 4
    assert [c.body for c in callback_api.of("heartbeat")] == [
        {"step": "configure", "progress": 60}
    ] * 3
    assert fenced == []


def test_the_heartbeat_loop_stops_at_the_first_fenced_answer(settings, callback_api, job_id):
    callback_api.refuse_heartbeats_after = 2
    stop = CountingStop(beats=100)
    fenced: list[str] = []

    heartbeat_loop(
        settings=settings,
        job_id=job_id,
        read=lambda: ("wait-ssh", 50, False),
        on_fenced=fenced.append,
        stop=stop,
        log=lambda _l: None,
    )

    assert len(callback_api.of("heartbeat")) == 3
    assert len(stop.waits) == 3
    assert len(fenced) == 1 and "fenced_out" in fenced[0]


def test_the_heartbeat_loop_sends_nothing_once_complete_was_sent(settings, callback_api, job_id):
    stop = CountingStop(beats=5)

    heartbeat_loop(
        settings=settings,
        job_id=job_id,
        read=lambda: ("complete", 100, True),
        on_fenced=lambda _r: None,
        stop=stop,
        log=lambda _l: None,
    )

    assert callback_api.of("heartbeat") == []
    assert len(stop.waits) == 1


def test_a_simulated_provision_paces_its_steps_with_the_injected_clock(
    settings, callback_api, fake_hetzner, job_id
):
    clock = FakeClock()
    state = RunState(job_id=job_id, attempt=1, mode="provision")
    runner = Runner(settings, state, sleep=clock.sleep, clock=clock.now)
    try:
        runner.claim()
        runner.create_server()
        runner.wait_ssh()
        runner.configure()
        runner.health_check()
        runner.complete()
    finally:
        runner.close()

    assert state.completed
    # wait-ssh, configure and health-check each spread RUNNER_STEP_SECONDS over their lines.
    assert clock.slept == pytest.approx(90.0)
    assert clock.sleeps == [10.0] * 3 + [7.5] * 4 + [15.0] * 2
    steps = [c.body.get("step") for c in callback_api.of("heartbeat")]
    assert steps == ["create-server", "wait-ssh", "configure", "health-check"]
    assert callback_api.verbs()[-1] == "complete"


def test_waiting_for_a_server_that_never_starts_gives_up_at_the_timeout(settings, monkeypatch):
    clock = FakeClock()
    cloud = Cloud(settings, sleep=clock.sleep, clock=clock.now)
    starting = Vm(id="7", name="agent-x", ipv4="", location="ash", labels={}, status="starting")
    polls: list[str] = []
    monkeypatch.setattr(cloud, "get", lambda server_id: polls.append(server_id) or starting)

    with pytest.raises(CloudError, match="still 'starting' after 300s"):
        cloud.wait_running("7", timeout=300, checkpoint=lambda: None)

    # RUNNER_HCLOUD_POLL_SECONDS, then twice as long each time up to 8 of them, until past 300 s.
    assert clock.sleeps == [1.0, 2.0, 4.0] + [8.0] * 37
    assert len(polls) == 41
