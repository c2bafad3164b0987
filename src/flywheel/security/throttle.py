"""Login throttling: too many failed logins from one address or for one account wait."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class LoginThrottle:
    """Counts failures per key (an address, a username) in a sliding window.

    ``retry_after(keys)`` is 0 while every key is under ``max_failures`` in the last
    ``window_seconds``, else the seconds until the oldest counted failure ages out. A
    success does not reset the count, so guessing between two known logins gains nothing.
    """

    def __init__(
        self,
        max_failures: int = 10,
        window_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_seconds:
            times.popleft()
        return times

    def retry_after(self, *keys: str) -> float:
        """Seconds to wait before another attempt for any of ``keys`` (0: go ahead)."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                if len(times) >= self.max_failures:
                    wait = max(wait, times[0] + self.window_seconds - now)
        return wait

    def failed(self, *keys: str) -> None:
        """Count one failed attempt against each of ``keys``."""
        now = self._clock()
        with self._lock:
            if len(self._failures) > 100_000:  # bound memory under a spray of addresses
                self._failures.clear()
            for key in keys:
                self._recent(key, now).append(now)
