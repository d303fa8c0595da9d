"""Operators hear of every job that fails for good, once: one email per tick for all of them and,
when configured, one webhook POST per job; a retry left, or a cancel, tells nobody."""

from __future__ import annotations

import json

import httpx
import pytest
from django.core import mail

from provisioning import services
from provisioning.models import OperatorAlert
from provisioning.services.alerts import ALERT_MAX_TRIES
from provisioning.worker import Worker
from tests.factories import UserFactory
from tests.provisioning.helpers import claimed

pytestmark = pytest.mark.django_db


def fail_for_good(backend, settings, n: int = 1) -> list:
    settings.MAX_RETRIES = 0
    jobs = []
    for _ in range(n):
        job, run = claimed(backend)
        jobs.append(
            services.job_fail(
                job_id=job.pk, run=run, error="ansible: boom", failed_step="configure"
            )
        )
    return jobs


class Hook:
    """The operators' webhook, on the wire (httpx.MockTransport)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        return httpx.Response(self.status)


@pytest.fixture
def operator():
    return UserFactory(username="olga", is_staff=True, email="olga@example.com")


def test_a_job_that_fails_for_good_sends_one_email_once(backend, settings, operator):
    [job] = fail_for_good(backend, settings)

    assert services.operator_alerts_send() == 1
    assert services.operator_alerts_send() == 0

    [message] = mail.outbox
    assert message.to == ["olga@example.com"]
    assert str(job.pk) in message.subject + message.body
    assert "configure" in message.body and "ansible: boom" in message.body
    assert f"/admin/provisioning/provisioningjob/{job.pk}/" in message.body


def test_many_failures_at_once_are_one_email_and_one_post_each(backend, settings, operator):
    jobs = fail_for_good(backend, settings, n=5)
    settings.OPERATOR_ALERT_WEBHOOK_URL = "https://hooks.example.com/services/T0/B0/x"
    hook = Hook()

    services.operator_alerts_send(transport=hook.transport)

    assert len(mail.outbox) == 1
    assert mail.outbox[0].subject.endswith("5 jobs failed for good")
    assert sorted(b["job_id"] for b in hook.bodies) == sorted(str(j.pk) for j in jobs)
    assert all(b["text"] and b["failed_step"] == "configure" for b in hook.bodies)


def test_a_failure_with_retries_left_or_a_cancel_tells_nobody(backend, operator):
    job, run = claimed(backend)
    services.job_fail(job_id=job.pk, run=run, error="flaky", failed_step="configure")
    other, _run = claimed(backend)
    services.job_cancel(job_id=other.pk, actor="operator:olga")

    assert services.operator_alerts_send() == 0
    assert mail.outbox == []
    assert not OperatorAlert.objects.exists()


def test_a_webhook_that_fails_is_retried_without_a_second_email(backend, settings, operator):
    fail_for_good(backend, settings)
    settings.OPERATOR_ALERT_WEBHOOK_URL = "https://hooks.example.com/x"
    down, up = Hook(status=503), Hook()

    services.operator_alerts_send(transport=down.transport)
    services.operator_alerts_send(transport=up.transport)
    services.operator_alerts_send(transport=up.transport)

    assert len(mail.outbox) == 1
    assert len(down.bodies) == 1 and len(up.bodies) == 1


def test_a_channel_that_keeps_failing_gives_up(backend, settings, operator):
    fail_for_good(backend, settings)
    settings.OPERATOR_ALERT_WEBHOOK_URL = "https://hooks.example.com/x"
    down = Hook(status=500)

    for _ in range(ALERT_MAX_TRIES + 3):
        services.operator_alerts_send(transport=down.transport)

    assert len(down.bodies) == ALERT_MAX_TRIES


def test_the_worker_sends_alerts_every_tick(backend, settings, operator):
    fail_for_good(backend, settings)

    report = Worker(backend=backend).tick()

    assert report.done["alerts"] == 1
    assert len(mail.outbox) == 1


def test_operators_see_the_alerts_in_the_admin(backend, settings, operator, admin_client):
    [job] = fail_for_good(backend, settings)
    services.operator_alerts_send()

    page = admin_client.get("/admin/provisioning/operatoralert/").content.decode()

    assert job.short_id in page
