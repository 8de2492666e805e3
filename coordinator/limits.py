"""Per-caller limits on the coordinator's node RPCs: rates (token buckets) and open long polls.

A node that floods the coordinator is answered RESOURCE_EXHAUSTED and the others go on:
each caller has its own bucket. Well-behaved agents stay far below the limits: they
long-poll, and a round costs them a handful of calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable


class RateLimiter:
    def __init__(self, per_second: float, burst: int):
        self.per_second = per_second
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: Hashable) -> bool:
        """Take one token from ``key``'s bucket; False when it is empty."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - at) * self.per_second)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1, now)
            return True


class ConcurrencyLimit:
    """At most ``limit`` calls in flight per caller: a long poll holds a server thread for its
    whole wait, so one node's parallel polls could hold them all."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[Hashable, int] = {}

    def acquire(self, key: Hashable) -> bool:
        """Count one more call of ``key``'s; False (and nothing counted) when it has ``limit`` open."""
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.limit:
                return False
            self._open[key] = n + 1
            return True

    def release(self, key: Hashable) -> None:
        with self._lock:
            n = self._open.pop(key) - 1
            if n:
                self._open[key] = n
