"""Telling operators when a job fails for good: by email (Django's mail settings) and, when
OPERATOR_ALERT_WEBHOOK_URL is set, one JSON POST per job (a Slack incoming webhook takes it as is).

`alert_record` runs inside the failing move's transaction, so an alert exists exactly when the
failure does. `operator_alerts_send` is the worker's `alerts` duty. Everything owed at one tick
goes out in one email, so a hundred failures at once are one message, not a storm; a channel that
fails is tried again at later ticks, up to ALERT_MAX_TRIES. The alert rows (never job rows) stay
locked while they are sent, so two workers never send the same alert; a worker killed mid-send
leaves them owed, and they go out again (at least once, never lost).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from provisioning.models import OperatorAlert, ProvisioningJob

logger = logging.getLogger(__name__)

ALERT_MAX_TRIES = 5
WEBHOOK_TIMEOUT_SECONDS = 5.0


def alert_record(job: ProvisioningJob) -> None:
    """Owe operators a message about `job`, which just failed for good (caller's transaction)."""
    OperatorAlert.objects.get_or_create(job=job, attempt=job.attempt)


def _recipients() -> list[str]:
    if settings.OPERATOR_ALERT_EMAILS:
        return list(settings.OPERATOR_ALERT_EMAILS)
    staff = get_user_model().objects.filter(is_active=True, is_staff=True).exclude(email="")
    return sorted(set(staff.values_list("email", flat=True)))


def _admin_url(job: ProvisioningJob) -> str:
    path = reverse("admin:provisioning_provisioningjob_change", args=[job.pk])
    return f"{settings.PUBLIC_BASE_URL}{path}"


def _summary(alert: OperatorAlert) -> str:
    job = alert.job
    return (
        f"{job.kind} job {job.pk} (agent {job.agent_id}, attempt {alert.attempt}) failed for good "
        f"at step {job.failed_step or 'unknown'}: {job.error[:300]}"
    )


def _email(alerts: Sequence[OperatorAlert]) -> None:
    recipients = _recipients()
    if not recipients:
        logger.warning("alerts: %d failed job(s) but no operator email to tell", len(alerts))
        return
    count = len(alerts)
    subject = (
        f"[agent provisioning] {_summary(alerts[0])[:120]}"
        if count == 1
        else f"[agent provisioning] {count} jobs failed for good"
    )
    body = "\n\n".join(f"{_summary(a)}\n{_admin_url(a.job)}" for a in alerts)
    send_mail(
        subject,
        f"{body}\n\nEach job page shows the error, the timeline and the Retry action.\n",
        None,  # DEFAULT_FROM_EMAIL
        recipients,
    )


def _post(alert: OperatorAlert, client: httpx.Client) -> None:
    job = alert.job
    payload = {
        "text": f"{_summary(alert)} {_admin_url(job)}",
        "job_id": str(job.pk),
        "agent_id": str(job.agent_id),
        "kind": job.kind,
        "attempt": alert.attempt,
        "failed_step": job.failed_step,
        "error": job.error[:1000],
        "admin_url": _admin_url(job),
    }
    client.post(settings.OPERATOR_ALERT_WEBHOOK_URL, json=payload).raise_for_status()


def operator_alerts_send(*, limit: int = 200, transport: httpx.BaseTransport | None = None) -> int:
    """Send what is owed (one email for all of it, a POST per job); returns how many alerts."""
    owed = Q(emailed_at__isnull=True) | Q(posted_at__isnull=True)
    with transaction.atomic():
        alerts = list(
            OperatorAlert.objects.filter(owed, tries__lt=ALERT_MAX_TRIES)
            .select_for_update(skip_locked=True, of=("self",))
            .select_related("job")
            .order_by("id")[:limit]
        )
        if not alerts:
            return 0
        now = timezone.now()
        to_email = [a for a in alerts if a.emailed_at is None]
        emailed = False
        try:
            if to_email:
                _email(to_email)
            emailed = True
        except Exception:
            logger.exception(
                "alerts: email about %d failed job(s) could not be sent", len(to_email)
            )
        posted: list[int] = []
        to_post = [a for a in alerts if a.posted_at is None]
        if settings.OPERATOR_ALERT_WEBHOOK_URL:
            with httpx.Client(timeout=WEBHOOK_TIMEOUT_SECONDS, transport=transport) as client:
                for alert in to_post:
                    try:
                        _post(alert, client)
                        posted.append(alert.pk)
                    except httpx.HTTPError as exc:
                        logger.warning("alerts: webhook for job %s failed: %s", alert.job_id, exc)
        else:
            posted = [a.pk for a in to_post]  # nothing to post to
        if emailed:
            OperatorAlert.objects.filter(pk__in=[a.pk for a in to_email]).update(emailed_at=now)
        OperatorAlert.objects.filter(pk__in=posted).update(posted_at=now)
        failed = {a.pk for a in to_email} if not emailed else set()
        failed |= {a.pk for a in to_post if a.pk not in posted}
        OperatorAlert.objects.filter(pk__in=failed).update(tries=F("tries") + 1)
    return len(alerts)
