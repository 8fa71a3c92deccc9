"""Telling Traffic Cop about evicted connections, off the eviction path.

A pass hands the ids it evicted to :class:`TrafficCopReporter` and moves on; a background task
sends ``DELETE /v1/connections/{id}`` with bounded concurrency. An unreachable Traffic Cop
therefore never slows or blocks eviction: the reports wait (bounded by ``limit``; past it the
oldest is dropped, logged and counted) and go out with capped, jittered backoff once it
answers again. A dropped report costs little: Traffic Cop's per-session bookkeeping expires
with the session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from services.eviction_worker import metrics
from shared.backoff import backoff
from shared.traffic_cop_client import TrafficCopRejected, TrafficCopUnavailable

__all__ = ["ConnectionUnregistrar", "TrafficCopReporter"]

log = logging.getLogger(__name__)

#: Least pause between two "dropped" log lines: a long Traffic Cop outage can drop a whole
#: backlog, and one line per report would flood the logs.
DROP_LOG_INTERVAL = 1.0


class ConnectionUnregistrar(Protocol):
    """What the reporter needs of :class:`shared.traffic_cop_client.TrafficCopClient`."""

    async def unregister_connection(self, connection_id: str) -> bool: ...


class TrafficCopReporter:
    """A bounded FIFO of connection ids to report, and the task that reports them."""

    def __init__(
        self,
        client: ConnectionUnregistrar,
        *,
        concurrency: int,
        limit: int,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        self.client = client
        self.concurrency = concurrency
        self.limit = limit
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.reported = 0  # Traffic Cop forgot the connection (204)
        self.unknown = 0  # Traffic Cop did not know it (404): nothing left to do
        self.rejected = 0  # a 4xx it should not give (wrong service key ...): not retried
        self.failures = 0  # calls that found Traffic Cop unavailable (each retried)
        self.dropped = 0  # reports given up because the backlog passed ``limit``
        self.streak = 0  # rounds in a row with a report to retry: the retry delay's exponent
        self._unlogged_drops = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL
        self._pending: deque[str] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, connection_ids: Iterable[str]) -> None:
        """Queue reports; never waits. Past ``limit`` the oldest waiting report is dropped."""
        added = False
        for cid in connection_ids:
            if len(self._pending) >= self.limit:
                self._drop(self._pending.popleft())
            self._pending.append(cid)
            added = True
        if added:
            self._idle.clear()
            self._wake.set()
            metrics.TRAFFIC_COP_PENDING.set(len(self._pending))

    def _drop(self, connection_id: str) -> None:
        self.dropped += 1
        metrics.TRAFFIC_COP_REPORTS.labels("dropped").inc()
        self._unlogged_drops += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            log.warning(
                "traffic cop backlog is over %d reports; dropped %d more of the oldest (%d so far)",
                self.limit,
                self._unlogged_drops,
                self.dropped,
                extra={"connection_id": connection_id},
            )
            self._unlogged_drops = 0
            self._drop_logged_at = now

    async def flush(self, seconds: float) -> bool:
        """Wait until every queued report went out (or was given up); False on timeout."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """The reporting loop; runs until cancelled (its cleanup context owns it)."""
        while True:
            await self._wake.wait()
            while self._pending:
                batch = [
                    self._pending.popleft()
                    for _ in range(min(self.concurrency, len(self._pending)))
                ]
                outcomes = await asyncio.gather(*(self._report(cid) for cid in batch))
                retry = [cid for cid, done in zip(batch, outcomes, strict=True) if not done]
                if retry:
                    # Put them back in front, keeping the bound: the newest give way, since the
                    # oldest have waited longest already and order does not matter to Traffic Cop.
                    for cid in reversed(retry):
                        if len(self._pending) >= self.limit:
                            self._drop(self._pending.pop())
                        self._pending.appendleft(cid)
                    self.streak += 1
                    await asyncio.sleep(
                        backoff(self.streak - 1, self.backoff_base, self.backoff_cap)
                    )
                else:
                    self.streak = 0
                metrics.TRAFFIC_COP_PENDING.set(len(self._pending))
            self._wake.clear()
            self._idle.set()

    async def _report(self, connection_id: str) -> bool:
        """One report; True when it needs no retry."""
        extra = {"connection_id": connection_id}
        try:
            known = await self.client.unregister_connection(connection_id)
        except TrafficCopUnavailable as exc:
            self.failures += 1
            metrics.TRAFFIC_COP_REPORTS.labels("unavailable").inc()
            if self.failures == 1 or self.failures % 1000 == 0:
                log.warning(
                    "traffic cop unavailable (%d failed calls so far): %s",
                    self.failures,
                    exc,
                    extra=extra,
                )
            return False
        except TrafficCopRejected as exc:
            self.rejected += 1
            metrics.TRAFFIC_COP_REPORTS.labels("rejected").inc()
            log.error("traffic cop refused to unregister the connection: %s", exc, extra=extra)
            return True
        if known:
            self.reported += 1
            metrics.TRAFFIC_COP_REPORTS.labels("unregistered").inc()
        else:
            self.unknown += 1
            metrics.TRAFFIC_COP_REPORTS.labels("unknown").inc()
        return True

    def summary(self) -> dict[str, int]:
        return {
            "unregistered": self.reported,
            "unknown": self.unknown,
            "rejected": self.rejected,
            "unavailable_calls": self.failures,
            "dropped": self.dropped,
            "pending": self.pending,
        }
