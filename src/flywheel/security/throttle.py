"""Login throttling: too many failed logins from one address or for one account wait.

:class:`LoginThrottle` counts in this process. :class:`SharedLoginThrottle` counts in Redis,
so that every gateway replica sees the same failures (an attacker spreading guesses over the
replicas behind a load balancer gains nothing); when Redis fails it falls back to counting in
this process, and tries Redis again a few seconds later.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("flywheel.security")

# After a Redis error, how long to use the local count before trying Redis again (so a dead
# Redis costs one connect timeout per few seconds, not one per login).
REDIS_RETRY_SECONDS = 5.0


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


class SharedLoginThrottle(LoginThrottle):
    """A :class:`LoginThrottle` whose counts live in Redis, shared by every replica.

    Each key is a sorted set of failure times (``<prefix><key>``) trimmed to the window and
    to the newest ``max_failures`` entries, with a TTL of the window. Failures are also
    counted in this process, so that when Redis fails (an error or a timeout) the local count
    takes over with this replica's recent history instead of starting from nothing.

    Time is the wall clock (``time.time``): replicas on several hosts must share it.
    """

    def __init__(
        self,
        redis_client: Any,
        max_failures: int = 10,
        window_seconds: float = 300.0,
        *,
        prefix: str = "flywheel:login:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_failures, window_seconds, clock)
        self.redis = redis_client
        self.prefix = prefix
        self._down_until = 0.0

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _redis_failed(self, exc: Exception) -> None:
        if self._usable():
            log.warning("login throttle: Redis failed (%s); counting in this process", exc)
        self._down_until = time.monotonic() + REDIS_RETRY_SECONDS

    def retry_after(self, *keys: str) -> float:
        """Seconds to wait before another attempt for any of ``keys`` (0: go ahead), from
        the counts every replica shares (this process's own when Redis fails)."""
        if not keys or not self._usable():
            return super().retry_after(*keys)
        now = self._clock()
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                name = self.prefix + key
                pipe.zremrangebyscore(name, "-inf", now - self.window_seconds)
                pipe.zcard(name)
                pipe.zrange(name, 0, 0, withscores=True)
            replies = pipe.execute()
        except Exception as exc:  # any Redis failure: connection, timeout, protocol
            self._redis_failed(exc)
            return super().retry_after(*keys)
        wait = 0.0
        for at in range(0, len(replies), 3):
            count, oldest = replies[at + 1], replies[at + 2]
            if count >= self.max_failures and oldest:
                wait = max(wait, float(oldest[0][1]) + self.window_seconds - now)
        return max(wait, 0.0)

    def failed(self, *keys: str) -> None:
        """Count one failed attempt against each of ``keys``, here and (when it answers) in
        Redis."""
        super().failed(*keys)
        if not keys or not self._usable():
            return
        now = self._clock()
        ttl = math.ceil(self.window_seconds) + 1
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                name = self.prefix + key
                pipe.zadd(name, {uuid.uuid4().hex: now})
                pipe.zremrangebyscore(name, "-inf", now - self.window_seconds)
                # Only the newest max_failures matter: the oldest of them says when to retry.
                pipe.zremrangebyrank(name, 0, -(self.max_failures + 1))
                pipe.expire(name, ttl)
            pipe.execute()
        except Exception as exc:
            self._redis_failed(exc)
