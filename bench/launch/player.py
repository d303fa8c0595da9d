"""What a workflow run does once the fake GitHub gives it a slot: the runner's own pipeline
(provisioning/runner), in this process, with the environment a workflow step would have.

Each run mints real OIDC tokens from the development issuer (its `run_id` claim is the fake
GitHub's run id), calls the real callback API (claim, heartbeats, step reports, complete or
fail) and makes its Hetzner calls with the runner's own `hcloud` code against the fake Hetzner.
The VM's configuration is simulated (RUNNER_SIMULATE=1): wait-ssh, configure and health-check
each take RUNNER_STEP_SECONDS.

A chosen share of first attempts fails once at a random step (RUNNER_FAIL_STEP for that run).
The runner prints its log to stderr: the simulation sends stderr to a file while it runs.
"""

from __future__ import annotations

import random
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.launch.fake_github import FakeRun
from provisioning.runner import api as runner_api
from provisioning.runner import pipeline
from provisioning.runner.config import Settings
from provisioning.runner.outcomes import EXIT_OK
from provisioning.runner.state import RunState

FAIL_STEPS = ("create-server", "wait-ssh", "configure", "health-check", "complete")

_TLS = httpx.create_ssl_context()


class _SharedTlsClient(httpx.Client):
    """httpx.Client with one TLS context for every run of this process. Each workflow step on
    GitHub is its own process and pays for loading the CA bundle (~20-40 ms of CPU) once; a
    thousand runs inside one process would pay it twice per run for nothing (every URL here is
    plain-HTTP loopback), and on 2 cores that alone would slow the server under test."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("verify", _TLS)
        super().__init__(*args, **kwargs)


def share_tls_context() -> None:
    """Make the runner's callback clients (provisioning/runner/api.py) share one TLS context."""
    shim = types.SimpleNamespace(**{**vars(httpx), "Client": _SharedTlsClient})
    runner_api.httpx = shim  # type: ignore[assignment]


@dataclass
class Player:
    """`__call__(run)` plays one run and returns its conclusion (the fake GitHub's player)."""

    api_url: str
    token_request_url: str  # the issuer's /token, without the query
    token_request_token: str
    hetzner_url: str
    env: Mapping[str, str]  # RUNNER_* pacing, already divided by the time factor
    fail_share: float = 0.05
    seed: int = 15
    # what the simulation reads
    failures_planned: dict[str, str] = field(default_factory=dict)  # job id -> step
    played: dict[str, int] = field(default_factory=dict)  # mode -> runs played
    exit_codes: dict[int, int] = field(default_factory=dict)  # run id -> exit code

    def __post_init__(self) -> None:
        share_tls_context()
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self._decided: set[str] = set()

    def _fail_step(self, run: FakeRun) -> str | None:
        """Whether this job's first attempt fails, and where (decided once per job)."""
        if run.mode != "provision" or run.attempt != 1:
            return None
        with self._lock:
            if run.job_id not in self._decided:
                self._decided.add(run.job_id)
                if self._rng.random() < self.fail_share:
                    self.failures_planned[run.job_id] = self._rng.choice(FAIL_STEPS)
            return self.failures_planned.get(run.job_id)

    def settings_for(self, run: FakeRun) -> Settings:
        env = {
            **self.env,
            "PROVISIONING_API_URL": self.api_url,
            "PROVISIONING_OIDC_AUDIENCE": "agent-provisioning",
            "ACTIONS_ID_TOKEN_REQUEST_URL": (
                f"{self.token_request_url}?run_id={run.id}&run_attempt=1"
            ),
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": self.token_request_token,
            "HCLOUD_TOKEN": "launch-fake-token",
            "HCLOUD_API_ENDPOINT": self.hetzner_url,
            "RUNNER_SIMULATE": "1",
        }
        step = self._fail_step(run)
        if step:
            env["RUNNER_FAIL_STEP"] = step
        return Settings.from_env(env)

    def __call__(self, run: FakeRun) -> str:
        settings = self.settings_for(run)
        state = RunState(job_id=run.job_id, attempt=run.attempt, mode=run.mode)
        play = {
            "provision": pipeline.run_provision,
            "deprovision": pipeline.run_deprovision,
            "cleanup": pipeline.run_cleanup,
        }[run.mode]
        code = play(settings, state)
        with self._lock:
            self.played[run.mode] = self.played.get(run.mode, 0) + 1
            self.exit_codes[run.id] = code
        return "success" if code == EXIT_OK else "failure"
