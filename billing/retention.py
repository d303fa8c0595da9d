"""Retention: what grows without bound and may go, and what is kept forever.

Pruned:
- used workflow token ids (`provisioning.UsedTokenId`) once the token can no longer be
  accepted: past its `exp` plus the verifier's leeway (a replay inside the leeway must still
  find the row);
- invalid (unverified) dj-stripe webhook triggers older than N days: forged or garbled requests
  each write one.

Kept: valid webhook triggers and dj-stripe's processed events (the duplicate check and the
record of what Stripe told us), and `JobEvent` (the audit trail, dispatches included) forever.

Deletes go in small batches, each its own short transaction, so a cron run on a big table
never holds long locks; two runs at once only find less to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from django.db.models import Model, QuerySet
from django.utils import timezone

BATCH_SIZE = 5000
# Beyond the verifier's own leeway, a margin for clock differences between web processes.
TOKEN_MARGIN = timedelta(seconds=60)

_M = TypeVar("_M", bound=Model)


@dataclass(frozen=True)
class Pruned:
    what: str
    deleted: int  # or, in a dry run, would be deleted
    kept: int  # rows of the same kind that are not due yet
    rule: str


def _delete_in_batches(queryset: QuerySet[_M], *, batch_size: int = BATCH_SIZE) -> int:
    model = queryset.model
    deleted = 0
    while True:
        pks = list(queryset.order_by().values_list("pk", flat=True)[:batch_size])
        if not pks:
            return deleted
        count, _ = model._default_manager.filter(pk__in=pks).delete()
        deleted += count
        if len(pks) < batch_size:
            return deleted


def used_token_ids_prune(*, now: datetime | None = None, dry_run: bool = False) -> Pruned:
    from provisioning.api.oidc import LEEWAY_SECONDS
    from provisioning.models import UsedTokenId

    cutoff = (now or timezone.now()) - timedelta(seconds=LEEWAY_SECONDS) - TOKEN_MARGIN
    due = UsedTokenId.objects.filter(expires_at__lt=cutoff)
    deleted = due.count() if dry_run else _delete_in_batches(due)
    return Pruned(
        what="used token ids",
        deleted=deleted,
        kept=UsedTokenId.objects.filter(expires_at__gte=cutoff).count(),
        rule=f"expired before {cutoff:%Y-%m-%d %H:%M:%S} UTC (exp + leeway)",
    )


def invalid_triggers_prune(
    *, older_than: timedelta, now: datetime | None = None, dry_run: bool = False
) -> Pruned:
    from djstripe.models import WebhookEventTrigger

    cutoff = (now or timezone.now()) - older_than
    invalid = WebhookEventTrigger.objects.filter(valid=False)
    due = invalid.filter(created__lt=cutoff)
    deleted = due.count() if dry_run else _delete_in_batches(due)
    return Pruned(
        what="invalid webhook triggers",
        deleted=deleted,
        kept=invalid.filter(created__gte=cutoff).count(),
        rule=f"older than {older_than.days} days; valid triggers are never pruned",
    )


def prune(
    *, invalid_trigger_days: int = 7, dry_run: bool = False, now: datetime | None = None
) -> list[Pruned]:
    now = now or timezone.now()
    return [
        used_token_ids_prune(now=now, dry_run=dry_run),
        invalid_triggers_prune(
            older_than=timedelta(days=invalid_trigger_days), now=now, dry_run=dry_run
        ),
    ]
