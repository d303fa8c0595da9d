"""`make run`'s banner says which failure knob is on, and when a killed runner's timeout is too
long to watch."""

from __future__ import annotations

from provisioning.management.commands.run_local_stack import knob_lines


def text() -> str:
    return "\n".join(knob_lines())


def test_no_knob_says_so_and_how_to_turn_one_on(settings):
    settings.LOCAL_RUNNER_FAIL_STEP = ""
    settings.LOCAL_RUNNER_KILL_AT_STEP = ""

    assert "failure knob: none" in text()
    assert "LOCAL_RUNNER_FAIL_STEP=configure" in text()


def test_the_fail_knob_is_named_with_its_step(settings):
    settings.LOCAL_RUNNER_FAIL_STEP = "configure"
    settings.LOCAL_RUNNER_KILL_AT_STEP = ""

    assert "failure knob ON: LOCAL_RUNNER_FAIL_STEP=configure" in text()
    assert "KILL_AT_STEP" not in text()


def test_the_kill_knob_asks_for_a_short_timeout_when_the_timeout_is_long(settings):
    settings.LOCAL_RUNNER_FAIL_STEP = ""
    settings.LOCAL_RUNNER_KILL_AT_STEP = "wait-ssh"
    settings.JOB_TIMEOUT_SECONDS = 900

    assert "failure knob ON: LOCAL_RUNNER_KILL_AT_STEP=wait-ssh" in text()
    assert "start with JOB_TIMEOUT_SECONDS=30" in text()

    settings.JOB_TIMEOUT_SECONDS = 30
    assert "JOB_TIMEOUT_SECONDS=30 to" not in text()
    assert "after 30s of silence" in text()
