"""Drive jobs through the real services to a given state (tests build state the way production does)."""

from __future__ import annotations

from provisioning import services
from provisioning.models import Agent, JobStatus, ProvisioningJob
from provisioning.services import Run
from tests.factories import AgentFactory
from tests.fakes.runner_backend import RecordingBackend


def enqueue(
    agent: Agent | None = None, *, max_retries: int | None = None, **kwargs: object
) -> ProvisioningJob:
    """A queued job. `max_retries`: made under that MAX_RETRIES, as a deploy with it would."""
    from django.test import override_settings

    if max_retries is None:
        return services.job_enqueue(agent=agent or AgentFactory(), **kwargs)  # type: ignore[arg-type]
    with override_settings(MAX_RETRIES=max_retries):
        return services.job_enqueue(agent=agent or AgentFactory(), **kwargs)  # type: ignore[arg-type]


def dispatch(job: ProvisioningJob, backend: RecordingBackend) -> Run:
    """Dispatch exactly this job (it must be the next due one) and return its run."""
    taken = services.job_dispatch_next(backend=backend)
    assert taken is not None and taken.pk == job.pk, f"expected {job.pk} to be due, got {taken}"
    run_id = backend.runs_for(job.pk)[-1]
    assert run_id is not None
    return Run(run_id=run_id, run_attempt=1)


def claimed(
    backend: RecordingBackend, agent: Agent | None = None, *, max_retries: int | None = None
) -> tuple[ProvisioningJob, Run]:
    job = enqueue(agent, max_retries=max_retries)
    run = dispatch(job, backend)
    job = services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    assert job.status == JobStatus.PROVISIONING
    return job, run


def requeue_now(job: ProvisioningJob) -> None:
    """Skip the backoff so the job is due immediately."""
    ProvisioningJob.objects.filter(pk=job.pk).update(next_attempt_at=None)


def claimed_on_last_attempt(
    backend: RecordingBackend, agent: Agent | None = None
) -> tuple[ProvisioningJob, Run]:
    """A claimed job whose earlier attempts all failed (retry_count == max_retries): its next
    failure is final. Every attempt is failed, re-dispatched and claimed through the services."""
    job, run = claimed(backend, agent)
    while job.retry_count < job.max_retries:
        services.job_fail(job_id=job.pk, run=run, error="boom", failed_step="configure")
        requeue_now(job)
        run = dispatch(job, backend)
        job = services.job_claim(job_id=job.pk, attempt=job.attempt + 1, run=run)
    return job, run
