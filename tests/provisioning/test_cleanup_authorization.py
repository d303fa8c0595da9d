"""A `mode: cleanup` run deletes VMs only after the service approves it: the job's own cleanup
run, for a failed provision that was claimed. Any other run gets a refusal and deletes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from provisioning import services
from provisioning.models import Agent, JobEvent, ProvisioningJob, UsedTokenId
from tests.fakes.oidc import bearer
from tests.provisioning.helpers import claimed, enqueue

pytestmark = pytest.mark.django_db


def ask(job_id: Any, token: str) -> Any:
    return APIClient().post(f"/api/v1/jobs/{job_id}/cleanup-authorization", **bearer(token))


def snapshot(job: ProvisioningJob) -> tuple[Any, ...]:
    return (
        ProvisioningJob.objects.values().get(pk=job.pk),
        Agent.objects.values().get(pk=job.agent_id),
        JobEvent.objects.filter(job_id=job.pk).count(),
        UsedTokenId.objects.count(),
    )


@pytest.fixture
def cleaned(backend) -> tuple[ProvisioningJob, str, str]:
    """A claimed provision cancelled by an operator, its cleanup run sent: (job, provision run,
    cleanup run)."""
    job, run = claimed(backend)
    services.job_cancel(job_id=job.pk, actor="operator:test")
    assert services.job_send_cleanup(backend=backend) == 1
    job.refresh_from_db()
    assert job.cleanup_run_id and job.cleanup_run_id != run.run_id
    return job, run.run_id, job.cleanup_run_id


def test_the_jobs_own_cleanup_run_is_approved_and_the_approval_is_recorded(oidc_issuer, cleaned):
    job, _provision_run, cleanup_run = cleaned

    answer = ask(job.pk, oidc_issuer.mint(run_id=cleanup_run))

    assert answer.status_code == 200, answer.json()
    assert answer.json() == {
        "id": str(job.pk),
        "approved": True,
        "label_selector": f"job-id={job.pk}",
    }
    note = JobEvent.objects.filter(job=job, action=JobEvent.Action.NOTE).get()
    assert (note.actor, note.workflow_run_id) == (f"workflow:{cleanup_run}", cleanup_run)


@pytest.mark.parametrize("who", ["provision run", "stranger"])
def test_any_other_run_is_refused_and_nothing_changes(oidc_issuer, cleaned, who):
    job, provision_run, _cleanup_run = cleaned
    run_id = provision_run if who == "provision run" else "987654321"
    before = snapshot(job)

    answer = ask(job.pk, oidc_issuer.mint(run_id=run_id))

    assert answer.status_code == 403
    assert answer.json()["code"] == "wrong_run"
    assert snapshot(job) == before


def test_a_running_agent_can_never_be_cleaned_up(oidc_issuer, backend):
    job, run = claimed(backend)
    services.job_complete(job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7")
    before = snapshot(job)

    answer = ask(job.pk, oidc_issuer.mint(run_id=run.run_id))

    assert answer.status_code == 409
    assert answer.json()["code"] == "cleanup_not_allowed"
    assert snapshot(job) == before


def test_a_job_never_claimed_has_no_vm_to_clean_up(oidc_issuer, backend):
    job = enqueue()
    services.job_cancel(job_id=job.pk, actor="operator:test")
    before = snapshot(job)

    answer = ask(job.pk, oidc_issuer.mint(run_id="123"))

    assert answer.status_code == 409
    assert answer.json()["code"] == "cleanup_not_allowed"
    assert snapshot(job) == before


def test_a_token_approves_once(oidc_issuer, cleaned):
    job, _provision_run, cleanup_run = cleaned
    token = oidc_issuer.mint(run_id=cleanup_run)
    assert ask(job.pk, token).status_code == 200

    again = ask(job.pk, token)

    assert again.status_code == 409
    assert again.json()["code"] == "token_replayed"


def test_no_such_job_is_404(oidc_issuer, db):
    answer = ask("00000000-0000-4000-8000-000000000000", oidc_issuer.mint(run_id="1"))

    assert answer.status_code == 404


def test_the_claim_says_what_the_run_was_dispatched_to_do(oidc_issuer, backend):
    job = enqueue()
    services.job_dispatch_next(backend=backend)
    run_id = backend.runs_for(job.pk)[-1]

    answer = APIClient().post(
        f"/api/v1/jobs/{job.pk}/claim",
        {"attempt": 1},
        format="json",
        **bearer(oidc_issuer.mint(run_id=run_id)),
    )

    assert answer.status_code == 200
    assert answer.json()["kind"] == "provision"
