"""Telling Traffic Cop about connections the API found stale (best effort, bounded).

When a delivery or a close finds that no gateway holds a connection and its gateway is dead,
the API removes the registry record (:mod:`services.post_office_api.delivery`). Traffic Cop
also ties that connection to its session; it is told here with
``DELETE /v1/connections/{connection_id}``, as the eviction worker does for what it evicts.

Best effort, off the request path: the call is queued (at most ``limit`` waiting) and sent by
one background task, so a slow or absent Traffic Cop never slows an API answer. A report that
cannot be sent (Traffic Cop unreachable, queue full) is logged and counted, not retried:
Traffic Cop's per-connection key expires with its session anyway
(``session:connection:<id>``, see docs/architecture.md), so the cost of a lost report is a
bookkeeping entry that lives until the session ends.
"""

from __future__ import annotations

import asyncio
import logging

from services.post_office_api import metrics
from shared.traffic_cop_client import TrafficCopClient, TrafficCopError

__all__ = ["StaleReporter"]

log = logging.getLogger(__name__)


class StaleReporter:
    def __init__(self, client: TrafficCopClient | None, limit: int) -> None:
        self.client = client
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=limit)

    def report(self, connection_id: str) -> None:
        """Queue the unregistration of ``connection_id`` (never blocks, never raises)."""
        if self.client is None:
            return
        try:
            self._queue.put_nowait(connection_id)
        except asyncio.QueueFull:
            metrics.TRAFFIC_COP_REPORTS.labels(outcome="dropped").inc()
            log.warning(
                "traffic cop report queue is full; not reporting a stale connection",
                extra={"connection_id": connection_id},
            )

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        if self.client is None:
            return
        while True:
            connection_id = await self._queue.get()
            try:
                known = await self.client.unregister_connection(connection_id)
            except TrafficCopError as exc:
                metrics.TRAFFIC_COP_REPORTS.labels(outcome="failed").inc()
                log.warning(
                    "could not tell traffic cop about a stale connection: %s",
                    exc,
                    extra={"connection_id": connection_id},
                )
                continue
            metrics.TRAFFIC_COP_REPORTS.labels(outcome="sent" if known else "unknown").inc()
