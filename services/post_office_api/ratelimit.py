"""Per-realm request rate limit: one token bucket per realm, per process (pure, no I/O).

Realms are trusted back-ends, so the limit is a guard against a runaway caller rather than an
abuse filter: ``RATE_LIMIT_PER_SECOND`` tokens a second, bursts up to ``RATE_LIMIT_BURST``;
past it the call gets 429 ``rate_limited`` with ``Retry-After``. With N API processes behind
a balancer a realm gets up to N times the rate.

The wait is a whole number of seconds, at least 1: ``Retry-After`` only has whole seconds, and
a fractional wait shown as such (a bucket 0.004 s short of a token printed "retry in 0.00s")
made callers retry at once, into the same empty bucket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["RealmRateLimiter"]


class RealmRateLimiter:
    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # realm -> (tokens, last refill)

    def take(self, realm: str) -> int:
        """0 when the call may go ahead (a token is spent), else the whole seconds (at least 1)
        until a token is there."""
        if self.rate <= 0:
            return 0
        now = self._clock()
        tokens, last = self._buckets.get(realm, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[realm] = (tokens - 1.0, now)
            return 0
        self._buckets[realm] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))
