"""The console's search box: exact ids go straight to their unique index, free text to trigrams.

Django's stock search ORs `icontains` over every search field (joined tables included) and may add
DISTINCT; at 1M rows that is a sequential scan. Here each term is recognised first:

  a UUID                      -> the job (or agent) with that id                 (primary key)
  8 hex digits (a "short id") -> ids starting with them                          (primary key range)
  evt_…                       -> the job made by that Stripe event               (unique index)
  cs_…                        -> the agent of that Checkout session              (unique index)
  digits                      -> the job whose workflow run has that id          (job_workflow_run)
  anything else               -> customer email or agent name contains it        (trigram GIN)

Free text first looks up matching users and agents (LIMIT FREE_TEXT_IDS + 1 each). When both are
few, jobs are found by `user_id IN (…) OR agent_id IN (…)`: a BitmapOr of two FK indexes, fast
for a rare term. A common term (more matches) becomes a subquery instead, and the newest-first
index walk meets enough matching rows within the first few pages.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet

from provisioning.models import Agent

FREE_TEXT_IDS = 500
_SHORT_ID = re.compile(r"^[0-9a-f]{8}$")
_DIGITS = re.compile(r"^[0-9]{4,20}$")


def parse_uuid(term: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(term)
    except ValueError:
        return None


def short_id_range(field: str, term: str) -> Q:
    """`1a2b3c4d` -> every UUID from 1a2b3c4d-0000-… to 1a2b3c4d-ffff-…: a primary-key range scan."""
    low = uuid.UUID(term + "0" * 24)
    high = uuid.UUID(term + "f" * 24)
    return Q(**{f"{field}__gte": low, f"{field}__lte": high})


def _ids_or_subquery(field: str, queryset: QuerySet[Any]) -> Q:
    ids = list(queryset.values_list("pk", flat=True)[: FREE_TEXT_IDS + 1])
    if len(ids) <= FREE_TEXT_IDS:
        return Q(**{f"{field}__in": ids}) if ids else Q(pk__in=[])
    return Q(**{f"{field}__in": queryset.values("pk")})


def free_text(term: str, *, user_field: str, agent_field: str | None) -> Q:
    """Customer email contains `term` (and agent name, when the searched model has an agent)."""
    users = get_user_model().objects.filter(email__icontains=term)
    found = _ids_or_subquery(user_field, users)
    if agent_field is not None:
        found |= _ids_or_subquery(agent_field, Agent.objects.filter(name__icontains=term))
    return found


def job_term(term: str) -> Q:
    """One search term on the jobs list."""
    lowered = term.lower()
    if (found := parse_uuid(term)) is not None:
        return Q(pk=found) | Q(agent_id=found)
    if term.startswith("evt_"):
        return Q(stripe_event_id=term)
    if term.startswith("cs_"):
        return Q(agent__stripe_checkout_session_id=term)
    match = Q(pk__in=[])
    if _SHORT_ID.match(lowered):
        match |= short_id_range("pk", lowered)
    if _DIGITS.match(term):
        match |= Q(workflow_run_id=term)
    return match | free_text(term, user_field="user_id", agent_field="agent_id")


def agent_term(term: str) -> Q:
    """One search term on the agents list."""
    lowered = term.lower()
    if (found := parse_uuid(term)) is not None:
        return Q(pk=found)
    if term.startswith("cs_"):
        return Q(stripe_checkout_session_id=term)
    match = Q(pk__in=[])
    if _SHORT_ID.match(lowered):
        match |= short_id_range("pk", lowered)
    return match | free_text(term, user_field="owner_id", agent_field="pk")


def event_term(term: str) -> Q:
    """One search term on the job-event list: the job's id (full or short), else the exact actor."""
    lowered = term.lower()
    if (found := parse_uuid(term)) is not None:
        return Q(job_id=found)
    if _SHORT_ID.match(lowered):
        return short_id_range("job_id", lowered)
    return Q(actor=term)


def apply(queryset: QuerySet[Any], search_term: str, term_q: Any) -> QuerySet[Any]:
    """Every whitespace-separated term must match (AND), like Django's own search."""
    for term in search_term.split():
        queryset = queryset.filter(term_q(term.strip()))
    return queryset
