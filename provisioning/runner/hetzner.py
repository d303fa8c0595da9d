"""Hetzner Cloud: find, create, adopt and delete our VMs with `hcloud`.

Every VM the runner makes is named `agent-<job id>` and labelled `managed-by`, `job-id`,
`attempt` and `agent-id`, so a later attempt (or the cleanup run) finds it by its job, the
deprovision run finds every VM of an agent (whichever job or attempt made it), the reaper finds
all of ours, and a second create of the same name fails with `uniqueness_error` instead of
making a twin.

Server types are sold per location: before ordering, the create step asks Hetzner where the
region's type (RUNNER_SERVER_TYPES) can be ordered and refuses, creating nothing, when no
location of the region sells it or it is deprecated there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

from hcloud import APIException, Client
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer
from hcloud.ssh_keys import SSHKey

from .config import MANAGED_BY, REGION_LOCATIONS, ConfigError, Settings

# Hetzner label values: up to 63 chars of [A-Za-z0-9-_.], starting and ending alphanumeric.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")

# Codes Hetzner uses when a location cannot take this server type right now. A type not sold in
# a location is an `invalid_input` naming the location (see _location_refused).
_TRY_NEXT_LOCATION = {"resource_unavailable", "placement_error"}

# A delete answered `locked` (an action on the server still runs, e.g. its create): hcloud does
# not retry that itself, so the runner waits and retries, doubling the pause up to the cap.
LOCKED_RETRY_SECONDS = 300.0
LOCKED_BACKOFF_CAP_SECONDS = 15.0


class _Endpoint(TypedDict, total=False):
    api_endpoint: str  # absent: hcloud's own default


class CloudError(Exception):
    """Hetzner refused or failed in a way the runner cannot work around."""


class CapacityExhausted(CloudError):
    """The Hetzner project is at its server limit (`resource_limit_exceeded`): no location can
    help, and nothing is wrong with the job; the service waits for a VM to be freed."""


def _location_refused(exc: APIException) -> bool:
    """Whether this create refusal is about the location, so the next location may accept."""
    if exc.code in _TRY_NEXT_LOCATION:
        return True
    if exc.code != "invalid_input":
        return False
    details = exc.details if isinstance(exc.details, dict) else {}
    fields = details.get("fields") or []
    names = {f.get("name") for f in fields if isinstance(f, dict)}
    return bool(names & {"location", "server_type"}) or "location" in str(exc.message).lower()


@dataclass(frozen=True)
class Vm:
    id: str
    name: str
    ipv4: str
    location: str
    labels: dict[str, str]
    status: str
    created: str = field(default="", compare=False)  # ISO 8601, as Hetzner reports it

    @classmethod
    def from_bound(cls, server: BoundServer) -> Vm:
        ipv4 = ""
        if server.public_net is not None and server.public_net.ipv4 is not None:
            ipv4 = server.public_net.ipv4.ip
        return cls(
            id=str(server.id),
            name=server.name or "",
            ipv4=ipv4,
            location=(server.location.name or "") if server.location is not None else "",
            labels=dict(server.labels or {}),
            status=server.status or "",
            created=server.created.isoformat() if server.created is not None else "",
        )


def server_name(job_id: str) -> str:
    return f"agent-{job_id}"


def job_selector(job_id: str) -> str:
    return f"managed-by={MANAGED_BY},job-id={job_id}"


def agent_selector(agent_id: str) -> str:
    return f"managed-by={MANAGED_BY},agent-id={agent_id}"


def managed_selector() -> str:
    return f"managed-by={MANAGED_BY}"


def valid_label_value(value: str) -> bool:
    return bool(_LABEL_VALUE.match(value))


class Cloud:
    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings.require("hcloud_token")
        self._sleep, self._clock = sleep, clock
        kwargs: _Endpoint = (
            {"api_endpoint": settings.hcloud_endpoint} if settings.hcloud_endpoint else {}
        )
        self._client = Client(
            token=settings.hcloud_token,
            application_name="agent-provisioning-runner",
            poll_interval=settings.hcloud_poll_seconds or 0.05,
            timeout=settings.http_timeout_seconds,
            **kwargs,
        )
        self._settings = settings

    # -- reads ----------------------------------------------------------------------------
    def find(self, label_selector: str) -> list[Vm]:
        """Every server matching the selector (all pages)."""
        return [
            Vm.from_bound(s) for s in self._client.servers.get_all(label_selector=label_selector)
        ]

    def find_job_servers(self, job_id: str) -> list[Vm]:
        return self.find(job_selector(job_id))

    def find_agent_servers(self, agent_id: str) -> list[Vm]:
        if not valid_label_value(agent_id):
            raise ConfigError(f"agent id {agent_id!r} cannot be a Hetzner label value")
        return self.find(agent_selector(agent_id))

    def find_managed_servers(self) -> list[Vm]:
        return self.find(managed_selector())

    def get(self, server_id: str) -> Vm | None:
        try:
            return Vm.from_bound(self._client.servers.get_by_id(int(server_id)))
        except APIException as exc:
            if exc.code == "not_found":
                return None
            raise

    # -- create or adopt ------------------------------------------------------------------
    def find_or_create(
        self,
        *,
        job_id: str,
        attempt: int,
        region: str,
        agent_id: str,
        on_created: Callable[[Vm], None],
    ) -> tuple[Vm, bool]:
        """The job's VM and whether this attempt created it.

        A VM labelled with this job counts as ours only if its `attempt` label is this attempt
        (a create whose answer we lost); one from an earlier attempt is adopted, never owned.
        `on_created` runs as soon as a create is accepted, before waiting on its actions, so the
        caller can record the VM before anything else can go wrong.
        """
        existing = self._adoptable(job_id)
        if existing is not None:
            return existing, existing.labels.get("attempt") == str(attempt)

        server_type, locations = self.placement(region)
        key_name = self._settings.ssh_key_name
        if not key_name:
            if not self._settings.simulate:
                raise ConfigError("missing required environment: RUNNER_SSH_KEY_NAME")
            key_name = "agent-provisioning-local"

        if not valid_label_value(agent_id):
            # Without it the deprovision run could not find this VM by its agent.
            raise ConfigError(f"agent id {agent_id!r} cannot be a Hetzner label value")
        labels = {
            "managed-by": MANAGED_BY,
            "job-id": job_id,
            "attempt": str(attempt),
            "agent-id": agent_id,
        }
        refusals: list[str] = []
        for location in locations:
            try:
                response = self._client.servers.create(
                    name=server_name(job_id),
                    server_type=ServerType(name=server_type),
                    image=Image(name=self._settings.image),
                    location=Location(name=location),
                    ssh_keys=[SSHKey(name=key_name)],
                    labels=labels,
                )
            except APIException as exc:
                if exc.code == "uniqueness_error":
                    adopted = self._adoptable(job_id) or self._by_name(job_id)
                    if adopted is None:
                        raise CloudError(
                            f"server name {server_name(job_id)} is taken but no server has it"
                        ) from exc
                    return adopted, adopted.labels.get("attempt") == str(attempt)
                if exc.code == "resource_limit_exceeded":
                    raise CapacityExhausted(
                        f"create server in {location}: {exc.code}: {exc.message}"
                    ) from exc
                if _location_refused(exc):
                    refusals.append(f"{location}: {exc.code}: {exc.message}")
                    continue
                raise CloudError(f"create server in {location}: {exc.code}: {exc.message}") from exc
            vm = Vm.from_bound(response.server)
            on_created(vm)
            response.action.wait_until_finished()
            for action in response.next_actions:
                action.wait_until_finished()
            return vm, True
        raise CloudError(
            f"no location in region {region} can take a {server_type}: " + "; ".join(refusals)
        )

    def placement(self, region: str) -> tuple[str, tuple[str, ...]]:
        """The region's server type and the locations, in the region's order, that sell it now
        without a deprecation. Raises (creating nothing) when there is none."""
        locations = REGION_LOCATIONS.get(region)
        if not locations:
            raise ConfigError(f"no Hetzner location for region {region!r}")
        server_type = self._settings.server_types.get(region)
        if not server_type:
            raise ConfigError(f"no server type for region {region!r} (RUNNER_SERVER_TYPES)")
        found = self._client.server_types.get_by_name(server_type)
        if found is None:
            raise CloudError(
                f"server type {server_type} for region {region} does not exist at Hetzner; "
                "choose another with RUNNER_SERVER_TYPES"
            )
        offered = {
            entry.location.name: entry
            for entry in found.locations or []
            if entry.location is not None and entry.location.name
        }
        usable: list[str] = []
        refusals: list[str] = []
        for location in locations:
            entry = offered.get(location)
            if entry is None:
                refusals.append(f"{location}: not sold there")
            elif entry.deprecation is not None:
                until = entry.deprecation.unavailable_after
                refusals.append(
                    f"{location}: deprecated"
                    + (f" (unavailable after {until:%Y-%m-%d})" if until is not None else "")
                )
            else:
                usable.append(location)
        if not usable:
            raise CloudError(
                f"server type {server_type} cannot be ordered in region {region} "
                f"({'; '.join(refusals)}); choose another with RUNNER_SERVER_TYPES"
            )
        return server_type, tuple(usable)

    def _adoptable(self, job_id: str) -> Vm | None:
        servers = self.find_job_servers(job_id)
        for vm in servers:
            if vm.name == server_name(job_id):
                return vm
        return servers[0] if servers else None

    def _by_name(self, job_id: str) -> Vm | None:
        server = self._client.servers.get_by_name(server_name(job_id))
        if server is None:
            return None
        vm = Vm.from_bound(server)
        if vm.labels.get("job-id") != job_id:
            raise CloudError(f"server {vm.name} exists but is not labelled for job {job_id}")
        return vm

    def wait_running(self, server_id: str, *, timeout: float, checkpoint: Callable[[], None]) -> Vm:
        deadline = self._clock() + timeout
        while True:
            checkpoint()
            vm = self.get(server_id)
            if vm is None:
                raise CloudError(f"server {server_id} disappeared while starting")
            if vm.status == "running" and vm.ipv4:
                return vm
            if self._clock() > deadline:
                raise CloudError(f"server {server_id} still {vm.status!r} after {timeout:.0f}s")
            self._sleep(max(self._settings.hcloud_poll_seconds, 0.05))

    # -- delete ---------------------------------------------------------------------------
    def delete(self, server_id: str) -> bool:
        """Delete one server and wait; False if it was already gone."""
        deadline = self._clock() + LOCKED_RETRY_SECONDS
        pause = max(self._settings.hcloud_poll_seconds, 0.05)
        while True:
            try:
                server = self._client.servers.get_by_id(int(server_id))
                action = self._client.servers.delete(server)
            except APIException as exc:
                if exc.code == "not_found":
                    return False
                if exc.code == "locked" and self._clock() + pause <= deadline:
                    self._sleep(pause)
                    pause = min(pause * 2, LOCKED_BACKOFF_CAP_SECONDS)
                    continue
                raise
            action.wait_until_finished()
            return True

    def delete_job_servers(self, job_id: str) -> list[Vm]:
        """Delete every VM labelled with this job; returns what was deleted."""
        deleted = []
        for vm in self.find_job_servers(job_id):
            if self.delete(vm.id):
                deleted.append(vm)
        return deleted
