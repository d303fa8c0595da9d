"""The queue core: every transition, allowed and refused, with its timestamps and its JobEvent."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from provisioning import selectors, services
from provisioning.errors import (
    PROVISION_IN_PROGRESS_MESSAGE,
    AgentEnded,
    DispatchPending,
    FencedOut,
    IncompleteReport,
    InvalidTransition,
    JobNotFound,
    ProvisionInProgress,
    TokenReplayed,
    UserBusy,
    WrongRun,
)
from provisioning.models import JobEvent, JobStatus, ProvisioningJob, Step
from provisioning.services import Run
from tests.factories import AgentFactory, UserFactory
from tests.provisioning.helpers import (
    claimed,
    claimed_on_last_attempt,
    dispatch,
    enqueue,
    requeue_now,
)

pytestmark = pytest.mark.django_db


def actions(job: ProvisioningJob) -> list[str]:
    return list(JobEvent.objects.filter(job=job).order_by("id").values_list("action", flat=True))


# --- enqueue ---------------------------------------------------------------------------------


def test_enqueue_creates_a_queued_job_with_an_enqueue_event():
    agent = AgentFactory(region="eu-central")

    job = services.job_enqueue(agent=agent, stripe_event_id="evt_1")

    assert job.status == JobStatus.QUEUED
    assert (job.user_id, job.region, job.attempt, job.retry_count, job.max_retries) == (
        agent.owner_id,
        "eu-central",
        1,
        0,
        3,
    )
    event = JobEvent.objects.get(job=job)
    assert (event.action, event.actor, event.to_status) == ("enqueue", "stripe", "queued")


def test_enqueue_twice_for_one_stripe_event_returns_the_first_job():
    agent = AgentFactory()
    first = services.job_enqueue(agent=agent, stripe_event_id="evt_same")

    second = services.job_enqueue(agent=agent, stripe_event_id="evt_same")

    assert second.pk == first.pk
    assert ProvisioningJob.objects.count() == 1
    assert JobEvent.objects.count() == 1


def test_a_second_paid_order_waits_in_queued_instead_of_being_refused(backend):
    user = UserFactory()
    first, _ = claimed(backend, AgentFactory(owner=user))

    second = services.job_enqueue(agent=AgentFactory(owner=user), stripe_event_id="evt_2")

    assert second.status == JobStatus.QUEUED
    assert first.status == JobStatus.PROVISIONING


def test_reprovision_is_refused_with_the_in_progress_message_while_a_job_is_active(backend):
    user = UserFactory()
    failed_agent = AgentFactory(owner=user)
    job, run = claimed(backend, failed_agent, max_retries=0)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE)
    enqueue(AgentFactory(owner=user))  # another order is queued

    with pytest.raises(ProvisionInProgress) as refused:
        services.job_reprovision(agent=failed_agent)

    assert str(refused.value) == PROVISION_IN_PROGRESS_MESSAGE
    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.FAILED


def test_reprovision_of_a_failed_agent_requeues_its_job(backend):
    job, run = claimed(backend, max_retries=0)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE)

    again = services.job_reprovision(agent=job.agent)

    assert (again.pk, again.status, again.attempt, again.retry_count) == (job.pk, "queued", 2, 0)
    assert actions(again)[-1] == "retry"


# --- dispatch --------------------------------------------------------------------------------


def test_dispatch_marks_the_job_and_records_the_run_id(backend):
    job = enqueue()

    taken = services.job_dispatch_next(backend=backend)

    assert taken is not None and taken.pk == job.pk
    assert backend.dispatched == [(str(job.pk), 1, "provision", taken.workflow_run_id)]
    assert taken.dispatched_at is not None and taken.status == JobStatus.QUEUED
    event = JobEvent.objects.get(job=job, action="dispatch")
    assert event.workflow_run_id == taken.workflow_run_id


def test_dispatch_with_nothing_due_returns_none(backend):
    assert services.job_dispatch_next(backend=backend) is None
    assert backend.dispatched == []


def test_a_failed_dispatch_leaves_the_job_queued_with_backoff_and_no_retry_spent(backend):
    job = enqueue()
    backend.fail_next = 1

    services.job_dispatch_next(backend=backend)

    job.refresh_from_db()
    assert (job.status, job.retry_count, job.dispatched_at, job.workflow_run_id) == (
        "queued",
        0,
        None,
        None,
    )
    assert job.next_attempt_at is not None and job.next_attempt_at > timezone.now()
    failed = JobEvent.objects.get(job=job, action="dispatch_failed")
    assert "502" in failed.reason
    assert services.job_dispatch_next(backend=backend) is None  # backing off
    requeue_now(job)
    assert services.job_dispatch_next(backend=backend).pk == job.pk


def test_a_users_second_job_is_not_due_while_the_first_is_freshly_dispatched(backend):
    user = UserFactory()
    first = enqueue(AgentFactory(owner=user))
    second = enqueue(AgentFactory(owner=user))
    dispatch(first, backend)

    assert list(selectors.job_list_due(now=timezone.now())) == []
    assert second.status == JobStatus.QUEUED


def test_a_users_second_job_is_not_due_while_the_first_is_provisioning(backend):
    user = UserFactory()
    claimed(backend, AgentFactory(owner=user))
    enqueue(AgentFactory(owner=user))

    assert services.job_dispatch_next(backend=backend) is None


def test_other_customers_jobs_stay_due_while_one_customer_is_busy(backend):
    claimed(backend)
    other = enqueue()

    assert services.job_dispatch_next(backend=backend).pk == other.pk


def test_an_unclaimed_dispatch_is_due_again_after_the_claim_window(backend, settings):
    job = enqueue()
    old_run = dispatch(job, backend)
    later = timezone.now() + timedelta(seconds=settings.DISPATCH_CLAIM_TIMEOUT_SECONDS + 1)

    assert list(selectors.job_list_due(now=timezone.now())) == []
    again = services.job_dispatch_next(backend=backend, now=later)

    assert again is not None and again.pk == job.pk
    assert again.workflow_run_id != old_run.run_id and again.retry_count == 0
    assert again.attempt == 1
    assert backend.cancelled == [old_run.run_id]  # the unclaimed run is stopped
    # The first run arriving late is fenced out (409), not treated as a stranger (403).
    with pytest.raises(FencedOut):
        services.job_claim(job_id=job.pk, attempt=1, run=old_run)


# --- claim -----------------------------------------------------------------------------------


def test_claim_moves_queued_to_provisioning_and_stamps_claim_and_heartbeat(backend):
    job = enqueue()
    run = dispatch(job, backend)

    claimed_job = services.job_claim(job_id=job.pk, attempt=1, run=run)

    assert claimed_job.status == JobStatus.PROVISIONING
    assert claimed_job.claimed_at is not None
    assert claimed_job.last_heartbeat_at == claimed_job.claimed_at
    assert claimed_job.run_attempt == 1 and claimed_job.step == Step.CLAIM
    event = JobEvent.objects.get(job=job, action="claim")
    assert (event.from_status, event.to_status, event.actor) == (
        "queued",
        "provisioning",
        f"workflow:{run.run_id}",
    )


def test_claim_by_a_run_never_dispatched_for_the_job_is_wrong_run(backend):
    job = enqueue()
    dispatch(job, backend)

    with pytest.raises(WrongRun):
        services.job_claim(job_id=job.pk, attempt=1, run=Run(run_id="123456"))

    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.QUEUED


def test_claim_for_another_attempt_is_fenced_out(backend):
    job = enqueue()
    run = dispatch(job, backend)

    with pytest.raises(FencedOut):
        services.job_claim(job_id=job.pk, attempt=2, run=run)


def test_claim_twice_is_refused_as_not_queued(backend):
    job, run = claimed(backend)

    with pytest.raises(InvalidTransition):
        services.job_claim(job_id=job.pk, attempt=1, run=run)


def test_claim_of_an_unknown_job_is_not_found(backend):
    with pytest.raises(JobNotFound):
        services.job_claim(
            job_id="00000000-0000-0000-0000-000000000000", attempt=1, run=Run(run_id="1")
        )


def test_claim_before_the_dispatch_recorded_its_run_id_asks_to_retry(backend):
    job = enqueue()
    ProvisioningJob.objects.filter(pk=job.pk).update(dispatched_at=timezone.now())

    with pytest.raises(DispatchPending):
        services.job_claim(job_id=job.pk, attempt=1, run=Run(run_id="777"))


def test_claim_after_a_dispatch_without_run_id_looks_the_run_up(backend, monkeypatch):
    backend.return_run_ids = False
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)
    job = enqueue()
    services.job_dispatch_next(backend=backend)
    found = backend.find_run(job_id=job.pk, attempt=1)

    with pytest.raises(WrongRun):
        services.job_claim(job_id=job.pk, attempt=1, run=Run(run_id="not-the-run"))
    claimed_job = services.job_claim(job_id=job.pk, attempt=1, run=Run(run_id=found))

    assert claimed_job.status == JobStatus.PROVISIONING and claimed_job.workflow_run_id == found


def test_a_replayed_token_is_refused(backend):
    job = enqueue()
    run = dispatch(job, backend)
    token = Run(run_id=run.run_id, jti="jti-1", expires_at=timezone.now() + timedelta(minutes=5))
    services.job_claim(job_id=job.pk, attempt=1, run=token)

    with pytest.raises(TokenReplayed):
        services.job_complete(job_id=job.pk, run=token, server_id="1", ipv4="10.0.0.1")

    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.PROVISIONING


def test_the_unique_index_refuses_a_second_provisioning_job_for_one_user(backend):
    user = UserFactory()
    first = enqueue(AgentFactory(owner=user))
    second = enqueue(AgentFactory(owner=user))
    run1 = dispatch(first, backend)
    # Force the second job onto a run as if a buggy dispatcher had sent it too.
    ProvisioningJob.objects.filter(pk=second.pk).update(workflow_run_id="555")
    services.job_claim(job_id=first.pk, attempt=1, run=run1)

    with pytest.raises(UserBusy):
        services.job_claim(job_id=second.pk, attempt=1, run=Run(run_id="555"))

    assert ProvisioningJob.objects.filter(user=user, status="provisioning").count() == 1


# --- heartbeat -------------------------------------------------------------------------------


def test_heartbeat_refreshes_the_clock_and_records_step_changes(backend):
    job, run = claimed(backend)
    before = ProvisioningJob.objects.get(pk=job.pk).last_heartbeat_at

    services.job_heartbeat(job_id=job.pk, run=run, step=Step.CREATE_SERVER, progress=20)
    services.job_heartbeat(job_id=job.pk, run=run, step=Step.CREATE_SERVER, progress=30)

    job.refresh_from_db()
    assert (job.step, job.progress) == (Step.CREATE_SERVER, 30)
    assert job.last_heartbeat_at >= before
    assert actions(job).count("step") == 1


def test_heartbeat_from_another_run_changes_nothing(backend):
    job, _run = claimed(backend)
    before = ProvisioningJob.objects.get(pk=job.pk)

    with pytest.raises(WrongRun):
        services.job_heartbeat(job_id=job.pk, run=Run(run_id="999"), progress=50)

    after = ProvisioningJob.objects.get(pk=job.pk)
    assert (after.progress, after.last_heartbeat_at) == (before.progress, before.last_heartbeat_at)


def test_heartbeat_from_another_run_attempt_is_fenced_out(backend):
    job, run = claimed(backend)

    with pytest.raises(FencedOut):
        services.job_heartbeat(job_id=job.pk, run=Run(run_id=run.run_id, run_attempt=2))


def _heartbeat_columns(job: ProvisioningJob) -> tuple[object, ...]:
    row = ProvisioningJob.objects.get(pk=job.pk)
    return (row.status, row.step, row.progress, row.last_heartbeat_at, row.updated_at)


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
def test_a_heartbeat_from_an_old_run_attempt_changes_nothing(backend, prepared):
    """A re-run of the workflow (run attempt 2) claimed the job: attempt 1, still beating with the
    same run id at the same step, is refused by the fast path's fence and writes nothing, whether
    the UPDATE goes as a prepared statement (PostgreSQL) or not."""
    with override_settings(DATABASE_PREPARED_STATEMENTS=prepared):
        job = enqueue()
        first = dispatch(job, backend)
        rerun = Run(run_id=first.run_id, run_attempt=2)
        job = services.job_claim(job_id=job.pk, attempt=job.attempt, run=rerun)
        # The current attempt's beats take the fast path, several times (a prepared statement
        # is reused from here on).
        for progress in (10, 20, 30):
            assert (
                services.job_heartbeat(job_id=job.pk, run=rerun, step=job.step, progress=progress)
                is None
            )
        before = _heartbeat_columns(job)

        with pytest.raises(FencedOut):
            services.job_heartbeat(job_id=job.pk, run=first, step=job.step, progress=90)
        with pytest.raises(FencedOut):
            services.job_heartbeat(job_id=job.pk, run=first)

        assert _heartbeat_columns(job) == before
        assert services.job_heartbeat(job_id=job.pk, run=rerun, step=job.step, progress=40) is None
        assert ProvisioningJob.objects.get(pk=job.pk).progress == 40


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
def test_a_heartbeat_after_the_job_moved_on_changes_nothing(backend, prepared):
    """The right run and attempt, but the job is no longer provisioning: the status in the fence
    refuses it."""
    with override_settings(DATABASE_PREPARED_STATEMENTS=prepared):
        job, run = claimed(backend)
        services.job_heartbeat(job_id=job.pk, run=run, step=Step.CONFIGURE, progress=50)
        services.job_heartbeat(job_id=job.pk, run=run, step=Step.CONFIGURE, progress=60)
        services.job_complete(job_id=job.pk, run=run, server_id="1", ipv4="10.0.0.1")
        before = _heartbeat_columns(job)

        with pytest.raises(InvalidTransition):
            services.job_heartbeat(job_id=job.pk, run=run, step=Step.CONFIGURE, progress=70)

        assert _heartbeat_columns(job) == before


@pytest.mark.postgres_only
def test_the_heartbeat_update_is_prepared_once_and_still_logged(backend):
    job, run = claimed(backend)
    prepared_sql = 'UPDATE "provisioning_provisioningjob" SET "last_heartbeat_at"%'

    def prepared_count() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                [prepared_sql],
            )
            return int(cursor.fetchone()[0])

    with CaptureQueriesContext(connection) as queries:
        for progress in (10, 20, 30):
            assert (
                services.job_heartbeat(job_id=job.pk, run=run, step=job.step, progress=progress)
                is None
            )

    updates = [q["sql"] for q in queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == 3
    # Logged with the values written in, as Django's own queries are (psycopg may write the
    # UUID with or without dashes).
    assert all(job.pk.hex in sql.replace("-", "") and "'provisioning'" in sql for sql in updates)
    assert prepared_count() == 1
    assert ProvisioningJob.objects.get(pk=job.pk).progress == 30


@pytest.mark.postgres_only
@override_settings(DATABASE_PREPARED_STATEMENTS=False)
def test_the_heartbeat_update_is_not_prepared_when_turned_off(backend):
    job, run = claimed(backend)
    connection.ensure_connection()
    before = connection.connection.prepare_threshold

    for progress in (10, 20):
        assert (
            services.job_heartbeat(job_id=job.pk, run=run, step=job.step, progress=progress) is None
        )

    assert connection.connection.prepare_threshold == before
    assert ProvisioningJob.objects.get(pk=job.pk).progress == 20


def test_calls_from_an_earlier_attempt_after_a_timeout_are_fenced_out(backend):
    job, run = claimed(backend)
    ProvisioningJob.objects.filter(pk=job.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(hours=1)
    )
    assert services.job_timeout_if_stale(job_id=job.pk)
    requeue_now(job)
    dispatch(job, backend)

    with pytest.raises(FencedOut):
        services.job_heartbeat(job_id=job.pk, run=run, progress=90)
    with pytest.raises(FencedOut):
        services.job_complete(job_id=job.pk, run=run, server_id="1", ipv4="10.0.0.1")
    with pytest.raises(FencedOut):
        services.job_fail(job_id=job.pk, run=run, error="late", failed_step=Step.CONFIGURE)

    job.refresh_from_db()
    assert (job.status, job.attempt, job.retry_count) == ("queued", 2, 1)


def test_heartbeat_for_a_queued_job_is_refused(backend):
    job = enqueue()
    run = dispatch(job, backend)

    with pytest.raises(InvalidTransition):
        services.job_heartbeat(job_id=job.pk, run=run)


# --- complete --------------------------------------------------------------------------------


def test_complete_makes_the_job_running_and_records_the_server(backend):
    job, run = claimed(backend)

    done = services.job_complete(
        job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7", server_name="agent-x"
    )

    assert (done.status, done.progress, done.step) == ("running", 100, "complete")
    assert done.completed_at is not None
    job.agent.refresh_from_db()
    assert (job.agent.server_id, job.agent.ipv4) == ("4711", "203.0.113.7")
    assert actions(done)[-1] == "complete"


def test_complete_repeated_by_the_same_run_changes_nothing(backend):
    job, run = claimed(backend)
    first = services.job_complete(job_id=job.pk, run=run, server_id="1", ipv4="10.0.0.1")
    events = JobEvent.objects.count()

    again = services.job_complete(job_id=job.pk, run=run, server_id="2", ipv4="10.0.0.2")

    assert again.completed_at == first.completed_at
    assert JobEvent.objects.count() == events
    job.agent.refresh_from_db()
    assert job.agent.server_id == "1"


# --- fail, retry with backoff, out of retries --------------------------------------------------


def test_fail_with_retries_left_requeues_with_backoff_and_a_new_attempt(backend, settings):
    settings.RETRY_BACKOFF_SECONDS = 30
    job, run = claimed(backend)

    failed = services.job_fail(job_id=job.pk, run=run, error="apt failed", failed_step="configure")

    assert (failed.status, failed.retry_count, failed.attempt) == ("queued", 1, 2)
    assert (failed.error, failed.failed_step) == ("apt failed", "configure")
    assert failed.completed_at is None
    delay = (failed.next_attempt_at - timezone.now()).total_seconds()
    assert 25 < delay <= 30
    event = JobEvent.objects.get(job=job, action="fail")
    assert (event.from_status, event.to_status, event.attempt, event.step) == (
        "provisioning",
        "queued",
        1,
        "configure",
    )


def test_backoff_doubles_with_each_retry(backend, settings):
    settings.RETRY_BACKOFF_SECONDS = 10
    job, run = claimed(backend)
    delays = []
    for attempt in (1, 2, 3):
        failed = services.job_fail(job_id=job.pk, run=run, error="x", failed_step="configure")
        delays.append(round((failed.next_attempt_at - timezone.now()).total_seconds()))
        assert failed.attempt == attempt + 1
        requeue_now(failed)
        run = dispatch(failed, backend)
        services.job_claim(job_id=job.pk, attempt=failed.attempt, run=run)

    assert delays == [10, 20, 40]


def test_fail_after_the_last_retry_fails_the_job_for_an_operator(backend):
    job, run = claimed_on_last_attempt(backend)
    assert (job.retry_count, job.max_retries, job.attempt) == (3, 3, 4)

    failed = services.job_fail(job_id=job.pk, run=run, error="quota", failed_step="create-server")

    assert (failed.status, failed.retry_count, failed.attempt) == ("failed", 3, 4)
    assert failed.completed_at is not None
    assert JobEvent.objects.filter(job=job, action="fail").last().to_status == "failed"


def test_fail_repeated_by_the_same_run_changes_nothing(backend):
    job, run = claimed(backend)
    first = services.job_fail(job_id=job.pk, run=run, error="x", failed_step="configure")

    again = services.job_fail(job_id=job.pk, run=run, error="x", failed_step="configure")

    assert (again.status, again.attempt, again.retry_count) == (
        first.status,
        first.attempt,
        first.retry_count,
    )
    assert actions(job).count("fail") == 1


# --- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("clock", ["last_heartbeat_at", "claimed_at", "updated_at"])
def test_timeout_measures_silence_from_heartbeat_else_claim_else_update(backend, settings, clock):
    settings.JOB_TIMEOUT_SECONDS = 900
    job, _run = claimed(backend)
    now = timezone.now()
    old, fresh = now - timedelta(seconds=901), now - timedelta(seconds=10)
    values = {"last_heartbeat_at": None, "claimed_at": None, "updated_at": fresh}
    # Only the clock under test is old; the fallbacks behind it are absent or fresh.
    values[clock] = old
    ProvisioningJob.objects.filter(pk=job.pk).update(**values)

    assert services.job_timeout_if_stale(job_id=job.pk, now=now) is True

    job.refresh_from_db()
    assert (job.status, job.failed_step, job.retry_count) == ("queued", "timeout", 1)
    assert JobEvent.objects.get(job=job, action="timeout").actor == "system"


def test_a_fresh_heartbeat_hides_an_old_claim_from_the_timeout(backend):
    job, _run = claimed(backend)
    now = timezone.now()
    ProvisioningJob.objects.filter(pk=job.pk).update(
        claimed_at=now - timedelta(hours=2) + timedelta(minutes=70),
        last_heartbeat_at=now - timedelta(seconds=5),
    )

    assert services.job_timeout_if_stale(job_id=job.pk, now=now) is False


def test_an_attempt_past_its_deadline_times_out_despite_fresh_heartbeats(backend, settings):
    settings.JOB_DEADLINE_SECONDS = 3600
    job, _run = claimed(backend)
    now = timezone.now()
    ProvisioningJob.objects.filter(pk=job.pk).update(
        claimed_at=now - timedelta(seconds=3601), last_heartbeat_at=now
    )

    assert services.job_timeout_if_stale(job_id=job.pk, now=now) is True
    assert "deadline" in ProvisioningJob.objects.get(pk=job.pk).error


def test_a_queued_job_never_times_out(backend):
    job = enqueue()
    ProvisioningJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(days=2))

    assert services.job_timeout_if_stale(job_id=job.pk) is False
    assert services.job_timeout_stale() == 0


def test_the_sweep_times_out_only_stale_jobs_and_cancels_their_runs(
    backend, django_capture_on_commit_callbacks, monkeypatch
):
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)
    stale, stale_run = claimed(backend)
    live, _ = claimed(backend)
    ProvisioningJob.objects.filter(pk=stale.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(hours=1)
    )

    with django_capture_on_commit_callbacks(execute=True):
        assert services.job_timeout_stale() == 1

    assert ProvisioningJob.objects.get(pk=stale.pk).status == JobStatus.QUEUED
    assert ProvisioningJob.objects.get(pk=live.pk).status == JobStatus.PROVISIONING
    assert backend.cancelled == [stale_run.run_id]


def test_timeout_out_of_retries_fails_the_job(backend):
    job, _ = claimed_on_last_attempt(backend)
    ProvisioningJob.objects.filter(pk=job.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(hours=1)
    )

    services.job_timeout_stale()

    job.refresh_from_db()
    assert (job.status, job.failed_step) == ("failed", "timeout")
    assert job.completed_at is not None


# --- operator actions --------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["queued", "provisioning"])
def test_cancel_fails_an_active_job_and_cancels_its_run(
    backend, state, django_capture_on_commit_callbacks, monkeypatch
):
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)
    if state == "queued":
        job = enqueue()
        run = dispatch(job, backend)
    else:
        job, run = claimed(backend)

    with django_capture_on_commit_callbacks(execute=True):
        cancelled = services.job_cancel(job_id=job.pk, actor="operator:alice")

    assert (cancelled.status, cancelled.failed_step) == ("failed", "cancelled")
    assert backend.cancelled == [run.run_id]
    event = JobEvent.objects.get(job=job, action="cancel")
    assert (event.actor, event.from_status, event.to_status) == ("operator:alice", state, "failed")


def test_cancel_of_a_finished_job_is_refused_and_changes_nothing(backend):
    job, run = claimed(backend)
    services.job_complete(job_id=job.pk, run=run, server_id="1", ipv4="10.0.0.1")

    with pytest.raises(InvalidTransition):
        services.job_cancel(job_id=job.pk, actor="operator:alice")

    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.RUNNING
    assert "cancel" not in actions(job)


def test_operator_retry_requeues_a_failed_job_with_fresh_retries(backend):
    job, run = claimed_on_last_attempt(backend)
    services.job_fail(job_id=job.pk, run=run, error="quota", failed_step="create-server")

    retried = services.job_retry(job_id=job.pk, actor="operator:bob")

    assert (retried.status, retried.attempt, retried.retry_count) == ("queued", 5, 0)
    assert (retried.completed_at, retried.error, retried.failed_step) == (None, "", "")
    event = JobEvent.objects.get(job=job, action="retry")
    assert (event.actor, event.from_status, event.to_status) == ("operator:bob", "failed", "queued")


@pytest.mark.parametrize("state", ["queued", "provisioning", "running"])
def test_operator_retry_of_a_job_that_has_not_failed_is_refused(backend, state):
    if state == "queued":
        job = enqueue()
    else:
        job, run = claimed(backend)
        if state == "running":
            services.job_complete(job_id=job.pk, run=run, server_id="1", ipv4="10.0.0.1")

    with pytest.raises(InvalidTransition):
        services.job_retry(job_id=job.pk, actor="operator:bob")

    assert ProvisioningJob.objects.get(pk=job.pk).status == state


def test_redispatch_makes_an_unclaimed_job_due_now(backend, monkeypatch):
    monkeypatch.setattr("provisioning.backends.get_backend", lambda: backend)
    job = enqueue()
    dispatch(job, backend)

    services.job_redispatch(job_id=job.pk, actor="operator:carol")

    assert services.job_dispatch_next(backend=backend).pk == job.pk
    assert "redispatch" in actions(job)


# --- selectors ---------------------------------------------------------------------------------


def test_latest_job_of_an_agent_is_the_newest(backend):
    agent = AgentFactory()
    old = enqueue(agent)
    services.job_cancel(job_id=old.pk, actor="operator:x")
    new = services.job_enqueue(agent=agent, actor="operator:x")

    assert selectors.job_get_latest_for_agent(agent_id=agent.pk).pk == new.pk
    assert selectors.job_get_by_stripe_event_id(stripe_event_id="nope") is None


def test_queue_position_counts_older_queued_jobs(backend):
    first, second = enqueue(), enqueue()

    assert selectors.job_queue_position(job=first) == 1
    assert selectors.job_queue_position(job=second) == 2


# --- ending an agent (deprovision) ---------------------------------------------------------------


def test_ending_a_running_agent_queues_one_deprovision_job(backend):
    job, run = claimed(backend)
    services.job_complete(job_id=job.pk, run=run, server_id="7", ipv4="10.0.0.7")

    first = services.agent_end(
        agent_id=job.agent_id, actor="stripe", reason="subscription ended", stripe_event_id="evt_e"
    )
    again = services.agent_end(
        agent_id=job.agent_id, actor="stripe", reason="subscription ended", stripe_event_id="evt_e"
    )
    other = services.agent_end(
        agent_id=job.agent_id, actor="stripe", reason="refund", stripe_event_id="evt_r"
    )

    assert first.pk == again.pk == other.pk
    assert (first.kind, first.status) == ("deprovision", "queued")
    job.agent.refresh_from_db()
    assert job.agent.is_ended and job.agent.end_reason == "subscription ended"
    assert ProvisioningJob.objects.filter(agent=job.agent, kind="deprovision").count() == 1


def test_ending_an_agent_still_provisioning_cancels_the_build_first(backend):
    job, _run = claimed(backend)

    deprovision = services.agent_end(agent_id=job.agent_id, actor="operator:ann", reason="abuse")

    job.refresh_from_db()
    assert (job.status, job.failed_step) == ("failed", "cancelled")
    assert deprovision.status == "queued"
    assert list(
        JobEvent.objects.filter(job__agent=job.agent)
        .order_by("id")
        .values_list("action", flat=True)
    )[-2:] == ["cancel", "enqueue"]


def test_a_deprovision_completes_by_clearing_the_server(backend):
    job, run = claimed(backend)
    services.job_complete(job_id=job.pk, run=run, server_id="7", ipv4="10.0.0.7")
    deprovision = services.agent_end(agent_id=job.agent_id, actor="stripe", reason="refund")
    drun = dispatch(deprovision, backend)
    assert backend.dispatched[-1][2] == "deprovision"
    services.job_claim(job_id=deprovision.pk, attempt=1, run=drun)

    services.job_complete(job_id=deprovision.pk, run=drun, server_id="", ipv4="")

    job.agent.refresh_from_db()
    assert (job.agent.server_id, job.agent.ipv4) == ("", None)
    with pytest.raises(AgentEnded):
        services.job_reprovision(agent=job.agent)


def test_a_provision_cannot_complete_without_its_server(backend):
    job, run = claimed(backend)

    with pytest.raises(IncompleteReport):
        services.job_complete(job_id=job.pk, run=run, server_id="", ipv4="")

    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.PROVISIONING
