"""The scheduled reaper: list every VM we manage, ask the service which may go, delete those.

The service decides (it knows the jobs and agents); this side only lists, asks and deletes, and
deletes nothing but what the answer names under `delete` — and of those only servers it listed
itself that still carry our `managed-by` label. More deletions in one answer than
`RUNNER_REAP_MAX_DELETES` (default 25) is taken as a sign that something is wrong (an empty or
wrong database behind the service, a bug) and deletes nothing: an operator raises the limit for
a run after looking.

Prints one line per verdict and a JSON summary as its last line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from .api import ApiError, ApiUnavailable, ReaperApi
from .config import MANAGED_BY, ConfigError, Settings
from .hetzner import Cloud, Vm

EXIT_OK = 0
EXIT_FAILED = 1

# Servers per verdicts request: keeps each body small; the service judges each server alone.
BATCH = 200


def _log(message: str) -> None:
    print(f"reap: {message}", file=sys.stderr, flush=True)


def describe(vm: Vm) -> dict[str, Any]:
    """What the service needs to judge one VM (its labels say whose it is)."""
    return {
        "server_id": vm.id,
        "name": vm.name,
        "job_id": vm.labels.get("job-id", ""),
        "agent_id": vm.labels.get("agent-id", ""),
        "created": vm.created or None,
    }


def _ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise ValueError("`delete` is not a list of server ids")
    return [str(v) for v in value]


def run_reap(
    settings: Settings,
    *,
    cloud: Cloud | None = None,
    log: Callable[[str], None] = _log,
) -> int:
    settings.require("api_url", "oidc_audience", "token_request_url", "token_request_token")
    cloud = cloud or Cloud(settings)
    summary: dict[str, Any] = {
        "listed": 0,
        "deleted": [],
        "already_gone": [],
        "kept": 0,
        "refused": [],
        "failed": [],
    }
    servers = cloud.find_managed_servers()
    summary["listed"] = len(servers)
    log(f"{len(servers)} server(s) labelled managed-by={MANAGED_BY}")
    listed = {vm.id: vm for vm in servers}

    to_delete: list[str] = []
    api = ReaperApi(settings, log=log)
    try:
        for start in range(0, len(servers), BATCH):
            batch = [describe(vm) for vm in servers[start : start + BATCH]]
            answer = api.verdicts(batch)
            reasons = {
                str(v.get("server_id")): str(v.get("reason", ""))
                for v in answer.get("verdicts", [])
                if isinstance(v, dict)
            }
            for keep in answer.get("keep", []):
                if isinstance(keep, dict):
                    log(f"keep {keep.get('server_id')}: {keep.get('reason', '')}")
                    summary["kept"] += 1
            for server_id in _ids(answer.get("delete", [])):
                log(f"delete {server_id}: {reasons.get(server_id, 'no reason given')}")
                to_delete.append(server_id)
    except (ApiError, ApiUnavailable, ConfigError, ValueError) as exc:
        log(f"could not get verdicts, deleting nothing: {exc}")
        summary["error"] = str(exc)
        print(json.dumps(summary), flush=True)
        return EXIT_FAILED
    finally:
        api.close()

    if len(to_delete) > settings.reap_max_deletes:
        message = (
            f"the service asked to delete {len(to_delete)} servers, more than "
            f"RUNNER_REAP_MAX_DELETES={settings.reap_max_deletes}: deleting nothing"
        )
        log(message)
        summary["error"] = message
        print(json.dumps(summary), flush=True)
        return EXIT_FAILED

    for server_id in dict.fromkeys(to_delete):
        if server_id not in listed:
            log(f"refusing to delete {server_id}: this run did not list it")
            summary["refused"].append(server_id)
            continue
        try:
            current = cloud.get(server_id)
            if current is None:
                summary["already_gone"].append(server_id)
                log(f"{server_id} was already gone")
                continue
            if current.labels.get("managed-by") != MANAGED_BY:
                log(f"refusing to delete {server_id}: no longer labelled managed-by={MANAGED_BY}")
                summary["refused"].append(server_id)
                continue
            if cloud.delete(server_id):
                summary["deleted"].append(server_id)
                log(f"deleted {server_id} ({listed[server_id].name})")
            else:
                summary["already_gone"].append(server_id)
                log(f"{server_id} was already gone")
        except Exception as exc:  # one failed delete must not stop the others
            summary["failed"].append(server_id)
            log(f"could not delete {server_id}: {exc!r}")

    print(json.dumps(summary), flush=True)
    return EXIT_FAILED if summary["failed"] else EXIT_OK
