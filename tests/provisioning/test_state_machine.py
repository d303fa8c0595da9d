"""Random sequences of the real services: the status only ever makes moves the transition table
allows, and the JobEvent history accounts for every change."""

from __future__ import annotations

import contextlib
from datetime import timedelta

from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra.django import TestCase
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from provisioning import services
from provisioning.errors import ProvisioningError
from provisioning.models import JobEvent, JobStatus, ProvisioningJob, Step, can_transition
from provisioning.services import Run
from tests.factories import AgentFactory
from tests.fakes.runner_backend import RecordingBackend

STEPS = [s.value for s in Step]


class JobLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        ProvisioningJob.objects.all().delete()  # one job per example: dispatch takes only ours
        self.backend = RecordingBackend()
        self.job = services.job_enqueue(agent=AgentFactory(), actor="system")
        self.runs: list[Run] = []  # every run ever dispatched for the job, newest last
        self.status = JobStatus.QUEUED
        self.changes = 0

    def _call(self, fn, **kwargs):
        # A refusal must change nothing; the invariants check that.
        with contextlib.suppress(ProvisioningError):
            fn(**kwargs)

    def _run(self, which: int) -> Run:
        if not self.runs:
            return Run(run_id="never-dispatched")
        return self.runs[min(which, len(self.runs) - 1)]

    @rule()
    def dispatch(self) -> None:
        taken = services.job_dispatch_next(backend=self.backend)
        if taken is not None and taken.workflow_run_id:
            self.runs.append(Run(run_id=taken.workflow_run_id))

    @rule(which=st.integers(0, 5), attempt_delta=st.sampled_from([0, 0, 0, -1, 1]))
    def claim(self, which: int, attempt_delta: int) -> None:
        attempt = ProvisioningJob.objects.get(pk=self.job.pk).attempt + attempt_delta
        self._call(services.job_claim, job_id=self.job.pk, attempt=attempt, run=self._run(which))

    @rule(which=st.integers(0, 5), step=st.sampled_from(STEPS), progress=st.integers(0, 100))
    def heartbeat(self, which: int, step: str, progress: int) -> None:
        self._call(
            services.job_heartbeat,
            job_id=self.job.pk,
            run=self._run(which),
            step=step,
            progress=progress,
        )

    @rule(which=st.integers(0, 5))
    def complete(self, which: int) -> None:
        self._call(
            services.job_complete,
            job_id=self.job.pk,
            run=self._run(which),
            server_id="1",
            ipv4="10.0.0.1",
        )

    @rule(which=st.integers(0, 5), step=st.sampled_from(["configure", "create-server"]))
    def fail(self, which: int, step: str) -> None:
        self._call(
            services.job_fail, job_id=self.job.pk, run=self._run(which), error="x", failed_step=step
        )

    @rule()
    def go_silent_and_sweep(self) -> None:
        ProvisioningJob.objects.filter(pk=self.job.pk).update(
            last_heartbeat_at=timezone.now() - timedelta(days=1)
        )
        services.job_timeout_stale()

    @rule()
    def time_passes(self) -> None:
        ProvisioningJob.objects.filter(pk=self.job.pk).update(
            next_attempt_at=None,
            dispatched_at=timezone.now() - timedelta(days=1),
        )

    @rule()
    def cancel(self) -> None:
        self._call(services.job_cancel, job_id=self.job.pk, actor="operator:prop")

    @rule()
    def retry(self) -> None:
        self._call(services.job_retry, job_id=self.job.pk, actor="operator:prop")

    @rule()
    def redispatch(self) -> None:
        self._call(services.job_redispatch, job_id=self.job.pk, actor="operator:prop")

    @invariant()
    def moves_follow_the_table_and_events_account_for_them(self) -> None:
        job = ProvisioningJob.objects.get(pk=self.job.pk)
        if job.status != self.status:
            assert can_transition(self.status, job.status), f"{self.status} -> {job.status}"
            self.changes += 1
            self.status = job.status
        moves = list(
            JobEvent.objects.filter(job=job)
            .order_by("created_at", "id")
            .exclude(from_status="")
            .exclude(to_status="")
            .values_list("from_status", "to_status")
        )
        assert len(moves) == self.changes
        chain = JobStatus.QUEUED
        for before, after in moves:
            assert before == chain, moves
            assert can_transition(before, after)
            chain = after
        assert chain == job.status
        assert job.retry_count <= job.max_retries
        assert (job.completed_at is not None) == (job.status in (JobStatus.RUNNING, "failed"))


class TestJobLifecycle(TestCase):
    def test_random_sequences_of_services_obey_the_state_machine(self) -> None:
        run_state_machine_as_test(
            JobLifecycle,
            settings=settings(
                max_examples=30,
                stateful_step_count=25,
                database=None,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
