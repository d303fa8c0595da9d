"""A clock for code that takes `sleep` and `clock` (the runner's waits): virtual time, no waiting.

`sleep(s)` records `s` and moves `now()` on by `s` at once, so a 7-minute SSH wait or a claim
retried for a minute runs in microseconds and the test can assert exactly how it was paced.
"""

from __future__ import annotations

import threading


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += seconds

    @property
    def slept(self) -> float:
        with self._lock:
            return sum(self.sleeps)
