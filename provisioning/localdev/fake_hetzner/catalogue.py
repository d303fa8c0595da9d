"""What the fake sells: locations, server types (per location, with deprecations) and images.

The ids and specs mirror Hetzner's own so `hcloud` parses them like real answers.
"""

from __future__ import annotations

from typing import Any

LOCATIONS: dict[str, dict[str, Any]] = {
    "fsn1": {
        "id": 1,
        "description": "Falkenstein DC Park 1",
        "country": "DE",
        "city": "Falkenstein",
        "latitude": 50.47612,
        "longitude": 12.370071,
        "network_zone": "eu-central",
    },
    "nbg1": {
        "id": 2,
        "description": "Nuremberg DC Park 1",
        "country": "DE",
        "city": "Nuremberg",
        "latitude": 49.452102,
        "longitude": 11.076665,
        "network_zone": "eu-central",
    },
    "hel1": {
        "id": 3,
        "description": "Helsinki DC Park 1",
        "country": "FI",
        "city": "Helsinki",
        "latitude": 60.169855,
        "longitude": 24.938379,
        "network_zone": "eu-central",
    },
    "ash": {
        "id": 4,
        "description": "Ashburn, VA",
        "country": "US",
        "city": "Ashburn, VA",
        "latitude": 39.045821,
        "longitude": -77.487073,
        "network_zone": "us-east",
    },
    "hil": {
        "id": 5,
        "description": "Hillsboro, OR",
        "country": "US",
        "city": "Hillsboro, OR",
        "latitude": 45.54222,
        "longitude": -122.95194,
        "network_zone": "us-west",
    },
    "sin": {
        "id": 6,
        "description": "Singapore",
        "country": "SG",
        "city": "Singapore",
        "latitude": 1.283333,
        "longitude": 103.833333,
        "network_zone": "ap-southeast",
    },
}
# Server types are sold per location. The first-generation CPX and second-generation CX types
# were deprecated in every location and can no longer be ordered; the current ones are sold where
# listed: CX (gen 3) in Europe only, CPX (gen 2) everywhere, CAX (Arm) in Europe only.
_EU = ("fsn1", "nbg1", "hel1")
_EVERYWHERE = (*_EU, "ash", "hil", "sin")
_GONE = {"announced": "2025-10-16T06:00:00Z", "unavailable_after": "2026-01-01T00:00:00Z"}
SERVER_TYPES: dict[str, dict[str, Any]] = {
    "cpx11": {
        "id": 22,
        "cores": 2,
        "memory": 2.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": _GONE,
    },
    "cpx21": {
        "id": 23,
        "cores": 3,
        "memory": 4.0,
        "disk": 80,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": _GONE,
    },
    "cx22": {
        "id": 104,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "cost_optimized",
        "locations": _EU,
        "deprecation": _GONE,
    },
    "cx23": {
        "id": 114,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "cost_optimized",
        "locations": _EU,
        "deprecation": None,
    },
    "cpx22": {
        "id": 118,
        "cores": 2,
        "memory": 4.0,
        "disk": 80,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": None,
    },
    "cpx32": {
        "id": 119,
        "cores": 4,
        "memory": 8.0,
        "disk": 160,
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "regular_purpose",
        "locations": _EVERYWHERE,
        "deprecation": None,
    },
    "cax11": {
        "id": 45,
        "cores": 2,
        "memory": 4.0,
        "disk": 40,
        "cpu_type": "shared",
        "architecture": "arm",
        "category": "cost_optimized",
        "locations": _EU,
        "deprecation": None,
    },
}
IMAGES: dict[str, dict[str, Any]] = {
    "ubuntu-24.04": {
        "id": 161547269,
        "os_flavor": "ubuntu",
        "os_version": "24.04",
        "description": "Ubuntu 24.04",
    },
    "ubuntu-22.04": {
        "id": 67794396,
        "os_flavor": "ubuntu",
        "os_version": "22.04",
        "description": "Ubuntu 22.04",
    },
    "debian-12": {
        "id": 114690387,
        "os_flavor": "debian",
        "os_version": "12",
        "description": "Debian 12",
    },
}


def location_json(name: str) -> dict[str, Any]:
    return {"name": name, **LOCATIONS[name]}


def image_json(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "system",
        "status": "available",
        "architecture": "x86",
        "rapid_deploy": True,
        "protection": {"delete": False},
        "labels": {},
        "deprecation": None,
        **IMAGES[name],
    }
