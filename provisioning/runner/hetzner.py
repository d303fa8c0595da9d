"""Hetzner Cloud: find, create, adopt and delete our VMs with `hcloud`.

Every VM the runner makes is named `agent-<job id>` and labelled `managed-by`, `job-id`,
`attempt` and `agent-id`, so a later attempt (or the cleanup run) finds it by its job, the
deprovision run finds every VM of an agent (whichever job or attempt made it), the reaper finds
all of ours, and a second create of the same name fails with `uniqueness_error` instead of
making a twin.

Every HTTP request to Hetzner goes through one `requests.Session` that counts it (`requests`,
and `on_request` so the runner can add it to the attempt's state) and answers Hetzner's 429
`rate_limit_exceeded` itself: it waits until `RateLimit-Reset` (when the project's budget is full
again) and sends the same request once more. hcloud's own retry of that code (a jittered
exponential backoff that knows nothing of the reset) is switched off, so a 429 is never retried
twice over; hcloud still retries what it always did (timeouts, 502/504, `conflict`), and the
session counts those requests too.

To keep the calls per build low: a first attempt creates without looking first (a lost create
answer comes back as `uniqueness_error`, which then finds the VM); the create's actions are
waited for together, polled with one `GET /actions?id=…` at a growing interval, the first poll
only after a pause; a VM whose actions succeeded is running (its address came with the create),
so it is not read again; a delete goes out without reading the server first.

Server types are sold per location: before ordering, the create step asks Hetzner where the
region's type (RUNNER_SERVER_TYPES) can be ordered and refuses, creating nothing, when no
location of the region sells it or it is deprecated there.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

import requests
from hcloud import APIException, Client
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer, Server
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

# Action polling: the first poll after one interval (RUNNER_HCLOUD_POLL_SECONDS), each next one
# twice as far, up to this many intervals apart; given up after ACTION_TIMEOUT_SECONDS.
POLL_BACKOFF_CAP_INTERVALS = 8
ACTION_TIMEOUT_SECONDS = 600.0

# A 429 waits until RateLimit-Reset (a full budget). One request waits at most this long in all;
# past it the 429 stands and the step fails like any Hetzner error (retried by the service).
RATE_LIMIT_MAX_WAIT_SECONDS = 3900.0
# Without a usable RateLimit-Reset (or one already past): wait this long, doubling each time.
RATE_LIMIT_FALLBACK_SECONDS = 1.0


class _Endpoint(TypedDict, total=False):
    api_endpoint: str  # absent: hcloud's own default


class CloudError(Exception):
    """Hetzner refused or failed in a way the runner cannot work around."""


def rate_limit_pause(headers: Mapping[str, str], *, now: float, fallback: float) -> float:
    """Seconds until `RateLimit-Reset` (epoch seconds), or `fallback` if it is missing or past."""
    try:
        reset = float(headers.get("RateLimit-Reset") or "")
    except ValueError:
        return fallback
    if not math.isfinite(reset) or reset <= now:
        return fallback
    return reset - now


class CountingSession(requests.Session):
    """hcloud's HTTP session: counts every request it sends and waits out 429s by RateLimit-Reset.

    `requests` is the count so far; `on_request` hears of each request as it leaves.
    """

    def __init__(
        self,
        *,
        on_request: Callable[[], None] = lambda: None,
        sleep: Callable[[float], object] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = lambda _msg: None,
        max_wait: float = RATE_LIMIT_MAX_WAIT_SECONDS,
    ) -> None:
        super().__init__()
        self.requests = 0
        self._on_request, self._sleep, self._wall_clock = on_request, sleep, wall_clock
        self._log, self._max_wait = log, max_wait

    def request(  # type: ignore[override]
        self, method: str, url: str, *args: Any, **kwargs: Any
    ) -> requests.Response:
        waited, fallback = 0.0, RATE_LIMIT_FALLBACK_SECONDS
        while True:
            self.requests += 1
            self._on_request()
            response = super().request(method, url, *args, **kwargs)
            if response.status_code != 429:
                return response
            pause = rate_limit_pause(response.headers, now=self._wall_clock(), fallback=fallback)
            if waited + pause > self._max_wait:
                return response  # hcloud raises rate_limit_exceeded (and no longer retries it)
            self._log(
                f"Hetzner answered 429 rate_limit_exceeded to {method} {url}; waiting "
                f"{pause:.1f}s for its RateLimit-Reset"
            )
            response.close()
            self._sleep(pause)
            waited += pause
            fallback = min(fallback * 2, 60.0)


def _without_rate_limit_retry(client: Client, session: requests.Session) -> None:
    """Give hcloud's API client our session, and stop it retrying 429s the session gave up on."""
    base = client._client  # hcloud 2.27: the ClientBase behind Client.request
    if not hasattr(base, "_session") or not hasattr(base, "_retry_policy"):
        raise ConfigError("this hcloud version has no session to count Hetzner requests with")
    original: Callable[[APIException], bool] = base._retry_policy

    def retry_policy(exc: APIException) -> bool:
        return exc.code != "rate_limit_exceeded" and original(exc)

    base._session = session
    setattr(base, "_retry_policy", retry_policy)  # noqa: B010 - an instance's own policy


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
        wall_clock: Callable[[], float] = time.time,
        on_request: Callable[[], None] = lambda: None,
        log: Callable[[str], None] = lambda _msg: None,
        rate_limit_max_wait: float = RATE_LIMIT_MAX_WAIT_SECONDS,
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
        self.session = CountingSession(
            on_request=on_request,
            sleep=sleep,
            wall_clock=wall_clock,
            log=log,
            max_wait=rate_limit_max_wait,
        )
        _without_rate_limit_retry(self._client, self.session)
        self._settings = settings

    @property
    def requests(self) -> int:
        """Requests this client sent to Hetzner (retries and 429s included)."""
        return self.session.requests

    def _poll_interval(self, polls: int) -> float:
        base = max(self._settings.hcloud_poll_seconds, 0.05)
        return min(base * 2.0**polls, base * POLL_BACKOFF_CAP_INTERVALS)

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
        if attempt > 1:
            # An earlier attempt may have left its VM: adopt it rather than order another.
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
                    # The limit is checked before the name: our VM may exist all the same.
                    adopted = self._adoptable(job_id)
                    if adopted is not None:
                        return adopted, adopted.labels.get("attempt") == str(attempt)
                    raise CapacityExhausted(
                        f"create server in {location}: {exc.code}: {exc.message}"
                    ) from exc
                if _location_refused(exc):
                    refusals.append(f"{location}: {exc.code}: {exc.message}")
                    continue
                raise CloudError(f"create server in {location}: {exc.code}: {exc.message}") from exc
            vm = Vm.from_bound(response.server)
            on_created(vm)
            self.wait_actions(
                [response.action.data_model, *(a.data_model for a in response.next_actions)]
            )
            # Created and started: running, at the address the create answered with.
            return replace(vm, status="running"), True
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

    def wait_actions(self, actions: Iterable[Any]) -> None:
        """Wait until every action (each with `id` and `status`) has finished; raise CloudError if
        one failed. Those still running are polled together, one request per poll."""
        pending = {int(a.id): str(a.status) for a in actions}
        failed = [f"action {i}" for i, status in pending.items() if status == "error"]
        pending = {i: status for i, status in pending.items() if status == "running"}
        deadline = self._clock() + ACTION_TIMEOUT_SECONDS
        polls = 0
        while pending and not failed:
            if self._clock() > deadline:
                raise CloudError(f"actions {sorted(pending)} still running after the timeout")
            self._sleep(self._poll_interval(polls))
            polls += 1
            answer = self._client.request(
                method="GET", url="/actions", params={"id": sorted(pending)}
            )
            for action in answer.get("actions") or []:
                status = str(action.get("status"))
                if status == "error":
                    error = action.get("error") or {}
                    failed.append(
                        f"action {action.get('command')} {action.get('id')}: "
                        f"{error.get('code')}: {error.get('message')}"
                    )
                if status != "running":
                    pending.pop(int(action.get("id")), None)
        if failed:
            raise CloudError("; ".join(failed))

    def wait_running(
        self,
        server_id: str,
        *,
        timeout: float,
        checkpoint: Callable[[], None],
        known: Vm | None = None,
    ) -> Vm:
        """The server once it runs with an address. `known` (what a create or listing already
        said about it) saves the first read when it is running already."""
        if known is not None and known.status == "running" and known.ipv4:
            checkpoint()
            return known
        deadline = self._clock() + timeout
        polls = 0
        while True:
            checkpoint()
            vm = self.get(server_id)
            if vm is None:
                raise CloudError(f"server {server_id} disappeared while starting")
            if vm.status == "running" and vm.ipv4:
                return vm
            if self._clock() > deadline:
                raise CloudError(f"server {server_id} still {vm.status!r} after {timeout:.0f}s")
            self._sleep(self._poll_interval(polls))
            polls += 1

    # -- delete ---------------------------------------------------------------------------
    def delete(self, server_id: str) -> bool:
        """Delete one server and wait; False if it was already gone."""
        deadline = self._clock() + LOCKED_RETRY_SECONDS
        pause = max(self._settings.hcloud_poll_seconds, 0.05)
        while True:
            try:
                action = self._client.servers.delete(Server(id=int(server_id)))
            except APIException as exc:
                if exc.code == "not_found":
                    return False
                if exc.code == "locked" and self._clock() + pause <= deadline:
                    self._sleep(pause)
                    pause = min(pause * 2, LOCKED_BACKOFF_CAP_SECONDS)
                    continue
                raise
            self.wait_actions([action.data_model])
            return True

    def delete_job_servers(self, job_id: str) -> list[Vm]:
        """Delete every VM labelled with this job; returns what was deleted."""
        deleted = []
        for vm in self.find_job_servers(job_id):
            if self.delete(vm.id):
                deleted.append(vm)
        return deleted
