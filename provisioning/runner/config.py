"""The runner's settings, read from the environment once per process.

Each part checks only what it needs (`require`), so `cleanup` works without the callback API's
settings and simulated runs work without SSH keys.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

STEPS = ("claim", "create-server", "wait-ssh", "configure", "health-check", "complete")
MODES = ("provision", "cleanup", "deprovision")

# Hetzner network zones, in the order the runner tries their locations.
REGION_LOCATIONS: dict[str, tuple[str, ...]] = {
    "us-east": ("ash",),
    "us-west": ("hil",),
    "eu-central": ("fsn1", "nbg1", "hel1"),
    "ap-southeast": ("sin",),
}

# The server type each region builds, unless RUNNER_SERVER_TYPES says otherwise. Hetzner sells
# server types per location: the cost-optimized CX line only in Europe, the regular CPX line
# everywhere. The create step checks the choice against Hetzner's listing before ordering.
DEFAULT_SERVER_TYPES: dict[str, str] = {
    "us-east": "cpx22",
    "us-west": "cpx22",
    "eu-central": "cx23",
    "ap-southeast": "cpx22",
}

MANAGED_BY = "agent-provisioning"
PLAYBOOK = Path(__file__).resolve().parent / "playbook" / "site.yml"


class ConfigError(Exception):
    """A required setting is missing or malformed."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def _step(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if raw and raw not in STEPS:
        raise ConfigError(f"{name} must be one of {', '.join(STEPS)}, got {raw!r}")
    return raw or None


def _server_types(env: Mapping[str, str]) -> dict[str, str]:
    """DEFAULT_SERVER_TYPES with RUNNER_SERVER_TYPES laid over it: a JSON object or
    `region=type,region=type`; regions it does not name keep their default."""
    if (env.get("RUNNER_SERVER_TYPE") or "").strip():
        # One type for every region cannot work once types are sold per location: say so
        # rather than silently ignore the old variable.
        raise ConfigError(
            "RUNNER_SERVER_TYPE is no longer read: set RUNNER_SERVER_TYPES "
            "(region=type,…), e.g. eu-central=cx23,us-east=cpx22"
        )
    raw = (env.get("RUNNER_SERVER_TYPES") or "").strip()
    chosen = dict(DEFAULT_SERVER_TYPES)
    if not raw:
        return chosen
    pairs: list[tuple[object, object]]
    if raw.startswith("{"):
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"RUNNER_SERVER_TYPES is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ConfigError("RUNNER_SERVER_TYPES must be a JSON object of region: type")
        pairs = list(parsed.items())
    else:
        pairs = []
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"RUNNER_SERVER_TYPES: {item!r} is not region=type")
            pairs.append((name.strip(), value.strip()))
    for region, server_type in pairs:
        if not isinstance(region, str):
            raise ConfigError("RUNNER_SERVER_TYPES: region names are strings")
        if region not in REGION_LOCATIONS:
            raise ConfigError(
                f"RUNNER_SERVER_TYPES names unknown region {region!r} "
                f"(known: {', '.join(REGION_LOCATIONS)})"
            )
        if not isinstance(server_type, str) or not server_type:
            raise ConfigError(f"RUNNER_SERVER_TYPES: region {region} needs a server type name")
        chosen[region] = server_type
    return chosen


def _default_state_file(env: Mapping[str, str]) -> Path:
    if env.get("RUNNER_TEMP"):
        return Path(env["RUNNER_TEMP"]) / "provision-state.json"
    return Path(".runner-state.json")


@dataclass(frozen=True)
class Settings:
    # the service's callback API and the OIDC token endpoint
    api_url: str
    oidc_audience: str
    token_request_url: str
    token_request_token: str
    # Hetzner
    hcloud_token: str
    hcloud_endpoint: str | None
    server_types: dict[str, str]  # region -> Hetzner server type name
    image: str
    ssh_key_name: str | None
    hcloud_poll_seconds: float
    # pacing
    heartbeat_seconds: float
    claim_retry_seconds: float
    retry_backoff_seconds: float
    http_timeout_seconds: float
    # the VM
    ssh_private_key_file: str | None
    ssh_user: str
    ssh_timeout_seconds: float
    health_port: int
    health_timeout_seconds: float
    ansible_playbook: str
    # local simulation knobs
    simulate: bool
    step_seconds: float
    fail_step: str | None
    kill_at_step: str | None
    # the reaper: more deletions than this in one answer and it deletes nothing (a safety stop)
    reap_max_deletes: int
    # where the per-step commands share what they learned
    state_file: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        try:
            health_port = int(env.get("RUNNER_HEALTH_PORT", "") or 8080)
        except ValueError as exc:
            raise ConfigError("RUNNER_HEALTH_PORT must be an integer") from exc
        try:
            reap_max_deletes = int(env.get("RUNNER_REAP_MAX_DELETES", "") or 25)
        except ValueError as exc:
            raise ConfigError("RUNNER_REAP_MAX_DELETES must be an integer") from exc
        return cls(
            api_url=env.get("PROVISIONING_API_URL", "").rstrip("/"),
            oidc_audience=env.get("PROVISIONING_OIDC_AUDIENCE", ""),
            token_request_url=env.get("ACTIONS_ID_TOKEN_REQUEST_URL", ""),
            token_request_token=env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN", ""),
            hcloud_token=env.get("HCLOUD_TOKEN", ""),
            hcloud_endpoint=env.get("HCLOUD_API_ENDPOINT") or None,
            server_types=_server_types(env),
            image=env.get("RUNNER_IMAGE") or "ubuntu-24.04",
            ssh_key_name=env.get("RUNNER_SSH_KEY_NAME") or None,
            hcloud_poll_seconds=_float(env, "RUNNER_HCLOUD_POLL_SECONDS", 1.0),
            heartbeat_seconds=_float(env, "RUNNER_HEARTBEAT_SECONDS", 60.0) or 60.0,
            claim_retry_seconds=_float(env, "RUNNER_CLAIM_RETRY_SECONDS", 60.0),
            retry_backoff_seconds=_float(env, "RUNNER_RETRY_BACKOFF_SECONDS", 2.0),
            http_timeout_seconds=_float(env, "RUNNER_HTTP_TIMEOUT_SECONDS", 30.0) or 30.0,
            ssh_private_key_file=env.get("RUNNER_SSH_PRIVATE_KEY_FILE") or None,
            ssh_user=env.get("RUNNER_SSH_USER") or "root",
            ssh_timeout_seconds=_float(env, "RUNNER_SSH_TIMEOUT_SECONDS", 420.0),
            health_port=health_port,
            health_timeout_seconds=_float(env, "RUNNER_HEALTH_TIMEOUT_SECONDS", 180.0),
            ansible_playbook=env.get("RUNNER_ANSIBLE_PLAYBOOK") or "ansible-playbook",
            simulate=env.get("RUNNER_SIMULATE", "").strip().lower() in {"1", "true", "yes"},
            step_seconds=_float(env, "RUNNER_STEP_SECONDS", 2.0),
            fail_step=_step(env, "RUNNER_FAIL_STEP"),
            kill_at_step=_step(env, "RUNNER_KILL_AT_STEP"),
            reap_max_deletes=reap_max_deletes,
            state_file=Path(env["RUNNER_STATE_FILE"])
            if env.get("RUNNER_STATE_FILE")
            else _default_state_file(env),
        )

    def require(self, *names: str) -> None:
        """Raise ConfigError naming every environment variable behind an empty setting."""
        env_names = {
            "api_url": "PROVISIONING_API_URL",
            "oidc_audience": "PROVISIONING_OIDC_AUDIENCE",
            "token_request_url": "ACTIONS_ID_TOKEN_REQUEST_URL",
            "token_request_token": "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
            "hcloud_token": "HCLOUD_TOKEN",
            "ssh_key_name": "RUNNER_SSH_KEY_NAME",
            "ssh_private_key_file": "RUNNER_SSH_PRIVATE_KEY_FILE",
        }
        missing = [env_names.get(n, n) for n in names if not getattr(self, n)]
        if missing:
            raise ConfigError(f"missing required environment: {', '.join(missing)}")


def private_temp_dir() -> Path:
    """A directory only this process's user can read (known_hosts, Ansible variables)."""
    return Path(tempfile.mkdtemp(prefix="provision-runner-"))
