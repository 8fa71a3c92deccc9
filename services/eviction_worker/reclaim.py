"""The worker's stream upkeep: reclaim unacked messages, dead letters, stale consumers, trimming.

Every pass, for each configured channel (two pipelined round trips read every stream's length,
groups, pending summaries and consumers):

1. **Reclaim.** A group's entries delivered more than ``ACK_TIMEOUT_SECONDS`` ago and not acked
   are handed (``XAUTOCLAIM``, in :meth:`shared.streams.Streams.reclaim`) to the group's live
   consumer holding the fewest entries: one that read, or said it is live
   (``websocket:consumers:{<channel>}``), within ``CONSUMER_LIVE_SECONDS``. Each
   hand-over adds one to the entry's delivery count; an entry handed out more than
   ``MAX_DELIVERIES`` times moves to the channel's dead letters, in the same script. With no
   live consumer nothing is reclaimed: the entries wait for one. XAUTOCLAIM re-checks the idle
   time, so two workers reclaiming at once hand each entry over once.
2. **Stale consumers.** A consumer that holds nothing and has neither read nor said it is
   live for ``CONSUMER_STALE_SECONDS`` is removed (re-checked atomically: one that holds entries is
   never removed, since ``XGROUP DELCONSUMER`` would drop them unacked).
3. **Trim.** The history every group has acked is trimmed (``XTRIM MINID``); nothing a group
   still has to read or ack is.
4. **Metrics.** Stream length, lag, pending, oldest pending age, consumers and dead letters per
   channel and group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from services.eviction_worker import metrics
from shared.streams import GroupInfo, StreamInfo, Streams, id_time

__all__ = ["Reclaimer", "StreamSummary"]

log = logging.getLogger(__name__)

MAX_DELIVERIES_REASON = "max_deliveries"


@dataclass
class StreamSummary:
    """What one pass did to the streams, by channel."""

    reclaimed: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)
    trimmed: dict[str, int] = field(default_factory=dict)
    consumers_removed: int = 0
    round_trips: int = 0

    @property
    def eventful(self) -> bool:
        return bool(
            sum(self.reclaimed.values())
            or sum(self.dead_lettered.values())
            or self.consumers_removed
        )


class Reclaimer:
    def __init__(
        self,
        redis: Redis,
        channels: Sequence[str],
        *,
        ack_timeout_seconds: float = 30.0,
        max_deliveries: int = 5,
        consumer_live_seconds: float = 15.0,
        consumer_stale_seconds: float = 3600.0,
        reclaim_batch: int = 100,
        reclaim_limit: int = 10_000,
    ) -> None:
        self.streams = Streams(redis)
        self.channels = tuple(channels)
        self.ack_timeout_ms = int(ack_timeout_seconds * 1000)
        self.max_deliveries = max_deliveries
        self.live_seconds = consumer_live_seconds
        self.stale_seconds = consumer_stale_seconds
        self.reclaim_batch = reclaim_batch
        self.reclaim_limit = reclaim_limit

    async def run(self, stop_requested: bool = False) -> StreamSummary:
        summary = StreamSummary()
        infos, round_trips = await self.streams.inspect(self.channels)
        summary.round_trips += round_trips
        now = time.time()
        for info in infos:
            summary.reclaimed[info.channel] = 0
            summary.dead_lettered[info.channel] = 0
            for group in info.groups:
                if stop_requested:
                    break
                await self._reclaim(info.channel, group, summary, now)
                await self._remove_stale(info.channel, group, summary)
            trimmed = await self.streams.trim(info.channel) if info.length else 0
            summary.round_trips += 1 if info.length else 0
            summary.trimmed[info.channel] = trimmed
            _export(info, now)
        return summary

    async def _reclaim(
        self, channel: str, group: GroupInfo, summary: StreamSummary, now: float
    ) -> None:
        if not group.pending or group.oldest_pending_id is None:
            return
        if now - id_time(group.oldest_pending_id) < self.ack_timeout_ms / 1000:
            return  # nothing can have waited that long yet
        live = [c for c in group.consumer_list if c.live(now, self.live_seconds)]
        if not live:
            return
        # Who holds what waited past the ack timeout: another live consumer gets it, so a
        # consumer that died is not handed its own messages back while it still looks live.
        # Only a consumer alone in its group takes its own back (the count still goes up).
        holders = await self.streams.stale_holders(
            channel, group.name, self.ack_timeout_ms, self.reclaim_batch
        )
        summary.round_trips += 1
        if not holders:
            return
        others = [c for c in live if c.name not in holders] or live
        target = min(others, key=lambda c: (c.pending, c.idle_ms)).name
        cursor, handed_total, dead_total = "0-0", 0, 0
        while handed_total + dead_total < self.reclaim_limit:
            result = await self.streams.reclaim(
                channel,
                group.name,
                target,
                min_idle_ms=self.ack_timeout_ms,
                max_deliveries=self.max_deliveries,
                cursor=cursor,
                count=self.reclaim_batch,
                reason=MAX_DELIVERIES_REASON,
            )
            summary.round_trips += 1
            handed_total += result.handed
            dead_total += result.dead
            cursor = result.cursor
            if cursor == "0-0":
                break
        summary.reclaimed[channel] += handed_total
        summary.dead_lettered[channel] += dead_total
        if handed_total:
            metrics.REDELIVERIES.labels(channel, group.name).inc(handed_total)
            log.info(
                "%s/%s: %d unacked message(s) handed to %s",
                channel,
                group.name,
                handed_total,
                target,
            )
        if dead_total:
            metrics.DEAD_LETTERED.labels(channel, group.name).inc(dead_total)
            log.warning(
                "%s/%s: %d message(s) moved to the dead letters after %d deliveries",
                channel,
                group.name,
                dead_total,
                self.max_deliveries,
            )

    async def _remove_stale(self, channel: str, group: GroupInfo, summary: StreamSummary) -> None:
        now = time.time()
        for consumer in group.consumer_list:
            if consumer.pending == 0 and not consumer.live(now, self.stale_seconds):
                removed = await self.streams.delete_consumer(
                    channel, group.name, consumer.name, self.stale_seconds
                )
                summary.round_trips += 1
                if removed:
                    summary.consumers_removed += 1
                    metrics.CONSUMERS_REMOVED.inc()
                    log.info("%s/%s: stale consumer %s removed", channel, group.name, consumer.name)


def _export(info: StreamInfo, now: float) -> None:
    metrics.STREAM_LENGTH.labels(info.channel).set(info.length)
    metrics.DEAD_LETTERS.labels(info.channel).set(info.dead_letters)
    for group in info.groups:
        labels = (info.channel, group.name)
        metrics.GROUP_PENDING.labels(*labels).set(group.pending)
        metrics.GROUP_LAG.labels(*labels).set(info.length if group.lag is None else group.lag)
        metrics.GROUP_CONSUMERS.labels(*labels).set(group.consumers)
        age = 0.0
        if group.oldest_pending_id is not None:
            age = max(0.0, now - id_time(group.oldest_pending_id))
        metrics.OLDEST_PENDING_AGE.labels(*labels).set(age)
