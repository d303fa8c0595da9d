"""The agent service's placeholder process: a health endpoint the provisioning runner polls.

`GET /healthz` answers `{"status": "ok", ...}` once the process is up. The real agent program
replaces this file; the endpoint's shape is the contract with the runner's health-check step.
Standard library only: it runs in the VM's fresh virtual environment.
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SETTINGS_PATH = os.environ.get("AGENT_SETTINGS", "/etc/agent/agent.json")
STARTED = time.monotonic()


def load_settings() -> dict[str, Any]:
    with open(SETTINGS_PATH, encoding="utf-8") as handle:
        settings = json.load(handle)
    if not isinstance(settings, dict):
        raise SystemExit(f"{SETTINGS_PATH}: expected a JSON object")
    return settings


class AgentServer(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], settings: dict[str, Any]) -> None:
        super().__init__(address, Health)
        self.settings = settings


class Health(BaseHTTPRequestHandler):
    server: AgentServer
    server_version = "agent/0.1"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/healthz":
            self.send_error(404)
            return
        body = json.dumps(
            {
                "status": "ok",
                "job_id": self.server.settings.get("job_id", ""),
                "uptime_seconds": round(time.monotonic() - STARTED, 1),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("healthz: " + format % args + "\n")


def main() -> None:
    settings = load_settings()
    port = int(settings.get("health_port", 8080))
    server = AgentServer(("0.0.0.0", port), settings)  # noqa: S104 - the runner polls it from outside
    print(f"agent {settings.get('name', '')!r} listening on :{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
