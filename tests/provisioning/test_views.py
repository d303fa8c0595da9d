"""The customer dashboard: pages, the htmx status partial, buying and re-provisioning.

State is built through the real services (tests/provisioning/helpers.py), so what the pages show
is what a real job in that state would show.
"""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from provisioning import services
from provisioning.errors import PROVISION_IN_PROGRESS_MESSAGE
from provisioning.models import Agent, JobEvent, JobStatus, ProvisioningJob, Step
from provisioning.web.presenters import AGENT_HTTP_PORT
from tests.factories import AgentFactory, UserFactory
from tests.provisioning.helpers import claimed, dispatch, enqueue, requeue_now

pytestmark = pytest.mark.django_db


@pytest.fixture
def customer():
    return UserFactory(username="ada")


@pytest.fixture
def customer_client(client: Client, customer) -> Client:
    client.force_login(customer)
    return client


@pytest.fixture
def agent(customer) -> Agent:
    return AgentFactory(owner=customer, name="Ada's helper")


def detail_url(agent: Agent) -> str:
    return reverse("dashboard:agent-detail", args=[agent.pk])


def status_url(agent: Agent) -> str:
    return reverse("dashboard:agent-status", args=[agent.pk])


def reprovision_url(agent: Agent) -> str:
    return reverse("dashboard:agent-reprovision", args=[agent.pk])


def failed_job(backend, agent: Agent, *, step: str = Step.CONFIGURE) -> ProvisioningJob:
    """A job whose only attempt failed at `step`, with no retries left."""
    job = enqueue(agent, max_retries=0)
    run = dispatch(job, backend)
    services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    return services.job_fail(
        job_id=job.pk,
        run=run,
        error="TASK [agent : install] fatal: pip exited 1 /root/.secret/stacktrace",
        failed_step=step,
    )


def html(response) -> str:
    return response.content.decode()


# --- login and ownership ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "name", "needs_agent"),
    [
        ("get", "dashboard:home", False),
        ("get", "dashboard:agent-list", False),
        ("get", "dashboard:agent-buy", False),
        ("get", "dashboard:agent-detail", True),
        ("get", "dashboard:agent-status", True),
        ("post", "dashboard:agent-reprovision", True),
    ],
)
def test_anonymous_visitors_are_sent_to_the_login_page(client, agent, method, name, needs_agent):
    url = reverse(name, args=[agent.pk] if needs_agent else [])

    response = getattr(client, method)(url)

    assert response.status_code == 302
    assert response.url == f"/accounts/login/?{urlencode({'next': url}, safe='/')}"


def test_the_login_page_renders_with_a_csrf_protected_form(client):
    response = client.get(reverse("login"))

    assert response.status_code == 200
    assert 'name="csrfmiddlewaretoken"' in html(response)


def test_logging_in_lands_on_my_agents(client, customer):
    response = client.post(
        reverse("login"), {"login": "ada", "password": "correct horse battery staple"}
    )

    assert response.status_code == 302
    assert response.url == "/agents/"


def test_the_root_redirects_to_my_agents(customer_client):
    response = customer_client.get("/")

    assert response.status_code == 302
    assert response.url == "/agents/"


@pytest.mark.parametrize("page", [detail_url, status_url])
def test_another_customers_agent_is_not_found(customer_client, page):
    someone_else = AgentFactory(owner=UserFactory(username="eve"))
    enqueue(someone_else)

    response = customer_client.get(page(someone_else))

    assert response.status_code == 404


def test_another_customers_agent_cannot_be_reprovisioned(customer_client, backend):
    someone_else = AgentFactory(owner=UserFactory(username="eve"))
    job = failed_job(backend, someone_else)

    response = customer_client.post(reprovision_url(someone_else))

    assert response.status_code == 404
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED


def test_an_unknown_agent_is_not_found(customer_client):
    response = customer_client.get("/agents/00000000-0000-4000-8000-000000000000/")

    assert response.status_code == 404


def job_state(agent: Agent) -> tuple[object, ...]:
    """Everything a refused reprovision must leave alone."""
    return (
        list(ProvisioningJob.objects.filter(agent=agent).values()),
        JobEvent.objects.filter(job__agent=agent).count(),
    )


def test_reprovision_needs_a_csrf_token(customer, agent, backend):
    job = failed_job(backend, agent)
    before = job_state(agent)
    client = Client(enforce_csrf_checks=True)
    client.force_login(customer)

    response = client.post(reprovision_url(agent))

    assert response.status_code == 403
    assert job_state(agent) == before
    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.FAILED


def test_reprovision_is_post_only(customer_client, agent, backend):
    job = failed_job(backend, agent)
    before = job_state(agent)

    response = customer_client.get(reprovision_url(agent))

    assert response.status_code == 405
    assert job_state(agent) == before
    assert ProvisioningJob.objects.get(pk=job.pk).status == JobStatus.FAILED


def test_the_header_offers_a_post_logout_form(customer_client):
    page = html(customer_client.get("/agents/"))

    assert re.search(r'<form method="post" action="/accounts/logout/"', page)
    assert "My agents" in page
    assert "Buy an agent" in page
    assert "ada" in page


def test_logging_out_by_post_ends_the_session(customer_client):
    response = customer_client.post(reverse("logout"))

    assert response.status_code == 302
    assert customer_client.get("/agents/").status_code == 302


# --- my agents -------------------------------------------------------------------------------


def test_my_agents_lists_only_mine_newest_first(customer_client, customer):
    older = AgentFactory(owner=customer, name="first-one")
    newer = AgentFactory(owner=customer, name="second-one")
    Agent.objects.filter(pk=older.pk).update(created_at=timezone.now() - timedelta(days=1))
    enqueue(older)
    enqueue(newer)
    AgentFactory(owner=UserFactory(username="eve"), name="eves-agent")

    page = html(customer_client.get("/agents/"))

    assert page.index("second-one") < page.index("first-one")
    assert "eves-agent" not in page


def test_my_agents_with_no_agents_invites_a_purchase(customer_client):
    page = html(customer_client.get("/agents/"))

    assert "You have no agents yet." in page


def test_my_agents_shows_each_state_in_its_own_words(customer_client, customer, backend):
    queued = AgentFactory(owner=customer, name="queued-agent")
    running = AgentFactory(owner=customer, name="running-agent")
    failed = AgentFactory(owner=customer, name="failed-agent")
    job, run = claimed(backend, running)
    services.job_complete(job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7")
    failed_job(backend, failed)
    enqueue(queued)

    page = html(customer_client.get("/agents/"))

    assert page.count('data-state="queued"') == 1
    assert "203.0.113.7" in page
    assert "Installing the agent software on your server failed." in page
    assert "Re-provision" in page


# --- one agent: each state -------------------------------------------------------------------


def test_a_queued_agent_shows_its_place_in_the_queue(customer_client, agent):
    ahead = enqueue(AgentFactory(owner=UserFactory(username="bob")))
    assert ahead.status == JobStatus.QUEUED
    enqueue(agent)

    page = html(customer_client.get(detail_url(agent)))

    assert 'data-state="queued"' in page
    assert "Number 2 in the queue" in page


def test_a_provisioning_agent_shows_its_step_and_progress(customer_client, agent, backend):
    job, run = claimed(backend, agent)
    services.job_heartbeat(job_id=job.pk, run=run, step=Step.WAIT_SSH, progress=40)

    page = html(customer_client.get(detail_url(agent)))

    assert 'data-state="provisioning"' in page
    assert "Waiting for your server to boot." in page
    assert '<progress class="progress" max="100" value="40"' in page
    assert re.search(r'data-step="create-server" data-state="done"', page)
    assert re.search(r'data-step="wait-ssh" data-state="current"', page)
    assert re.search(r'data-step="configure" data-state="pending"', page)


def test_a_retry_shows_the_attempt_and_how_many_retries_are_spent(
    customer_client, agent, backend, settings
):
    settings.MAX_RETRIES = 3
    job, run = claimed(backend, agent)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step=Step.CREATE_SERVER)

    queued_page = html(customer_client.get(detail_url(agent)))
    requeue_now(job)
    job.refresh_from_db()
    run = dispatch(job, backend)
    services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    provisioning_page = html(customer_client.get(detail_url(agent)))

    assert (
        "Our cloud provider could not create your server, so we are trying again automatically."
        in queued_page
    )
    assert "Attempt 2, retry 1 of 3." in queued_page
    assert 'data-state="provisioning"' in provisioning_page
    assert "Attempt 2, retry 1 of 3." in provisioning_page


def test_a_running_agent_shows_its_address(customer_client, agent, backend):
    job, run = claimed(backend, agent)
    services.job_complete(job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7")

    page = html(customer_client.get(detail_url(agent)))

    assert 'data-state="running"' in page
    assert '<code class="ipv4">203.0.113.7</code>' in page
    assert page.count('data-state="done"') == 6


def test_a_running_agent_says_how_to_reach_it(customer_client, agent, backend):
    job, run = claimed(backend, agent)
    services.job_complete(job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7")

    page = html(customer_client.get(detail_url(agent)))
    listing = html(customer_client.get("/agents/"))

    assert 'href="http://203.0.113.7:8080/healthz"' in page
    assert re.search(r"serves HTTP on port\s+8080 of that address", page)
    assert "healthz" not in listing  # the list stays short: the agent's page says it


def test_the_port_the_page_names_is_the_one_the_playbook_serves():
    playbook = (settings.BASE_DIR / "provisioning/runner/playbook/site.yml").read_text()

    assert re.search(rf"^\s+agent_health_port: {AGENT_HTTP_PORT}$", playbook, re.MULTILINE)


def test_a_failed_agent_shows_the_plain_reason_never_the_raw_error(customer_client, agent, backend):
    failed_job(backend, agent, step=Step.CONFIGURE)

    page = html(customer_client.get(detail_url(agent)))

    assert 'data-state="failed"' in page
    assert "Installing the agent software on your server failed." in page
    assert "Our team has been notified and we are on it." in page
    assert "pip exited" not in page
    assert "stacktrace" not in page
    assert re.search(r'data-step="configure" data-state="failed"', page)
    assert f'action="{reprovision_url(agent)}"' in page


def test_an_agent_cancelled_by_our_team_says_so(customer_client, agent):
    job = enqueue(agent)
    services.job_cancel(job_id=job.pk, actor="operator:root", reason="duplicate order")

    page = html(customer_client.get(detail_url(agent)))

    assert "The build was cancelled by our team." in page
    assert "duplicate order" not in page


def test_an_ended_agent_says_it_ended_and_why(customer_client, agent, backend):
    job, run = claimed(backend, agent)
    services.job_complete(job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7")
    Agent.objects.filter(pk=agent.pk).update(
        ended_at=timezone.now(), end_reason="subscription cancelled"
    )

    page = html(customer_client.get(detail_url(agent)))

    assert 'data-state="ended"' in page
    assert "This agent has ended: subscription cancelled." in page
    assert "Re-provision" not in page
    assert 'class="steps"' not in page  # its build steps no longer read as "done"


def test_an_ended_agent_says_its_server_was_deleted(customer_client, agent, backend):
    """Its deprovision finished: stored as `running`, read as "Deleted" (models.status_label)."""
    ending = services.agent_end(agent_id=agent.pk, actor="stripe", reason="subscription cancelled")
    run = dispatch(ending, backend)
    services.job_claim(job_id=ending.pk, attempt=ending.attempt, run=run)
    services.job_complete(job_id=ending.pk, run=run, server_id="", ipv4="")

    page = html(customer_client.get(detail_url(agent)))

    assert 'Server: <span class="server-state">Deleted</span>' in page
    assert "Running" not in page


# --- the htmx partial ------------------------------------------------------------------------


def test_the_status_partial_keeps_polling_while_the_job_is_active(customer_client, agent):
    enqueue(agent)

    response = customer_client.get(status_url(agent), HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    assert "<html" not in html(response)
    assert 'hx-trigger="every 3s"' in html(response)
    assert f'hx-get="{status_url(agent)}"' in html(response)


def test_the_status_partial_stops_polling_once_the_job_is_final(customer_client, agent, backend):
    job, run = claimed(backend, agent)
    services.job_complete(job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7")

    response = customer_client.get(status_url(agent), HTTP_HX_REQUEST="true")

    assert 'data-state="running"' in html(response)
    assert "hx-trigger" not in html(response)


def test_the_compact_partial_for_the_list_has_no_step_list(customer_client, agent):
    enqueue(agent)

    response = customer_client.get(status_url(agent) + "?compact=1")

    assert 'class="steps"' not in html(response)
    assert f'hx-get="{status_url(agent)}?compact=1"' in html(response)


def test_reading_a_silent_job_times_it_out_on_demand(customer_client, agent, backend, settings):
    settings.JOB_TIMEOUT_SECONDS = 60
    job, _run = claimed(backend, agent)
    long_ago = timezone.now() - timedelta(minutes=5)
    ProvisioningJob.objects.filter(pk=job.pk).update(
        last_heartbeat_at=long_ago, claimed_at=long_ago
    )

    response = customer_client.get(status_url(agent))

    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert job.failed_step == Step.TIMEOUT
    assert JobEvent.objects.filter(job=job, action=JobEvent.Action.TIMEOUT).count() == 1
    assert "The build stopped reporting progress and was stopped, so we are trying again" in html(
        response
    )


def test_reading_a_healthy_job_changes_nothing(customer_client, agent, backend):
    job, _run = claimed(backend, agent)
    before = list(JobEvent.objects.filter(job=job).order_by("id").values_list("pk", flat=True))

    customer_client.get(status_url(agent))

    job.refresh_from_db()
    assert job.status == JobStatus.PROVISIONING
    assert (
        list(JobEvent.objects.filter(job=job).order_by("id").values_list("pk", flat=True)) == before
    )


# --- re-provision ----------------------------------------------------------------------------


def test_reprovision_requeues_a_failed_agent_and_says_so(customer_client, agent, backend):
    job = failed_job(backend, agent)

    response = customer_client.post(reprovision_url(agent), follow=True)

    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert job.attempt == 2
    assert response.redirect_chain == [(detail_url(agent), 302)]
    assert "We are building your agent again." in html(response)
    assert 'data-state="queued"' in html(response)


def test_reprovision_is_refused_with_the_in_progress_message_while_a_job_is_in_progress(
    customer_client, customer, agent, backend
):
    job = failed_job(backend, agent)
    enqueue(AgentFactory(owner=customer, name="second order"))

    response = customer_client.post(reprovision_url(agent), follow=True)

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert response.redirect_chain == [(detail_url(agent), 302)]
    assert PROVISION_IN_PROGRESS_MESSAGE in html(response)


def test_reprovision_of_a_running_agent_changes_nothing(customer_client, agent, backend):
    job, run = claimed(backend, agent)
    services.job_complete(job_id=job.pk, run=run, server_id="4711", ipv4="203.0.113.7")

    response = customer_client.post(reprovision_url(agent), follow=True)

    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    assert "Only an agent whose build failed can be re-provisioned." in html(response)


def test_a_build_our_team_cancelled_cannot_be_restarted_by_the_customer(customer_client, agent):
    job = enqueue(agent)
    services.job_cancel(job_id=job.pk, actor="operator:root", reason="duplicate order")

    page = html(customer_client.get(detail_url(agent)))
    answer = customer_client.post(reprovision_url(agent), follow=True)

    assert "Please contact support if you want it started again." in page
    assert f'action="{reprovision_url(agent)}"' not in page
    assert "Our team stopped this build." in html(answer)
    job.refresh_from_db()
    assert job.is_failed and job.is_cancelled


def test_re_provisions_of_one_agent_are_limited_per_hour(customer_client, agent, backend, settings):
    settings.REPROVISION_LIMIT_PER_HOUR = 2
    settings.MAX_RETRIES = 0
    job, run = claimed(backend, agent)
    for attempt in range(settings.REPROVISION_LIMIT_PER_HOUR):
        services.job_fail(job_id=job.pk, run=run, error="boom", failed_step="configure")
        customer_client.post(reprovision_url(agent))
        job.refresh_from_db()
        assert job.is_queued, f"re-provision {attempt + 1} was refused"
        run = dispatch(job, backend)
        services.job_claim(job_id=job.pk, attempt=job.attempt, run=run)
    services.job_fail(job_id=job.pk, run=run, error="boom", failed_step="configure")

    answer = customer_client.post(reprovision_url(agent), follow=True)

    assert "re-provisioned 2 times in the last hour" in html(answer)
    job.refresh_from_db()
    assert job.is_failed
