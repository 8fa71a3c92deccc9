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

from shared.ratelimit import KeyedBuckets

__all__ = ["RealmRateLimiter"]


class RealmRateLimiter(KeyedBuckets):
    """One bucket per realm (a handful: no capacity bound needed)."""

    def take(self, key: str) -> int:  # type: ignore[override]
        """0 when the call may go ahead (a token is spent), else the whole seconds (at least 1)
        until a token is there."""
        wait = super().take(key)
        return 0 if wait <= 0 else max(1, math.ceil(wait))
