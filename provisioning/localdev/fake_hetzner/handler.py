"""The HTTP side: a threading server whose handler turns requests into `FakeHetzner.handle`
calls and answers JSON with Hetzner's headers (correlation id, RateLimit-*)."""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from provisioning.localdev.fake_hetzner.errors import ApiError

if TYPE_CHECKING:
    from provisioning.localdev.fake_hetzner.api import FakeHetzner


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeHetzner) -> None:
        super().__init__(address, _Handler)
        self.fake = fake


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "FakeHetzner/1.0"
    protocol_version = "HTTP/1.1"

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not token or (fake.token is not None and token != fake.token):
                raise ApiError(401, "unauthorized", "unable to authenticate")
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                raise ApiError(400, "json_error", "invalid JSON in request body") from exc
            status, payload = fake.handle(method, split.path, parse_qs(split.query), body)
        except ApiError as err:
            status = err.status
            payload = err.body()
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Correlation-Id", f"fake-{time.monotonic_ns():x}")
        for header, value in fake.rate_headers().items():
            self.send_header(header, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            sys.stderr.write(f"fake-hetzner: {format % args}\n")
