"""How the fake renders what it holds as Hetzner's JSON: servers, server types, pages.

A mixin of `FakeHetzner`: the rendering reads the live state (a server's status follows its
create action; a server type's locations follow what tests withdrew or made unavailable).
"""

from __future__ import annotations

import time
from typing import Any

from provisioning.localdev.fake_hetzner.catalogue import (
    LOCATIONS,
    SERVER_TYPES,
    image_json,
    location_json,
)
from provisioning.localdev.fake_hetzner.errors import ApiError
from provisioning.localdev.fake_hetzner.state import _State


class _Rendering:
    _state: _State

    @staticmethod
    def _by_name(items: list[dict[str, Any]], query: dict[str, list[str]]) -> list[dict[str, Any]]:
        names = query.get("name")
        return [i for i in items if i["name"] in names] if names else items

    @staticmethod
    def _page(key: str, items: list[Any], query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            page = max(1, int(query.get("page", ["1"])[0]))
            per_page = min(50, max(1, int(query.get("per_page", ["25"])[0])))
        except ValueError as exc:
            raise ApiError(400, "invalid_input", "page and per_page must be integers") from exc
        last_page = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        return {
            key: chunk,
            "meta": {
                "pagination": {
                    "page": page,
                    "per_page": per_page,
                    "previous_page": page - 1 if page > 1 else None,
                    "next_page": page + 1 if page < last_page else None,
                    "last_page": last_page,
                    "total_entries": len(items),
                }
            },
        }

    def _status(self, server: dict[str, Any]) -> str:
        action = self._state.actions.get(self._state.create_action.get(server["id"], -1))
        if action is not None and time.monotonic() < action.done_at:
            return "initializing"
        return "running"

    def _server_json(self, server: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": server["id"],
            "name": server["name"],
            "status": self._status(server),
            "created": server["created"],
            "public_net": {
                "ipv4": {
                    "id": server["id"] + 7,
                    "ip": server["ipv4"],
                    "blocked": False,
                    "dns_ptr": f"static.{server['ipv4']}.clients.your-server.de",
                },
                "ipv6": {
                    "id": server["id"] + 8,
                    "ip": server["ipv6"],
                    "blocked": False,
                    "dns_ptr": [],
                },
                "floating_ips": [],
                "firewalls": [],
            },
            "private_net": [],
            "server_type": self._server_type_json(server["server_type"]),
            "location": self._location_json(server["location"]),
            "image": self._image_json(server["image"]),
            "iso": None,
            "rescue_enabled": False,
            "locked": False,
            "backup_window": None,
            "outgoing_traffic": 0,
            "ingoing_traffic": 0,
            "included_traffic": 21990232555520,
            "protection": {"delete": False, "rebuild": False},
            "labels": dict(server["labels"]),
            "volumes": [],
            "load_balancers": [],
            "primary_disk_size": SERVER_TYPES[server["server_type"]]["disk"],
            "placement_group": None,
            # Not part of Hetzner's answer; kept so tests can check a key was passed.
            "x_fake_ssh_keys": list(server["ssh_keys"]),
        }

    def _server_type_json(self, name: str) -> dict[str, Any]:
        spec = SERVER_TYPES[name]
        listed = [
            loc
            for loc in spec["locations"]
            if self._state.withdrawn.get((name, loc), True)  # absent, or withdrawn but listed
        ]
        return {
            **{k: v for k, v in spec.items() if k not in ("locations", "deprecation")},
            "name": name,
            "description": name.upper(),
            "storage_type": "local",
            "prices": [],
            # The type-wide field is kept for older clients; the per-location one is current.
            "deprecation": spec["deprecation"],
            "locations": [
                {
                    "id": LOCATIONS[loc]["id"],
                    "name": loc,
                    "deprecation": spec["deprecation"],
                    "available": (loc, None) not in self._state.unavailable
                    and (loc, name) not in self._state.unavailable,
                    "recommended": spec["deprecation"] is None,
                }
                for loc in listed
            ],
        }

    @staticmethod
    def _location_json(name: str) -> dict[str, Any]:
        return location_json(name)

    @staticmethod
    def _image_json(name: str) -> dict[str, Any]:
        return image_json(name)
