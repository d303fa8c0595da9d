"""Stripe faked at the wire: an HTTP client that refuses every call unless a test gives it answers.

Installed for the whole suite as `stripe.default_http_client` (tests/conftest.py), so neither
dj-stripe's module-level calls nor a StripeClient built without its own client can reach the
network. `calls` records what was attempted, refused or not.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import stripe


@dataclass
class Call:
    method: str
    path: str
    post_data: Any


class RefusingHTTPClient(stripe.HTTPClient):
    """Refuses (APIConnectionError, no retries) unless `answer(method, path, body)` matched."""

    name = "refusing"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self._answers: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def answer(self, method: str, path: str, body: dict[str, Any], status: int = 200) -> None:
        self._answers[(method.lower(), path)] = (status, body)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        path = urlsplit(url).path
        with self._lock:
            self.calls.append(Call(method=method.lower(), path=path, post_data=post_data))
        canned = self._answers.get((method.lower(), path))
        if canned is None:
            raise stripe.APIConnectionError(
                f"Stripe API call refused in tests: {method.upper()} {path}", should_retry=False
            )
        status, body = canned
        return json.dumps(body), status, {"request-id": "req_test"}

    def close(self) -> None:
        pass
