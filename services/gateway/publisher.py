"""The process's ONE batched publisher to agent channels, with a circuit breaker.

Handlers :meth:`Publisher.submit` a message and a callback and never wait: a background task
takes up to ``PUBLISH_BATCH`` messages at a time and runs their ``publish_or_queue`` scripts in
one non-transactional pipeline (one round trip), then calls each callback with
:class:`~shared.registry.PublishResult` ``PUBLISHED``, ``QUEUED`` or ``REFUSED``. Messages leave
in submission order, so a connection's messages reach the agent channel in the order it sent
them.

Circuit breaker. When a round trip fails with a Redis connection error, or takes longer than
``PUBLISH_TIMEOUT_SECONDS`` (a stalled Redis; its outcome is then unknown, and the batch is
re-sent later unchanged — same message ids — so at worst an agent sees a duplicate it can
drop), the breaker opens: the batch and every later message go to an in-memory buffer (bounded by
``BREAKER_BUFFER``) and are answered ``QUEUED`` — *promised*; a message past the bound is
answered ``REFUSED``. While the buffer holds anything the task probes Redis with capped,
jittered backoff by flushing the buffer, oldest first. The breaker closes as soon as a round
trip answers; the rest of the buffer is then flushed at full speed, still ahead of newer
messages (which wait, unanswered, in the submission queue) to keep the order.

A promised message that Redis refuses because its channel's stream holds ``STREAM_MAX_PENDING``
unconsumed entries cannot be answered ``unavailable`` any more: it moves to its channel's
*retry list* (in order), retried with backoff on its own timer, so one full channel never holds
up the others. Until a channel's
retry list is empty, new messages for that channel are refused at once (``unavailable``, as a
full stream answers them) and later buffered ones join the list, so the channel keeps its
order. Promised messages — buffer and retry lists together — are bounded by
``BREAKER_BUFFER``.

Shutdown: :meth:`Publisher.drain` refuses new messages and waits, up to a deadline, until every
waiting and promised message is in Redis. What is still unanswered then is refused (the client
sees ``unavailable``); a promised message still not in Redis is lost, and logged as an error
with its message id (the residual risk of a Redis outage that outlasts the drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway import metrics
from services.gateway.connection_protocol import Publish
from shared.backoff import backoff
from shared.registry import PublishResult, Registry

__all__ = ["Item", "Outcome", "Publisher"]

log = logging.getLogger(__name__)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

#: Longest wait between two attempts while draining: the drain window is short.
_DRAIN_PROBE_SECONDS = 0.25

#: Message ids per log line when promised messages are lost.
_IDS_PER_LINE = 500


class Outcome(Protocol):
    """Who hears a message's outcome: the connection that accepted it."""

    def published(self, publish: Publish, result: PublishResult) -> None: ...


@dataclass(slots=True, eq=False)  # compared by identity: the retry lists look items up
class Item:
    owner: Outcome  # told the outcome once
    publish: Publish
    promised: bool = False  # answered QUEUED by the breaker: it must still reach Redis

    @property
    def channel(self) -> str:
        return self.publish.channel

    @property
    def data(self) -> bytes:
        return self.publish.data

    @property
    def message_id(self) -> str:
        return self.publish.message_id


class Publisher:
    def __init__(
        self,
        registry: Registry,
        *,
        batch: int,
        queue_size: int,
        stream_max_pending: int,
        buffer_size: int,
        round_trip_timeout: float = 0.5,
        backoff_base: float,
        backoff_cap: float,
    ) -> None:
        self.registry = registry
        self.batch = batch
        self.queue_size = queue_size
        self.stream_max_pending = stream_max_pending
        self.buffer_size = buffer_size
        self.round_trip_timeout = round_trip_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._pending: deque[Item] = deque()  # submitted, not answered yet
        self._buffer: deque[Item] = deque()  # the breaker's: promised, in submission order
        self._retry: dict[str, deque[Item]] = {}  # promised, refused by a full stream
        self._inflight: list[Item] = []  # the batch of the round trip under way
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # nothing submitted, buffered or retried
        self._idle.set()
        self._retry_at = math.inf  # monotonic time of the next retry round
        self._retry_attempt = 0
        self._running = False
        self._written_off: set[Item] = set()  # reported lost by the drain; not twice
        self.breaker_open = False
        self.draining = False
        self.published = 0
        self.queued = 0
        self.refused = 0

    @property
    def buffered(self) -> int:
        """Promised messages not in Redis yet: the breaker's buffer and the retry lists."""
        return len(self._buffer) + self.retrying

    @property
    def retrying(self) -> int:
        return sum(len(items) for items in self._retry.values())

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, item: Item) -> bool:
        """Hand a message over; False (answer ``unavailable``) when the publisher is full or
        draining."""
        if self.draining or len(self._pending) >= self.queue_size:
            return False
        self._pending.append(item)
        self._idle.clear()
        self._wakeup.set()
        return True

    async def run(self) -> None:
        self._running = True
        try:
            await self._loop()
        finally:
            self._running = False

    async def _loop(self) -> None:
        attempt = 0  # breaker probes in a row that found Redis down
        while True:
            if self._buffer:
                if self.breaker_open:
                    self._absorb()
                if await self._flush_buffer():
                    attempt = 0
                else:
                    attempt += 1
                    await self._wait(self._delay(attempt))
                continue
            if self._retry and time.monotonic() >= self._retry_at:
                await self._retry_refused()
                continue
            if self._pending:
                await self._publish_pending()
                continue
            if not self._retry:
                self._idle.set()
            await self._wait(self._retry_at - time.monotonic() if self._retry else None)

    async def _wait(self, seconds: float | None) -> None:
        """Sleep (``None``: until new work), or less when new work arrives."""
        self._wakeup.clear()
        if seconds is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(0.0, seconds))

    def _delay(self, attempt: int) -> float:
        delay = backoff(attempt, self.backoff_base, self.backoff_cap)
        return min(delay, _DRAIN_PROBE_SECONDS) if self.draining else delay

    async def _publish(self, batch: list[Item]) -> list[PublishResult]:
        """One round trip. While it is under way the batch is ``_inflight`` (a cancelled round
        trip leaves it there, so the shutdown accounting still sees it)."""
        metrics.PUBLISH_BATCH.observe(len(batch))
        self._inflight = batch
        try:
            # Bounded: a Redis that stalls (SIGSTOP, a long fork) must not hold every ack for
            # the client's socket timeout. Past it the outcome is unknown: the batch goes to the
            # breaker's buffer as it is, so a re-send carries the same message ids and an agent
            # can drop what it already has (TimeoutError is an OSError: _REDIS_DOWN takes it).
            # One script run per channel in the batch, its messages in order (one command and
            # one array reply per channel rather than per message); a channel's order is all
            # that order means across the stream of one channel.
            by_channel: dict[str, list[int]] = {}
            for index, item in enumerate(batch):
                by_channel.setdefault(item.channel, []).append(index)
            raw = await asyncio.wait_for(
                self.registry.run_scripts(
                    [
                        self.registry.publish_batch_call(
                            channel, [batch[i].data for i in indexes], self.stream_max_pending
                        )
                        for channel, indexes in by_channel.items()
                    ]
                ),
                self.round_trip_timeout,
            )
            out = [PublishResult.REFUSED] * len(batch)
            for indexes, value in zip(by_channel.values(), raw, strict=True):
                if isinstance(value, _REDIS_DOWN):
                    raise value
                if isinstance(value, Exception):
                    log.warning("publish script failed: %r", value)
                    continue  # its messages stay REFUSED
                for i, code in zip(indexes, value, strict=True):
                    out[i] = PublishResult(int(code))
        except _REDIS_DOWN:
            self._inflight = []
            raise
        self._inflight = []
        return out

    async def _publish_pending(self) -> None:
        batch = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
        send: list[Item] = []
        for item in batch:
            if item.channel in self._retry:
                # Older, promised messages of this channel still wait for room in its stream:
                # this one may not pass them, so the channel is full for it.
                self._answer(item, PublishResult.REFUSED)
            else:
                send.append(item)
        if not send:
            return
        try:
            results = await self._publish(send)
        except _REDIS_DOWN as exc:
            self._open(exc)
            for item in send:
                self._hold(item)
            self._gauge()
            return
        self._close()
        for item, result in zip(send, results, strict=True):
            self._answer(item, result)

    def _answer(self, item: Item, result: PublishResult) -> None:
        if result == PublishResult.PUBLISHED:
            self.published += 1
        elif result == PublishResult.QUEUED:
            self.queued += 1
        else:
            self.refused += 1
        self._call(item, result)

    @staticmethod
    def _call(item: Item, result: PublishResult) -> None:
        try:
            item.owner.published(item.publish, result)
        except Exception:  # one connection's bug must not stop the process's publisher
            log.exception("publish outcome handler failed")

    def _open(self, exc: BaseException) -> None:
        if not self.breaker_open:
            log.error("redis unavailable, circuit breaker open: %r", exc)
            self.breaker_open = True
            metrics.BREAKER_OPEN.set(1)

    def _close(self) -> None:
        """Redis answered a round trip: the breaker closes at once."""
        if self.breaker_open:
            log.info("redis is back, circuit breaker closed")
            self.breaker_open = False
            metrics.BREAKER_OPEN.set(0)

    def _gauge(self) -> None:
        metrics.BREAKER_BUFFERED.set(self.buffered)

    def _hold(self, item: Item) -> None:
        if self.buffered >= self.buffer_size:
            self._answer(item, PublishResult.REFUSED)
            return
        item.promised = True
        self._buffer.append(item)
        self.queued += 1
        self._call(item, PublishResult.QUEUED)

    def _absorb(self) -> None:
        """While the breaker is open, new messages queue behind the buffer to keep order."""
        while self._pending:
            self._hold(self._pending.popleft())
        self._gauge()

    async def _flush_buffer(self) -> bool:
        """Hand the oldest buffered messages to Redis; False when Redis is still down."""
        batch: list[Item] = []
        while self._buffer and len(batch) < self.batch:
            item = self._buffer.popleft()
            if item.channel in self._retry:
                # Behind older promised messages of its channel that wait for room.
                self._retry[item.channel].append(item)
            else:
                batch.append(item)
        if not batch:
            self._gauge()
            return True
        try:
            results = await self._publish(batch)
        except _REDIS_DOWN as exc:
            self._buffer.extendleft(reversed(batch))
            self._open(exc)
            return False
        self._close()
        for item, result in zip(batch, results, strict=True):
            if result == PublishResult.REFUSED:
                self._retry_later(item)
            # Otherwise it is in Redis now; it was counted as queued when it was promised.
        self._gauge()
        return True

    def _retry_later(self, item: Item) -> None:
        items = self._retry.get(item.channel)
        if items is None:
            log.warning(
                "the stream of channel %s is full: its messages promised while redis was down "
                "wait for room (retried), new ones are refused meanwhile",
                item.channel,
            )
            items = self._retry[item.channel] = deque()
        items.append(item)
        if self._retry_at == math.inf:
            self._schedule_retry(progressed=True)

    def _schedule_retry(self, *, progressed: bool) -> None:
        if not self._retry:
            self._retry_at = math.inf
            self._retry_attempt = 0
            return
        self._retry_attempt = 0 if progressed else self._retry_attempt + 1
        self._retry_at = time.monotonic() + self._delay(self._retry_attempt + 1)

    async def _retry_refused(self) -> None:
        """One round trip with the oldest messages of every retry list (a fair share each)."""
        share = max(1, self.batch // len(self._retry))
        heads: list[Item] = []
        for items in self._retry.values():
            heads.extend(itertools.islice(items, share))
        try:
            results = await self._publish(heads)
        except _REDIS_DOWN as exc:
            self._open(exc)
            self._schedule_retry(progressed=False)
            return
        self._close()
        taken = {
            item
            for item, result in zip(heads, results, strict=True)
            if result != PublishResult.REFUSED
        }
        for channel in list(self._retry) if taken else ():
            kept = deque(item for item in self._retry[channel] if item not in taken)
            if kept:
                self._retry[channel] = kept
            else:
                del self._retry[channel]
                log.info("the stream of channel %s has room again", channel)
        self._schedule_retry(progressed=bool(taken))
        self._gauge()

    # -- shutdown -------------------------------------------------------------------------------

    async def drain(self, seconds: float) -> int:
        """SIGTERM: refuse new messages and hand every waiting one to Redis, for at most
        ``seconds``. Returns how many promised messages were lost (logged)."""
        self.draining = True
        waiting = self.waiting + self.buffered + len(self._inflight)
        if waiting:
            log.info(
                "drain: handing %d waiting messages to redis (at most %.1fs)", waiting, seconds
            )
            self._retry_at = min(self._retry_at, time.monotonic())
            self._wakeup.set()  # cut a backoff short
            if self._running:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), seconds)
        return self._give_up("drain")

    def abandon(self) -> int:
        """At cleanup, once the task is stopped: account for whatever is left (normally
        nothing: the drain ran)."""
        return self._give_up("shutdown")

    def _give_up(self, when: str) -> int:
        # Not answered yet: the client learns the message was not taken.
        while self._pending:
            self._answer(self._pending.popleft(), PublishResult.REFUSED)
        promised = [
            item
            for item in itertools.chain(self._buffer, *self._retry.values())
            if item not in self._written_off
        ]
        unsure = [
            item for item in self._inflight if item.promised and item not in self._written_off
        ]
        self._written_off.update(unsure)
        self._buffer.clear()
        self._retry.clear()
        self._schedule_retry(progressed=True)
        self._gauge()
        lost = len(promised) + len(unsure)
        if lost:
            log.error(
                "%s: %d accepted messages (acked 'queued') could not be handed to redis and are "
                "LOST%s; their message ids follow",
                when,
                lost,
                f", {len(unsure)} of them in a round trip whose outcome is unknown"
                if unsure
                else "",
            )
            _log_ids(when, [*unsure, *promised])
        return lost


def _log_ids(when: str, items: Iterable[Item]) -> None:
    ids = [item.message_id for item in items]
    for start in range(0, len(ids), _IDS_PER_LINE):
        log.error(
            "%s: lost message ids %d-%d of %d: %s",
            when,
            start + 1,
            min(start + _IDS_PER_LINE, len(ids)),
            len(ids),
            " ".join(ids[start : start + _IDS_PER_LINE]),
        )
