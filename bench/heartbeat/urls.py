"""Our URL map plus `bench/bare-heartbeat/<job_id>`: the heartbeat's UPDATE with nothing else.

No token verification, no DRF, no serializer: read the JSON body, run the very UPDATE
services.job_heartbeat runs on its fast path (same fence, same columns), answer JSON.
"""

from __future__ import annotations

import json
from uuid import UUID

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from config.urls import urlpatterns as base_urlpatterns
from provisioning.models import JobStatus, ProvisioningJob


@csrf_exempt
@require_POST
def bare_heartbeat(request: HttpRequest, job_id: UUID) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    now = timezone.now()
    changes = {"last_heartbeat_at": now, "updated_at": now}
    if "progress" in body:
        changes["progress"] = int(body["progress"])
    updated = ProvisioningJob.objects.filter(
        pk=job_id,
        status=JobStatus.PROVISIONING,
        workflow_run_id=request.headers["X-Run-Id"],  # trusted as given: no token
        run_attempt=int(request.headers.get("X-Run-Attempt", "1")),
    ).update(**changes)
    if not updated:
        return JsonResponse({"detail": "fenced out", "code": "fenced_out"}, status=409)
    return JsonResponse({"status": "provisioning"})


urlpatterns = [path("bench/bare-heartbeat/<uuid:job_id>", bare_heartbeat), *base_urlpatterns]
