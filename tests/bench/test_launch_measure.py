"""The launch simulation's figures (bench/launch/measure.py) on hand-made histories."""

from __future__ import annotations

import math

from bench.launch.measure import (
    JobTimes,
    arrival_floor,
    attempt_seconds,
    build_seconds,
    busiest_window,
    eta_errors,
    floor_seconds,
    handoff_seconds,
    inversions,
    run_seconds,
)


def _job(
    name: str,
    user: int,
    created: float,
    dispatched: list[float],
    running: float | None,
    claims: list[tuple[int, float]] | None = None,
    completes: list[tuple[int, float]] | None = None,
) -> JobTimes:
    return JobTimes(
        id=name,
        user_id=user,
        agent_id=f"agent-{name}",
        status="running" if running else "queued",
        created=created,
        retry_count=0,
        dispatched=dispatched,
        claims=claims or [],
        completes=completes or [],
        running=running,
    )


def test_a_later_order_running_before_the_earlier_one_was_dispatched_is_an_inversion():
    kept = [_job("a1", 1, 0, [1], 10), _job("a2", 1, 1, [10.5], 20)]
    assert inversions(kept) == 0
    swapped = [_job("b1", 2, 0, [30], 40), _job("b2", 2, 1, [2], 12)]
    assert inversions(swapped) == 1
    never = [_job("c1", 3, 0, [], None), _job("c2", 3, 1, [2], 12)]
    assert inversions(never) == 1
    other_customers = [_job("d1", 4, 0, [30], 40), _job("e1", 5, 1, [2], 12)]
    assert inversions(other_customers) == 0


def test_build_seconds_pair_each_complete_with_its_own_attempts_claim():
    job = _job("a", 1, 0, [0, 5], 20, claims=[(1, 1.0), (2, 6.0)], completes=[(2, 20.0)])
    assert build_seconds([job]) == [14.0]


def test_attempt_seconds_count_failed_attempts_too():
    job = _job("a", 1, 0, [0, 5], 20, claims=[(1, 1.0), (2, 6.0)], completes=[(2, 20.0)])
    job.fails = [(1, 3.5)]
    assert sorted(attempt_seconds([job])) == [2.5, 14.0]


def test_eta_error_is_relative_to_the_wait_from_payment():
    job = _job("a", 1, 0, [0], 110.0)
    # paid at 10, predicted ready at 90 (80 s), ready at 110 (100 s): 20 % off
    assert eta_errors({"agent-a": (10.0, 90.0)}, [job]) == [0.2]
    assert eta_errors({}, [job]) == []


def test_floors():
    assert floor_seconds(1000, 20, 3.0) == 150.0
    assert floor_seconds(1001, 20, 3.0) == 153.0
    # all paid at once: the N/C floor
    assert arrival_floor([(c, 0.0) for c in range(40)], 20, 3.0) == 6.0
    # the last 20 paid at 10: two rounds are not enough, they start at 10
    paid = [(c, 0.0) for c in range(20)] + [(c, 10.0) for c in range(20, 40)]
    assert arrival_floor(paid, 20, 3.0) == 13.0
    # one customer's three orders, one after another
    assert arrival_floor([(7, 0.0), (7, 0.0), (7, 1.0)], 20, 3.0) == 9.0
    assert arrival_floor([], 20, 3.0) == 0.0


def test_busiest_window_slides():
    assert busiest_window([0, 1, 2, 10, 10.5, 11, 11.2], 2.0) == 4
    assert busiest_window([], 1.0) == 0
    assert math.isclose(busiest_window([5, 0, 1], 1.0), 2)


def test_run_seconds_take_successful_provision_runs_from_start_to_end():
    from types import SimpleNamespace as Run

    runs = [
        Run(mode="provision", conclusion="success", started_mono=10.0, completed_mono=13.5),
        Run(mode="provision", conclusion="failure", started_mono=10.0, completed_mono=11.0),
        Run(mode="deprovision", conclusion="success", started_mono=10.0, completed_mono=10.5),
        Run(mode="provision", conclusion="success", started_mono=None, completed_mono=None),
        Run(mode="provision", conclusion="success", started_mono=20.0, completed_mono=22.0),
    ]
    assert run_seconds(runs) == [3.5, 2.0]


def test_handoff_seconds_pair_each_end_with_the_next_dispatch():
    from types import SimpleNamespace as Run

    runs = [
        Run(dispatched_mono=0.0, completed_mono=10.0),
        Run(dispatched_mono=0.5, completed_mono=12.0),
        Run(dispatched_mono=10.25, completed_mono=20.0),
        Run(dispatched_mono=12.5, completed_mono=None),
    ]
    assert handoff_seconds(runs) == [0.25, 0.5]  # the run ending at 20 had no successor
