"""API budgets shared by every process: GitHub's (GITHUB_API_BUDGET_PER_HOUR per
API_BUDGET_WINDOW_SECONDS), kept in one PostgreSQL row.

Every GitHub call the backend makes (installation token, dispatch, get run, cancel, list) draws
one request first (`api_budget_draw`). The row is a token bucket: it holds at most BURST requests
and refills at (budget - burst) per window, so any window-long stretch of time sees at most the
budget, however the calls bunch up (a fixed window would allow twice the budget across its edge).
When it is empty, or GitHub said to wait (`api_budget_block`: `retry-after`, or
`x-ratelimit-remaining: 0` with `x-ratelimit-reset`), the draw is refused with the wait and the
caller leaves its work for later: dispatch leaves jobs queued untouched, reconciliation skips its
round. Nothing fails for want of budget. A conditional request GitHub answers 304 does not count
against GitHub's limit, and its request is given back (`api_budget_refund`).

A draw is one short transaction (lock the row, refill, take, count the purpose); calls are never
made while it is held.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from provisioning.models import ApiBudget, ApiCallCount

logger = logging.getLogger(__name__)

GITHUB = "github"
BURST_FRACTION = 20  # the bucket holds a twentieth of the budget: 200 of 4,000


@dataclass(frozen=True)
class BudgetShape:
    capacity: float  # the most the bucket holds
    per_second: float  # refill rate


def budget_shape(name: str = GITHUB) -> BudgetShape:
    budget = float(settings.GITHUB_API_BUDGET_PER_HOUR)
    window = float(settings.API_BUDGET_WINDOW_SECONDS)
    capacity = max(1.0, budget // BURST_FRACTION)
    return BudgetShape(capacity=capacity, per_second=max(budget - capacity, 1.0) / window)


def _refilled(row: ApiBudget, shape: BudgetShape, now: datetime) -> float:
    elapsed = max((now - row.refilled_at).total_seconds(), 0.0)
    return min(shape.capacity, row.tokens + elapsed * shape.per_second)


def _locked_row(name: str, shape: BudgetShape, now: datetime) -> ApiBudget:
    row = ApiBudget.objects.select_for_update().filter(name=name).first()
    if row is None:
        ApiBudget.objects.get_or_create(
            name=name, defaults={"tokens": shape.capacity, "refilled_at": now}
        )
        row = ApiBudget.objects.select_for_update().get(name=name)
    return row


def _count(name: str, purpose: str, *, refused: bool) -> None:
    field = "refused" if refused else "calls"
    if not ApiCallCount.objects.filter(budget=name, purpose=purpose).update(
        **{field: F(field) + 1}
    ):
        ApiCallCount.objects.get_or_create(budget=name, purpose=purpose)
        ApiCallCount.objects.filter(budget=name, purpose=purpose).update(**{field: F(field) + 1})


def api_budget_draw(*, purpose: str, name: str = GITHUB, now: datetime | None = None) -> float:
    """Take one request from the shared budget for `purpose`: 0.0 when taken, else the seconds
    to wait before one will be there (the bucket is empty, or the API said to wait)."""
    now = now or timezone.now()
    shape = budget_shape(name)
    with transaction.atomic():
        row = _locked_row(name, shape, now)
        tokens = _refilled(row, shape, now)
        if row.blocked_until is not None and row.blocked_until > now:
            wait = (row.blocked_until - now).total_seconds()
        elif tokens < 1.0:
            wait = (1.0 - tokens) / shape.per_second
        else:
            wait, tokens = 0.0, tokens - 1.0
        row.tokens, row.refilled_at = tokens, now
        row.save(update_fields=["tokens", "refilled_at"])
        _count(name, purpose, refused=wait > 0)
    return wait


def api_budget_refund(*, name: str = GITHUB, now: datetime | None = None) -> None:
    """Give one request back (GitHub answered 304: the request did not count)."""
    now = now or timezone.now()
    shape = budget_shape(name)
    with transaction.atomic():
        row = _locked_row(name, shape, now)
        row.tokens = min(shape.capacity, _refilled(row, shape, now) + 1.0)
        row.refilled_at = now
        row.save(update_fields=["tokens", "refilled_at"])


def api_budget_block(
    *, until: datetime, reason: str, name: str = GITHUB, now: datetime | None = None
) -> None:
    """The API said to wait until `until`: every process's draws wait until then (a later block
    wins; an earlier one never shortens it)."""
    now = now or timezone.now()
    shape = budget_shape(name)
    with transaction.atomic():
        row = _locked_row(name, shape, now)
        if row.blocked_until is None or row.blocked_until < until:
            row.blocked_until, row.blocked_reason = until, reason[:300]
            row.save(update_fields=["blocked_until", "blocked_reason"])
    logger.warning("%s API budget blocked until %s: %s", name, until, reason[:200])


def api_budget_wait(*, name: str = GITHUB, now: datetime | None = None) -> float:
    """Seconds until a draw could succeed (0.0: now), without drawing or locking."""
    now = now or timezone.now()
    row = ApiBudget.objects.filter(name=name).first()
    if row is None:
        return 0.0
    if row.blocked_until is not None and row.blocked_until > now:
        return (row.blocked_until - now).total_seconds()
    shape = budget_shape(name)
    tokens = _refilled(row, shape, now)
    return 0.0 if tokens >= 1.0 else (1.0 - tokens) / shape.per_second
