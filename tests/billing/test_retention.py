"""`manage.py prune` removes only what it should: used token ids the verifier can no longer
accept, old invalid webhook triggers; never valid triggers, dj-stripe events or the JobEvent
audit trail."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from djstripe.models import Event, WebhookEventTrigger

from billing import retention
from provisioning.api.oidc import LEEWAY_SECONDS
from provisioning.models import JobEvent, UsedTokenId
from tests.billing.conftest import load_event
from tests.factories import JobEventFactory, JobFactory, UserFactory

pytestmark = pytest.mark.django_db


def _run(*args: Any) -> str:
    out = StringIO()
    call_command("prune", *args, stdout=out)
    return out.getvalue()


def token(job: Any, jti: str, *, expires_in: timedelta) -> UsedTokenId:
    return UsedTokenId.objects.create(jti=jti, job=job, expires_at=timezone.now() + expires_in)


def trigger(endpoint: Any, *, valid: bool, days_old: float) -> WebhookEventTrigger:
    row = WebhookEventTrigger.objects.create(
        remote_ip="127.0.0.1", headers={}, body="{}", valid=valid, webhook_endpoint=endpoint
    )
    WebhookEventTrigger.objects.filter(pk=row.pk).update(
        created=timezone.now() - timedelta(days=days_old)
    )
    return row


@pytest.fixture
def world(endpoint: Any, deliver: Any) -> dict[str, Any]:
    """A bit of everything: tokens, triggers of every kind and age, a processed event, history."""
    job = JobFactory()
    JobEventFactory(job=job, action=JobEvent.Action.DISPATCH, backdate=timedelta(days=900))
    customer = UserFactory(username="ada")
    event = load_event("checkout.session.completed__paid", user=customer)
    assert deliver(event).status_code == 200  # a valid trigger and a dj-stripe Event, today
    return {
        "job": job,
        "event_id": event["id"],
        "long_expired": token(job, "jti-old", expires_in=-timedelta(days=2)),
        "just_expired": token(job, "jti-leeway", expires_in=-timedelta(seconds=LEEWAY_SECONDS)),
        "live": token(job, "jti-live", expires_in=timedelta(minutes=4)),
        "old_forged": trigger(endpoint, valid=False, days_old=8),
        "recent_forged": trigger(endpoint, valid=False, days_old=6),
        "old_valid": trigger(endpoint, valid=True, days_old=400),
    }


def test_prune_removes_expired_token_ids_and_old_invalid_triggers_only(world):
    jobevents = set(JobEvent.objects.values_list("pk", flat=True))
    valid_triggers = set(
        WebhookEventTrigger.objects.filter(valid=True).values_list("pk", flat=True)
    )

    output = _run()

    # A token inside the verifier's leeway could still be replayed: its jti stays.
    assert set(UsedTokenId.objects.values_list("jti", flat=True)) == {"jti-leeway", "jti-live"}
    remaining = set(WebhookEventTrigger.objects.values_list("pk", flat=True))
    assert world["old_forged"].pk not in remaining
    assert remaining == valid_triggers | {world["recent_forged"].pk}
    assert world["old_valid"].pk in remaining
    assert set(JobEvent.objects.values_list("pk", flat=True)) == jobevents
    assert Event.objects.filter(id=world["event_id"]).exists()
    assert "Pruned 1 used token ids" in output
    assert "Pruned 1 invalid webhook triggers (older than 7 days" in output
    assert "1 kept" in output and "2 kept" in output


def test_dry_run_reports_the_same_and_deletes_nothing(world):
    before = (UsedTokenId.objects.count(), WebhookEventTrigger.objects.count())

    output = _run("--dry-run")

    assert (UsedTokenId.objects.count(), WebhookEventTrigger.objects.count()) == before
    assert "Would prune 1 used token ids" in output
    assert "Would prune 1 invalid webhook triggers" in output


def test_invalid_trigger_days_moves_the_cutoff(world):
    _run("--invalid-trigger-days", "5")

    assert not WebhookEventTrigger.objects.filter(valid=False).exists()
    assert world["old_valid"].pk in set(WebhookEventTrigger.objects.values_list("pk", flat=True))


def test_running_it_again_finds_nothing_more(world):
    _run()

    output = _run()

    assert "Pruned 0 used token ids" in output
    assert "Pruned 0 invalid webhook triggers" in output


def test_negative_days_are_refused():
    with pytest.raises(CommandError, match="--invalid-trigger-days"):
        _run("--invalid-trigger-days", "-1")


def test_deletes_go_in_batches(world):
    job = world["job"]
    for n in range(7):
        token(job, f"jti-batch-{n}", expires_in=-timedelta(days=1))
    due = UsedTokenId.objects.filter(jti__startswith="jti-batch")

    assert retention._delete_in_batches(due, batch_size=3) == 7

    assert not due.exists()
    assert UsedTokenId.objects.count() == 3
