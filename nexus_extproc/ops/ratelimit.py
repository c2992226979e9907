"""Token buckets for the admin listeners: a client that polls in a loop (or guesses tokens) gets refused, not
served at the cost of the ledger the request path shares. Keyed by a hash of the presented credential (or the
peer address when there is none), so keys are bounded by the clients, never by the values they send."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    @staticmethod
    def key(credential: str | None, peer: str) -> str:
        if credential:
            return "c:" + hashlib.sha256(credential.encode()).hexdigest()[:16]
        return "p:" + peer.rsplit(":", 1)[0]

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._buckets.clear()  # a flood of distinct keys: start over rather than grow
        self._buckets[key] = (tokens - 1, now)
        return True
