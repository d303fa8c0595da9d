"""Monitoring doors: `/healthz` and `/metrics`, both computed from the database at request time.

Every web process answers alike (no per-process counters): the numbers are SQL aggregates over
the job table, each served by an index or bounded to a small set of rows.

`/healthz` answers 200 while the database answers, and says whether a worker is alive:
"ok" (a tick within max(3 x WORKER_INTERVAL_SECONDS, 60 s)), "stale" (older), "absent" (never).
A dead worker does not make the web tier unhealthy (restarting web processes would not help), so
it stays 200 with the problem spelled out; alert on `provisioning_worker_last_tick_age_seconds`.
503 only when the database is unreachable.
"""

from __future__ import annotations

import hmac
import logging

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from provisioning.ops.metrics import JobCollector, worker_stale_after, worker_state

logger = logging.getLogger(__name__)


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    now = timezone.now()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        worker, age = worker_state(now)
    except DatabaseError as exc:
        logger.error("healthz: database unreachable: %s", exc)
        return JsonResponse(
            {"database": "unreachable", "worker": "unknown", "last_tick_age_seconds": None},
            status=503,
        )
    return JsonResponse(
        {
            "database": "ok",
            "worker": worker,
            "last_tick_age_seconds": None if age is None else round(age, 3),
            "worker_stale_after_seconds": worker_stale_after(),
        }
    )


def _metrics_authorized(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), str(token).encode()
    )


@require_GET
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    if not _metrics_authorized(request):
        response = JsonResponse(
            {"detail": "A valid metrics token is required.", "code": "not_authenticated"},
            status=401,
        )
        response["WWW-Authenticate"] = "Bearer"
        return response
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector())
    try:
        body = generate_latest(registry)
    except DatabaseError as exc:
        logger.error("metrics: database unreachable: %s", exc)
        return HttpResponse("database unreachable\n", status=503, content_type="text/plain")
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
