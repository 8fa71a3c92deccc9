"""Traffic Cop unregisters that failed, retried later with backoff, a bounded number of times.

A connection's leave must not wait for Traffic Cop: when its unregister fails (Traffic Cop is
down or slow) the id waits here, and one background loop retries each id with capped, jittered
backoff, one call at a time (Traffic Cop is likely down: no burst of timeouts). Bounded: past
``pending_limit`` ids the oldest is given up (Traffic Cop's own TTL cleans it), and an id is
given up after ``attempts`` failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from shared.backoff import backoff
from shared.traffic_cop_client import TrafficCopClient, TrafficCopError, TrafficCopRejected

__all__ = ["UnregisterRetries"]

log = logging.getLogger(__name__)

#: The longest wait between two attempts for one id.
_CAP_SECONDS = 60.0


class UnregisterRetries:
    def __init__(
        self,
        traffic_cop: TrafficCopClient,
        *,
        attempts: int,
        base_seconds: float,
        pending_limit: int,
    ) -> None:
        self.traffic_cop = traffic_cop
        self.attempts = attempts
        self.base_seconds = base_seconds
        self.pending_limit = pending_limit
        # connection id -> (failed attempts, monotonic time of the next attempt)
        self._pending: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._wakeup = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, connection_id: str) -> None:
        """Unregister ``connection_id`` from Traffic Cop later (it could not be done now)."""
        if self.attempts == 0 or connection_id in self._pending:
            return
        if len(self._pending) >= self.pending_limit:
            given_up, _ = self._pending.popitem(last=False)
            log.warning(
                "too many unregisters waiting; giving up one (Traffic Cop's TTL cleans it)",
                extra={"connection_id": given_up},
            )
        self._pending[connection_id] = (0, time.monotonic() + self.base_seconds)
        self._wakeup.set()

    async def run(self) -> None:
        pending = self._pending
        while True:
            if not pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            due = [cid for cid, (_, at) in pending.items() if at <= now]
            if not due:
                wait = min(at for _, at in pending.values()) - now
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), max(0.01, wait))
                continue
            for cid in due:
                entry = pending.get(cid)
                if entry is not None:
                    await self._retry(cid, entry[0])

    async def _retry(self, cid: str, failures: int) -> None:
        pending = self._pending
        try:
            await self.traffic_cop.unregister_connection(cid)
        except TrafficCopRejected as exc:
            log.error("traffic cop refused an unregister: %s", exc, extra={"connection_id": cid})
            pending.pop(cid, None)
        except TrafficCopError as exc:
            attempts = failures + 1
            if attempts >= self.attempts:
                log.warning(
                    "traffic cop unregister failed %d times, giving up: %s",
                    attempts + 1,
                    exc,
                    extra={"connection_id": cid},
                )
                pending.pop(cid, None)
            else:
                delay = backoff(attempts, self.base_seconds, _CAP_SECONDS)
                pending[cid] = (attempts, time.monotonic() + delay)
        else:
            log.info("traffic cop unregister retried", extra={"connection_id": cid})
            pending.pop(cid, None)
