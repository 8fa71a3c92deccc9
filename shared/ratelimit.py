"""Token buckets keyed by a name (a realm, a client address): pure, no I/O.

:class:`KeyedBuckets` holds one bucket per key, ``rate`` tokens a second up to ``burst``; with
``capacity`` it remembers at most that many keys, forgetting the least recently used (a
forgotten key starts again with a full bucket, which is what a key unseen for
``burst / rate`` seconds would have anyway).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["KeyedBuckets"]


class KeyedBuckets:
    def __init__(
        self,
        rate: float,
        burst: int,
        capacity: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.capacity = capacity
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        if self.capacity is not None and len(self._buckets) > self.capacity:
            self._buckets.popitem(last=False)

    def wait(self, key: str) -> float:
        """0 when ``key`` has a token left (none is spent), else seconds until it has one."""
        if self.rate <= 0:
            return 0.0
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str) -> float:
        """0 when the call may go ahead (a token is spent), else seconds until one is there."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return 0.0
        self._store(key, tokens, now)
        return (1.0 - tokens) / self.rate

    def spend(self, key: str) -> None:
        """Spend a token after the fact (none left: the bucket stays empty)."""
        if self.rate > 0:
            now = self._clock()
            self._store(key, max(0.0, self._tokens(key, now) - 1.0), now)

    def refund(self, key: str) -> None:
        """Give back a token taken for a call that turned out not to count."""
        if self.rate > 0 and key in self._buckets:
            now = self._clock()
            self._store(key, min(self.burst, self._tokens(key, now) + 1.0), now)
