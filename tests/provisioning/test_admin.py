"""The operator console: pages render for staff only, actions go through services and are
recorded with the operator's name, stale jobs stand out, and the jobs list stays constant-query."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from provisioning import backends, services
from provisioning.admin.common import EstimatedCountPaginator
from provisioning.admin.jobs import ProvisioningJobAdmin
from provisioning.models import Actor, JobEvent, JobKind, JobStatus, ProvisioningJob, Step
from tests.factories import AgentFactory, JobFactory, UserFactory
from tests.provisioning.helpers import claimed, dispatch, enqueue, requeue_now

pytestmark = pytest.mark.django_db

JOBS = reverse("admin:provisioning_provisioningjob_changelist")
VIEW_PERMS = ["view_provisioningjob", "view_agent", "view_jobevent"]
ACTION_PERMS = ["retry_job", "cancel_job", "timeout_job", "redispatch_job"]


def staff(username: str, *codenames: str):
    user = UserFactory(username=username, is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="provisioning", codename__in=codenames)
    )
    return user


@pytest.fixture
def operator(client):
    user = staff("alice", *VIEW_PERMS, *ACTION_PERMS)
    client.force_login(user)
    return user


@pytest.fixture
def viewer(client):
    user = staff("victor", *VIEW_PERMS)
    client.force_login(user)
    return user


@pytest.fixture
def installed_backend(backend):
    """The recording backend as the process's backend, so after-commit cancels land in it."""
    backends.set_backend(backend)
    yield backend
    backends.reset_backend()


def failed_job(**kwargs) -> ProvisioningJob:
    defaults = {
        "status": JobStatus.FAILED,
        "failed_step": Step.CONFIGURE,
        "error": "ansible: task [install agent] failed\nexit 2",
        "retry_count": 3,
        "max_retries": 3,
        "attempt": 4,
        "completed_at": timezone.now(),
    }
    return JobFactory(**{**defaults, **kwargs})


def act(client, action: str, *jobs: ProvisioningJob, confirm: bool = False):
    data = {"action": action, "_selected_action": [str(j.pk) for j in jobs]}
    if confirm:
        data["post"] = "yes"
    else:
        data["index"] = "0"
    return client.post(JOBS, data, follow=True)


def flash(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def offered_actions(page) -> list[str]:
    form = page.context["action_form"]
    if form is None:  # no action at all for this user
        return []
    return [value for value, _label in form.fields["action"].choices if value]


# --- pages render --------------------------------------------------------------------------


def test_jobs_list_renders_the_overview_and_every_column(admin_client, backend):
    job, _run = claimed(backend)
    failed_job()
    enqueue()

    response = admin_client.get(JOBS)

    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="job-overview"' in html
    assert "oldest queued" in html
    assert 'class="job-badge job-provisioning"' in html
    assert 'class="job-badge job-failed"' in html
    assert job.short_id in html
    assert job.user.email in html
    assert "0 of 3" in html
    assert "✗ configure" in html
    counts = {s.status: s.count for s in response.context["overview"]["statuses"]}
    assert counts == {"queued": 1, "provisioning": 1, "running": 0, "failed": 1}


@pytest.mark.parametrize(
    "query",
    [
        "status__exact=failed",
        "stale=yes",
        "kind__exact=deprovision",
        "region__exact=eu-central",
        "failed_step__exact=configure",
        "created_at__gte=2000-01-01+00:00:00%2B00:00",
        "status__exact=queued&o=6",
    ],
)
def test_every_filter_renders(admin_client, query):
    failed_job()

    response = admin_client.get(f"{JOBS}?{query}")

    assert response.status_code == 200
    assert "?e=1" not in response.get("Location", "")


def test_the_failed_filter_lists_only_failed_jobs(admin_client):
    failed = failed_job()
    queued = JobFactory()

    html = admin_client.get(f"{JOBS}?status__exact=failed").content.decode()

    assert failed.short_id in html
    assert queued.short_id not in html


@pytest.mark.parametrize(
    "term",
    ["job_id", "short_id", "stripe_event", "run_id", "email", "agent_name", "checkout_session"],
)
def test_search_finds_a_job_by(admin_client, term):
    owner = UserFactory(username="dora", email="dora.marquez@example.org")
    agent = AgentFactory(owner=owner, name="marketing-bot", stripe_checkout_session_id="cs_test_x1")
    job = JobFactory(agent=agent, stripe_event_id="evt_1Abc", workflow_run_id="17761234567")
    other = JobFactory()
    value = {
        "job_id": str(job.pk),
        "short_id": job.short_id,
        "stripe_event": "evt_1Abc",
        "run_id": "17761234567",
        "email": "MARQUEZ@example",
        "agent_name": "keting-b",
        "checkout_session": "cs_test_x1",
    }[term]

    response = admin_client.get(JOBS, {"q": value})

    html = response.content.decode()
    assert response.status_code == 200
    assert job.short_id in html
    assert other.short_id not in html


def test_search_never_adds_distinct(admin_client):
    JobFactory()

    with CaptureQueriesContext(connection) as queries:
        admin_client.get(JOBS, {"q": "example"})

    assert not any("DISTINCT" in q["sql"].upper() for q in queries.captured_queries)


def test_job_page_shows_the_error_in_full_the_timeline_and_links(admin_client, backend):
    job, run = claimed(backend)
    services.job_fail(job_id=job.pk, run=run, error="boom\n" + "x" * 3000, failed_step="configure")

    response = admin_client.get(reverse("admin:provisioning_provisioningjob_change", args=[job.pk]))

    html = response.content.decode()
    assert response.status_code == 200
    assert '<pre class="job-error job-output-tail">boom' in html  # attempt 1's panel
    assert "x" * 3000 in html
    assert html.count("x" * 3000) == 1  # in the panel only, not pasted into the timeline too
    assert 'id="job-timeline"' in html
    for action in ["Enqueued", "Dispatched", "Claimed", "Failed"]:
        assert action in html
    assert f"workflow:{run.run_id}" in html
    assert reverse("admin:provisioning_agent_change", args=[job.agent_id]) in html
    assert "stripe" in html.lower()
    assert 'name="status"' not in html  # nothing is editable


def test_job_page_links_the_stripe_event_to_dj_stripes_admin(admin_client):
    from djstripe.models import Event

    event = Event.objects.create(id="evt_linked", type="checkout.session.completed", data={})
    job = JobFactory(stripe_event_id="evt_linked")

    html = admin_client.get(
        reverse("admin:provisioning_provisioningjob_change", args=[job.pk])
    ).content.decode()

    assert reverse("admin:djstripe_event_change", args=[event.pk]) in html


def test_the_list_links_each_job_to_its_github_run(admin_client):
    from provisioning.backends.github import GitHubBackend

    JobFactory(workflow_run_id="17761234567")
    github = GitHubBackend(
        repository="acme/agents",
        workflow_file="provision.yml",
        ref="main",
        app_id="1",
        installation_id="2",
        private_key="unused: no request is made",
    )
    backends.set_backend(github)
    try:
        html = admin_client.get(JOBS).content.decode()
    finally:
        backends.reset_backend()
        github.close()

    assert "https://github.com/acme/agents/actions/runs/17761234567" in html


def test_a_backend_that_cannot_be_built_leaves_the_run_id_unlinked(admin_client, settings):
    settings.PROVISIONING_RUNNER = "nonsense"
    backends.reset_backend()
    JobFactory(workflow_run_id="17761234567")

    response = admin_client.get(JOBS)

    backends.reset_backend()
    assert response.status_code == 200
    assert "17761234567" in response.content.decode()


def test_agent_pages_show_jobs_inline_and_the_ended_state(admin_client):
    agent = AgentFactory(ended_at=timezone.now(), end_reason="subscription deleted")
    job = JobFactory(agent=agent, status=JobStatus.RUNNING)
    active = AgentFactory(name="still-active")

    listing = admin_client.get(reverse("admin:provisioning_agent_changelist"))
    page = admin_client.get(reverse("admin:provisioning_agent_change", args=[agent.pk]))

    assert listing.status_code == 200
    assert {a.pk for a in listing.context["cl"].result_list} == {agent.pk, active.pk}
    assert listing.content.decode().count('class="job-badge job-ended"') == 1
    assert page.status_code == 200
    html = page.content.decode()
    assert job.short_id in html
    assert "subscription deleted" in html
    assert (
        admin_client.get(
            reverse("admin:provisioning_agent_changelist"), {"q": agent.name}
        ).status_code
        == 200
    )
    ended = admin_client.get(reverse("admin:provisioning_agent_changelist"), {"ended": "yes"})
    assert ended.status_code == 200
    assert [a.pk for a in ended.context["cl"].result_list] == [agent.pk]
    assert "subscription deleted" in ended.content.decode()
    assert active.name not in ended.content.decode()
    live = admin_client.get(reverse("admin:provisioning_agent_changelist"), {"ended": "no"})
    assert [a.pk for a in live.context["cl"].result_list] == [active.pk]


def test_job_event_pages_render(admin_client):
    job = enqueue()
    event = JobEvent.objects.get(job=job)

    listing = admin_client.get(reverse("admin:provisioning_jobevent_changelist"))
    searched = admin_client.get(
        reverse("admin:provisioning_jobevent_changelist"), {"q": job.short_id}
    )
    page = admin_client.get(reverse("admin:provisioning_jobevent_change", args=[event.pk]))

    assert listing.status_code == searched.status_code == page.status_code == 200
    assert job.short_id in searched.content.decode()


# --- who may do what -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url_name",
    [
        "admin:provisioning_provisioningjob_changelist",
        "admin:provisioning_agent_changelist",
        "admin:provisioning_jobevent_changelist",
    ],
)
def test_non_staff_are_sent_to_the_login_page(client, url_name):
    client.force_login(UserFactory(is_staff=False))

    response = client.get(reverse(url_name))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    response = client.get(JOBS)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_staff_without_permissions_cannot_run_retry_or_cancel(client, viewer):
    failed = failed_job()
    queued = JobFactory()

    page = client.get(JOBS)
    retry = act(client, "retry_jobs", failed)
    cancel = act(client, "cancel_jobs", queued, confirm=True)

    assert offered_actions(page) == []
    assert retry.status_code == cancel.status_code == 200
    failed.refresh_from_db()
    queued.refresh_from_db()
    assert (failed.status, queued.status) == (JobStatus.FAILED, JobStatus.QUEUED)
    assert not JobEvent.objects.filter(actor__startswith="operator:").exists()


def test_each_permission_offers_only_its_own_action(client):
    client.force_login(staff("rita", *VIEW_PERMS, "retry_job"))
    queued = JobFactory()

    page = client.get(JOBS)
    cancel = act(client, "cancel_jobs", queued, confirm=True)

    assert offered_actions(page) == ["retry_jobs"]
    assert flash(cancel) == ["No action selected."]
    queued.refresh_from_db()
    assert queued.status == JobStatus.QUEUED


def test_job_page_offers_only_permitted_actions_for_the_jobs_state(client, viewer):
    failed = failed_job()
    url = reverse("admin:provisioning_provisioningjob_change", args=[failed.pk])

    as_viewer = client.get(url).context["job_actions"]
    client.force_login(staff("otto", *VIEW_PERMS, *ACTION_PERMS))
    as_operator = client.get(url).context["job_actions"]

    assert as_viewer == []
    assert [a.name for a in as_operator] == ["retry_jobs"]


# --- actions go through services and name the operator ---------------------------------------


def test_retry_requeues_a_failed_job_and_records_the_operator(client, operator):
    job = failed_job()

    response = act(client, "retry_jobs", job)

    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert (job.attempt, job.retry_count) == (5, 0)
    event = JobEvent.objects.get(job=job, action=JobEvent.Action.RETRY)
    assert event.actor == Actor.operator("alice")
    assert (event.from_status, event.to_status) == (JobStatus.FAILED, JobStatus.QUEUED)
    assert flash(response) == ["1 retried, 0 skipped."]


def test_retry_reports_the_jobs_it_skipped_and_why(client, operator):
    failed = failed_job()
    running = JobFactory(status=JobStatus.RUNNING)
    ended = failed_job(agent=AgentFactory(ended_at=timezone.now()))

    response = act(client, "retry_jobs", failed, running, ended)

    assert flash(response) == ["1 retried, 2 skipped (1 agent ended, 1 was running)."]
    running.refresh_from_db()
    assert running.status == JobStatus.RUNNING


def test_cancel_asks_for_confirmation_before_changing_anything(client, operator):
    job = JobFactory()
    done = JobFactory(status=JobStatus.RUNNING)

    response = client.post(
        JOBS, {"action": "cancel_jobs", "_selected_action": [job.pk, done.pk], "index": "0"}
    )

    assert response.status_code == 200
    assert "are you sure" in response.content.decode()
    assert response.context["affected_count"] == 1
    assert response.context["skipped_count"] == 1
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED


def test_cancel_fails_the_job_cancels_its_run_and_records_the_operator(
    client, operator, installed_backend, django_capture_on_commit_callbacks
):
    job, run = claimed(installed_backend)

    with django_capture_on_commit_callbacks(execute=True):
        response = act(client, "cancel_jobs", job, confirm=True)

    job.refresh_from_db()
    assert (job.status, job.failed_step) == (JobStatus.FAILED, Step.CANCELLED)
    assert installed_backend.cancelled == [run.run_id]
    event = JobEvent.objects.get(job=job, action=JobEvent.Action.CANCEL)
    assert event.actor == "operator:alice"
    assert flash(response) == ["1 cancelled, 0 skipped."]


def test_time_out_now_requeues_a_provisioning_job_with_retries_left(client, operator, backend):
    job, _run = claimed(backend)

    response = act(client, "timeout_jobs", job, confirm=True)

    job.refresh_from_db()
    assert (job.status, job.retry_count, job.attempt) == (JobStatus.QUEUED, 1, 2)
    assert job.failed_step == Step.TIMEOUT
    event = JobEvent.objects.get(job=job, action=JobEvent.Action.TIMEOUT)
    assert event.actor == "operator:alice"
    assert (event.from_status, event.to_status) == (JobStatus.PROVISIONING, JobStatus.QUEUED)
    assert flash(response) == ["1 timed out, 0 skipped."]


def test_time_out_now_skips_jobs_that_are_not_provisioning(client, operator):
    job = JobFactory()

    response = act(client, "timeout_jobs", job, confirm=True)

    assert flash(response) == ["0 timed out, 1 skipped (1 was queued)."]


def test_redispatch_forgets_the_unclaimed_run_and_records_the_operator(client, operator, backend):
    job = enqueue()
    run = dispatch(job, backend)

    response = act(client, "redispatch_jobs", job)

    job.refresh_from_db()
    assert job.workflow_run_id is None and job.dispatched_at is None
    event = JobEvent.objects.get(job=job, action=JobEvent.Action.REDISPATCH)
    assert event.actor == "operator:alice"
    assert event.workflow_run_id == run.run_id
    assert flash(response) == ["1 re-dispatched, 0 skipped."]


# --- stale jobs and scale --------------------------------------------------------------------


def test_a_stale_job_is_flagged_in_the_list_and_counted(admin_client, backend, settings):
    stale, _ = claimed(backend)
    fresh, _ = claimed(backend)
    silent_since = timezone.now() - timedelta(seconds=settings.JOB_TIMEOUT_SECONDS + 60)
    ProvisioningJob.objects.filter(pk=stale.pk).update(last_heartbeat_at=silent_since)

    response = admin_client.get(JOBS)
    only_stale = admin_client.get(JOBS, {"stale": "yes"}).content.decode()

    html = response.content.decode()
    row = html[html.index(stale.short_id) :].split("</tr>")[0]
    fresh_row = html[html.index(fresh.short_id) :].split("</tr>")[0]
    assert 'class="job-stale"' in row
    assert "stale · 16m" in row
    assert "job-stale" not in fresh_row
    assert response.context["overview"]["stale_count"] == 1
    assert stale.short_id in only_stale
    assert fresh.short_id not in only_stale


def test_the_jobs_list_query_count_does_not_grow_with_the_page_size(
    admin_client, backend, monkeypatch
):
    for i in range(12):
        job = enqueue(kind=JobKind.DEPROVISION if i % 3 == 0 else JobKind.PROVISION)
        if i % 2:
            services.job_cancel(job_id=job.pk, actor="operator:setup")

    def queries_at(page_size: int) -> int:
        monkeypatch.setattr(ProvisioningJobAdmin, "list_per_page", page_size)
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(JOBS)
        assert response.status_code == 200
        assert len(response.context["cl"].result_list) == page_size
        return len(captured)

    assert queries_at(2) == queries_at(10)


def test_the_paginator_counts_exactly_below_its_cap_and_everything_on_sqlite(monkeypatch):
    for _ in range(5):
        JobFactory()
    monkeypatch.setattr(EstimatedCountPaginator, "EXACT_LIMIT", 3)

    paginator = EstimatedCountPaginator(ProvisioningJob.objects.order_by("-created_at"), 2)

    if connection.vendor == "postgresql":
        assert paginator.count >= 4  # the planner's estimate, never below what was seen
    else:
        assert paginator.count == 5
        assert paginator.num_pages == 3
    assert len(paginator.page(1).object_list) == 2


@pytest.mark.postgres_only
def test_the_paginator_estimates_a_big_unfiltered_table_on_postgres(monkeypatch):
    for _ in range(6):
        JobFactory()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE provisioning_provisioningjob")
    monkeypatch.setattr(EstimatedCountPaginator, "EXACT_LIMIT", 3)

    paginator = EstimatedCountPaginator(ProvisioningJob.objects.order_by("-created_at"), 2)

    assert paginator.count >= 4
    assert paginator.is_estimate


# --- ending an agent from the console --------------------------------------------------------

AGENTS = reverse("admin:provisioning_agent_changelist")


def end(client, *agents, reason: str | None = None):
    data = {"action": "end_agents", "_selected_action": [str(a.pk) for a in agents]}
    if reason is None:
        data["index"] = "0"
    else:
        data.update(post="yes", reason=reason)
    return client.post(AGENTS, data, follow=True)


@pytest.fixture
def ender(client):
    user = staff("erin", *VIEW_PERMS, "end_agent")
    client.force_login(user)
    return user


def test_end_agent_asks_why_before_changing_anything(client, ender):
    active = AgentFactory()
    done = AgentFactory(ended_at=timezone.now(), end_reason="refund")

    page = end(client, active, done)
    blank = end(client, active, reason="   ")

    assert page.status_code == 200
    html = page.content.decode()
    assert "End agents: are you sure?" in html
    assert 'name="reason"' in html
    assert (page.context["affected_count"], page.context["skipped_count"]) == (1, 1)
    assert blank.status_code == 200
    assert blank.context["form"].errors["reason"]
    active.refresh_from_db()
    assert not active.is_ended
    assert not ProvisioningJob.objects.filter(kind=JobKind.DEPROVISION).exists()


def test_end_agent_ends_it_queues_one_deprovision_as_the_operator_and_reports(
    client, ender, backend
):
    running, run = claimed(backend)
    services.job_complete(job_id=running.pk, run=run, server_id="7", ipv4="203.0.113.7")
    agent = running.agent
    already = AgentFactory()
    services.agent_end(agent_id=already.pk, actor="stripe", reason="subscription deleted")

    response = end(client, agent, already, reason="customer asked by email")

    assert flash(response) == ["1 ended, 1 skipped (1 already ended)."]
    agent.refresh_from_db()
    assert agent.is_ended
    assert agent.end_reason == "customer asked by email"
    deprovision = ProvisioningJob.objects.get(agent=agent, kind=JobKind.DEPROVISION)
    assert deprovision.status == JobStatus.QUEUED
    event = JobEvent.objects.get(job=deprovision, action=JobEvent.Action.ENQUEUE)
    assert event.actor == "operator:erin"
    assert "customer asked by email" in event.reason
    assert ProvisioningJob.objects.filter(agent=already, kind=JobKind.DEPROVISION).count() == 1
    # A second click changes nothing.
    again = end(client, agent, reason="double click")
    assert flash(again)[-1] == "0 ended, 1 skipped (1 already ended)."
    assert ProvisioningJob.objects.filter(agent=agent, kind=JobKind.DEPROVISION).count() == 1
    # The list shows it ended, with the reason.
    listing = client.get(AGENTS).content.decode()
    assert "customer asked by email" in listing
    assert 'class="job-badge job-ended"' in listing


def test_end_agent_cancels_a_build_in_flight_first(
    client, ender, installed_backend, django_capture_on_commit_callbacks
):
    building, run = claimed(installed_backend)

    with django_capture_on_commit_callbacks(execute=True):
        end(client, building.agent, reason="chargeback")

    building.refresh_from_db()
    assert (building.status, building.failed_step) == (JobStatus.FAILED, Step.CANCELLED)
    assert run.run_id in installed_backend.cancelled
    cancel = JobEvent.objects.get(job=building, action=JobEvent.Action.CANCEL)
    assert cancel.actor == "operator:erin"


def test_end_agent_needs_its_permission(client, operator):
    """Every job permission but not end_agent: the action is neither offered nor run."""
    agent = AgentFactory()

    listing = client.get(AGENTS)
    forced = end(client, agent, reason="trying anyway")

    assert "end_agents" not in offered_actions(listing)
    assert forced.status_code == 200
    agent.refresh_from_db()
    assert not agent.is_ended
    assert not ProvisioningJob.objects.filter(agent=agent).exists()


def test_end_agent_is_offered_with_its_permission(client, ender):
    AgentFactory()

    assert "end_agents" in offered_actions(client.get(AGENTS))


def test_the_admin_home_lists_the_console_first_and_stripe_last(admin_client):
    page = admin_client.get("/admin/").content.decode()

    positions = [
        page.index(f'class="app-{label} module')
        for label in ("provisioning", "billing", "djstripe")
    ]
    assert positions == sorted(positions)
    jobs, agents = page.index("Provisioning jobs"), page.index(">Agents<")
    assert jobs < agents
    assert "Stripe mirror (dj-stripe)" in page


# --- outcome labels: a finished deprovision reads "Deleted" ----------------------------------


def finished_deprovision(backend) -> ProvisioningJob:
    """An agent that was built, then ended; its deprovision deleted the VM (all through services)."""
    built, run = claimed(backend)
    services.job_complete(job_id=built.pk, run=run, server_id="4711", ipv4="203.0.113.7")
    ending = services.agent_end(agent_id=built.agent_id, actor="stripe", reason="refunded")
    run = dispatch(ending, backend)
    services.job_claim(job_id=ending.pk, attempt=ending.attempt, run=run)
    return services.job_complete(job_id=ending.pk, run=run, server_id="", ipv4="")


def test_a_finished_deprovision_reads_deleted_in_every_list_and_on_its_page(admin_client, backend):
    ending = finished_deprovision(backend)
    assert ending.status == JobStatus.RUNNING  # the stored state is unchanged

    jobs = admin_client.get(JOBS).content.decode()
    row = jobs[jobs.index(ending.short_id) :].split("</tr>")[0]
    page = admin_client.get(
        reverse("admin:provisioning_provisioningjob_change", args=[ending.pk])
    ).content.decode()
    agents = admin_client.get(reverse("admin:provisioning_agent_changelist")).content.decode()
    events = admin_client.get(
        reverse("admin:provisioning_jobevent_changelist"), {"q": ending.short_id}
    ).content.decode()

    assert '<span class="job-badge job-deleted">Deleted</span>' in row
    assert "job-running" not in row
    assert '<span class="job-badge job-deleted">Deleted</span>' in page
    assert 'title="stored: provisioning → running">deleting → deleted' in page
    agent_row = agents[agents.index(ending.agent.name) :].split("</tr>")[0]
    assert '<span class="job-badge job-deleted">Deleted</span>' in agent_row  # latest job
    assert "deleting → deleted" in events


@pytest.mark.parametrize(
    ("status", "kind", "key", "text"),
    [
        (JobStatus.RUNNING, JobKind.PROVISION, "running", "Running"),
        (JobStatus.RUNNING, JobKind.DEPROVISION, "deleted", "Deleted"),
        (JobStatus.PROVISIONING, JobKind.DEPROVISION, "deleting", "Deleting"),
        (JobStatus.QUEUED, JobKind.DEPROVISION, "queued", "Deletion queued"),
        (JobStatus.FAILED, JobKind.DEPROVISION, "failed", "Deletion failed"),
        (JobStatus.FAILED, JobKind.PROVISION, "failed", "Failed"),
    ],
)
def test_status_labels_read_the_state_with_the_kind(status, kind, key, text):
    label = JobFactory.build(status=status, kind=kind).status_label

    assert (label.key, label.text) == (key, text)


# --- the job page: one panel per attempt, a one-line timeline ---------------------------------


def report(attempt: int, lines: int = 45) -> str:
    body = [f"ok: [203.0.113.7] => (item=package-{n:02d}) attempt {attempt}" for n in range(lines)]
    return "\n".join([*body, f"ansible-playbook exited 2 (attempt {attempt})"])


def test_a_job_page_has_one_panel_per_attempt_with_the_reports_tail(admin_client, backend):
    job, run = claimed(backend, max_retries=1)
    services.job_fail(job_id=job.pk, run=run, error=report(1), failed_step=Step.CONFIGURE)
    requeue_now(job)
    run = dispatch(job, backend)
    services.job_claim(job_id=job.pk, attempt=2, run=run)
    services.job_fail(job_id=job.pk, run=run, error=report(2, lines=5), failed_step=Step.CONFIGURE)

    response = admin_client.get(reverse("admin:provisioning_provisioningjob_change", args=[job.pk]))

    html = response.content.decode()
    panels = response.context["live"]["attempts"]
    assert [(p.number, p.outcome) for p in panels] == [(2, "Failed"), (1, "Failed, retried")]
    assert panels[1].headline.startswith("ansible-playbook exited 2 (attempt 1)")
    assert (
        panels[1].output.tail.splitlines()[0] == "ok: [203.0.113.7] => (item=package-26) attempt 1"
    )
    assert panels[1].output.hidden_lines == 26
    assert html.count('<details class="job-output-all">') == 1  # the short report shows whole
    assert "Show all 46 lines" in html
    assert html.count("(item=package-00) attempt 1") == 1  # once, behind "show all"
    timeline = html[html.index('id="job-timeline"') :]
    assert "(item=package-" not in timeline  # the reports stay out of the timeline
    assert 'href="#attempt-1" class="job-more"' in timeline


# --- live refresh: partial views behind the admin's permissions -------------------------------


def test_a_job_pages_live_part_polls_while_the_job_is_active(admin_client, backend, settings):
    settings.CONSOLE_POLL_SECONDS = 7
    job, run = claimed(backend, max_retries=0)
    live_url = reverse("admin:provisioning_provisioningjob_live", args=[job.pk])

    page = admin_client.get(reverse("admin:provisioning_provisioningjob_change", args=[job.pk]))
    active = admin_client.get(live_url, HTTP_HX_REQUEST="true")
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CONFIGURE)
    final = admin_client.get(live_url, HTTP_HX_REQUEST="true")

    assert f'hx-get="{live_url}" hx-trigger="every 7s"' in page.content.decode()
    assert active.status_code == 200
    assert "<html" not in active.content.decode()
    assert 'hx-trigger="every 7s"' in active.content.decode()
    assert final.status_code == 200
    assert "hx-trigger" not in final.content.decode()  # final: polling stops here
    assert "finished while the page was open" in final.content.decode()


def test_the_jobs_lists_live_part_keeps_the_filters_and_stops_when_idle(admin_client, settings):
    settings.CONSOLE_POLL_SECONDS = 7
    failed = failed_job()
    queued = JobFactory(status=JobStatus.QUEUED)
    live = reverse("admin:provisioning_provisioningjob_live_list")

    page = admin_client.get(JOBS, {"status__exact": "failed"}).content.decode()
    answer = admin_client.get(live, {"status__exact": "failed"}).content.decode()
    ProvisioningJob.objects.filter(pk=queued.pk).update(status=JobStatus.RUNNING)
    idle = admin_client.get(live, {"status__exact": "failed"}).content.decode()

    assert f'hx-get="{live}?status__exact=failed"' in page
    assert 'id="job-rows"' in page and 'id="job-overview"' in page
    assert "<html" not in answer
    assert 'id="job-rows"' in answer and 'id="job-overview"' in answer
    assert failed.short_id in answer and queued.short_id not in answer  # same filter
    assert 'hx-trigger="every 7s"' in answer
    assert "hx-trigger" not in idle  # nothing queued or provisioning: polling stops


@pytest.mark.parametrize("live", ["list", "job"])
def test_the_live_parts_need_the_admins_login_and_view_permission(client, live):
    job = JobFactory()
    url = (
        reverse("admin:provisioning_provisioningjob_live_list")
        if live == "list"
        else reverse("admin:provisioning_provisioningjob_live", args=[job.pk])
    )

    anonymous = client.get(url)
    client.force_login(staff("nobody"))  # staff, but no permission on jobs
    forbidden = client.get(url)

    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("admin:login"))
    assert forbidden.status_code == 403


def test_a_job_pages_live_part_for_a_missing_job_is_404(admin_client):
    missing = reverse("admin:provisioning_provisioningjob_live", args=[uuid.uuid4()])

    assert admin_client.get(missing).status_code == 404


# --- admin home: Stripe's tables closed, hidden without their permissions ---------------------


def test_stripes_tables_sit_closed_at_the_end_and_only_for_those_allowed(client, admin_client):
    home = admin_client.get("/admin/").content.decode()
    client.force_login(staff("pat", *VIEW_PERMS))
    operator_home = client.get("/admin/").content.decode()

    stripe = home[home.index('class="app-djstripe module') :]
    assert stripe.index('<details class="app-collapsed">') < stripe.index("<table>")
    assert "Provisioning jobs" in operator_home
    assert "app-djstripe" not in operator_home
    assert "Stripe mirror" not in operator_home
