"""The field checks of a server create, one per field, in the order Hetzner reports them.

Each answers the problem entry for `invalid_input`'s `details.fields`, or None. The expressions
are the ones the API has always evaluated: an odd value (say an unhashable `server_type`) fails
in the same place it did before.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from provisioning.localdev.fake_hetzner.catalogue import IMAGES, LOCATIONS, SERVER_TYPES

# RFC 1123 host name, as Hetzner requires for server names.
_NAME_RE = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")
# Hetzner label values: up to 63 chars, alphanumerics plus - _ . inside.
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")

Problem = dict[str, Any]


def _problem(name: str, message: str) -> Problem:
    return {"name": name, "messages": [message]}


def check_name(name: Any) -> Problem | None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return _problem("name", "must be a valid hostname")
    return None


def check_server_type(server_type: Any) -> Problem | None:
    if server_type not in SERVER_TYPES:
        return _problem("server_type", "unknown server type")
    return None


def check_image(image: Any) -> Problem | None:
    if image not in IMAGES:
        return _problem("image", "unknown image")
    return None


def check_location(location: Any) -> Problem | None:
    if location not in LOCATIONS:
        return _problem("location", "unknown location")
    return None


def check_labels(labels: Any) -> Problem | None:
    if not isinstance(labels, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str)
        and _LABEL_KEY_RE.match(k)
        and _LABEL_VALUE_RE.match(v)
        for k, v in labels.items()
    ):
        return _problem("labels", "invalid label")
    return None


def check_ssh_keys(ssh_keys: Any, known: Collection[str]) -> Problem | None:
    if not isinstance(ssh_keys, list) or not all(
        isinstance(k, str | int) and (str(k) in known) for k in ssh_keys
    ):
        return _problem("ssh_keys", "ssh key not found")
    return None


def field_problems(
    *,
    name: Any,
    server_type: Any,
    image: Any,
    location: Any,
    labels: Any,
    ssh_keys: Any,
    known_ssh_keys: Collection[str],
) -> list[Problem]:
    """Every field problem, all checks run, in Hetzner's order."""
    found = [
        check_name(name),
        check_server_type(server_type),
        check_image(image),
        check_location(location),
        check_labels(labels),
        check_ssh_keys(ssh_keys, known_ssh_keys),
    ]
    return [p for p in found if p is not None]
