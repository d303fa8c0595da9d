"""The background heartbeat: tells the service, every few seconds, which step a run is in.

Used as a thread by `Runner.start_heartbeat` (one process runs the whole pipeline) and as its
own process by the CLI's `heartbeat` command (each workflow step is a separate process).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .api import ApiError, ApiUnavailable, CallbackApi
from .config import ConfigError, Settings


def heartbeat_loop(
    *,
    settings: Settings,
    job_id: str,
    read: Callable[[], tuple[str, int, bool]],
    on_fenced: Callable[[str], None],
    stop: threading.Event,
    log: Callable[[str], None],
) -> None:
    """Every `RUNNER_HEARTBEAT_SECONDS`: send the current step; stop when fenced or done."""
    api = CallbackApi(settings, job_id, log=log)
    try:
        while not stop.wait(settings.heartbeat_seconds):
            step, progress, done = read()
            if done:
                return
            try:
                api.heartbeat(step, progress)
            except ApiError as exc:
                if exc.is_fenced:
                    log(f"heartbeat refused, stopping: {exc}")
                    on_fenced(str(exc))
                    return
                log(f"heartbeat refused: {exc}")
            except (ApiUnavailable, ConfigError) as exc:
                log(f"heartbeat got no answer: {exc}")
    finally:
        api.close()
