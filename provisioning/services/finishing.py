"""Runs that have reported and are still finishing: when a runner slot is really free.

A run's `complete` or `fail` is not its end. Its last steps come after the report (a failed build
deletes the VM it made; GitHub then tidies the runner up), and until the run ends GitHub keeps
that runner busy: a run dispatched into the slot the moment the report commits waits in GitHub's
queue, and GitHub's own count of the account's concurrent jobs is over PROVISIONING_MAX_IN_FLIGHT.
So with a backend that runs on such runners (`holds_runner_after_report`: GitHub), the report
records a FinishingRun (services.common.finishing_runs_record), which the dispatcher counts as in flight (selectors.run_count_finishing),
and the slot is handed on only when GitHub says the run completed:

- GitHub's `workflow_run` (or `workflow_job`) webhook with action `completed` (api/github_webhook.py):
  the usual way, within a second or two of the run's end;
- a missed webhook: the worker's `finishing` duty lists the workflow's unfinished runs (the list
  calls reconciliation makes, conditional on their ETags) for runs reported more than
  RUN_FINISH_POLL_SECONDS ago, and releases those GitHub no longer lists;
- a run the service cancels (a timeout, an operator's cancel or re-dispatch) is recorded the same
  way (services.common.cancel_run_later): it keeps its runner until GitHub has stopped it;
- neither heard (the API budget spent, GitHub down): RUN_FINISH_GRACE_SECONDS after the report
  the row stops counting, and the duty deletes it. Capacity is never lost for good.

A cleanup run (`mode: cleanup`, for a failed provision) never reports: it counts as in flight from
its dispatch until the same webhook or list call says it ended (`cleanup_finished_at`, a NOTE on
the job), and no longer than DISPATCH_CLAIM_TIMEOUT_SECONDS after it was sent.

Backends whose runs end with their report (local processes, test fakes) record nothing: their
slot is free at the report, as before.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from provisioning import backends, selectors
from provisioning.backends.base import BudgetSpent, RunLister, RunnerBackend
from provisioning.models import Actor, FinishingRun, JobEvent, ProvisioningJob
from provisioning.services.budget import api_budget_wait
from provisioning.services.common import note
from provisioning.services.dispatch import dispatch_soon

logger = logging.getLogger(__name__)


def run_finished_release(*, run_id: str, source: str) -> bool:
    """GitHub says run `run_id` has ended: free its slot (a reported run's, or a cleanup run's)
    and hand it to the next job (after commit). False if the run held no slot (not ours,
    released already, or never recorded)."""
    deleted, _ = FinishingRun.objects.filter(run_id=run_id).delete()
    if not deleted:
        deleted = _cleanup_runs_ended([run_id], source=source)
    if deleted:
        logger.info("run %s has finished (%s): its runner slot is free", run_id, source)
        dispatch_soon(limit=1)
    return bool(deleted)


def _cleanup_runs_ended(run_ids: list[str], *, source: str) -> int:
    """The cleanup runs among `run_ids` have ended: their jobs stop counting them in flight
    (`cleanup_finished_at`), each with a NOTE. Returns how many."""
    if not run_ids:
        return 0
    now = timezone.now()
    with transaction.atomic():
        jobs = list(
            ProvisioningJob.objects.select_for_update()
            .filter(cleanup_run_id__in=run_ids, cleanup_finished_at__isnull=True)
            .only("pk", "attempt", "cleanup_run_id")
        )
        if not jobs:
            return 0
        ProvisioningJob.objects.filter(pk__in=[job.pk for job in jobs]).update(
            cleanup_finished_at=now
        )
        JobEvent.objects.bulk_create(
            note(
                job,
                actor=Actor.SYSTEM,
                run_id=job.cleanup_run_id,
                reason=f"Cleanup run {job.cleanup_run_id} has ended ({source}): its slot is free",
                save=False,
            )
            for job in jobs
        )
    return len(jobs)


def runs_finished_poll(*, backend: RunnerBackend | None = None, now: datetime | None = None) -> int:
    """The worker's `finishing` duty: forget runs past RUN_FINISH_GRACE_SECONDS, and ask GitHub
    (list calls) about runs finishing for more than RUN_FINISH_POLL_SECONDS, which its webhook
    should have announced by then. Returns how many slots were freed."""
    backend = backend or backends.get_backend()
    now = now or timezone.now()
    since = selectors.run_finishing_since(now=now)
    expired, _ = FinishingRun.objects.filter(reported_at__lte=since).delete()
    if expired:
        logger.warning(
            "%d finishing run(s) not heard of for RUN_FINISH_GRACE_SECONDS: slots freed anyway",
            expired,
        )
    poll_before = now - timedelta(seconds=settings.RUN_FINISH_POLL_SECONDS)
    overdue = list(
        FinishingRun.objects.filter(reported_at__lte=poll_before)
        .order_by("reported_at")
        .values_list("run_id", flat=True)
    )
    cleanups = list(
        selectors.job_list_cleanup_running(now=now)
        .filter(cleanup_dispatched_at__lte=poll_before)
        .values_list("cleanup_run_id", flat=True)
    )
    overdue += [run_id for run_id in cleanups if run_id]
    freed = 0
    # Rows exist only for backends whose runs outlive their report (GitHub), which can list its
    # runs; a backend that cannot is left to the grace bound.
    if overdue and isinstance(backend, RunLister):
        if getattr(backend, "shared_budget", False) and api_budget_wait(now=now) > 0:
            return expired  # no request to spare: the grace bound frees them if this lasts
        try:
            unfinished = backend.list_unfinished_runs()
        except Exception as exc:
            level = logging.INFO if isinstance(exc, BudgetSpent) else logging.WARNING
            logger.log(level, "finishing runs: could not list runs: %s", exc)
            return expired
        gone = [run_id for run_id in overdue if run_id not in unfinished]
        if gone:
            freed, _ = FinishingRun.objects.filter(run_id__in=gone).delete()
            freed += _cleanup_runs_ended(gone, source="not among GitHub's unfinished runs")
            logger.info("%d finished run(s) found by listing (their webhook was missed)", freed)
    return freed + expired  # the worker's dispatch duty, next in the same tick, uses them
