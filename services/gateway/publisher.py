"""The process's ONE batched publisher to agent channels, with a circuit breaker.

Handlers :meth:`Publisher.submit` a message and a callback and never wait: a background task
takes up to ``PUBLISH_BATCH`` messages at a time and runs their ``publish_or_queue`` scripts in
one non-transactional pipeline (one round trip), then calls each callback with
:class:`~shared.registry.PublishResult` ``PUBLISHED``, ``QUEUED`` or ``REFUSED``. Messages leave
in submission order, so a connection's messages reach the agent channel in the order it sent
them.

Circuit breaker. When a round trip fails with a Redis connection error or timeout the breaker
opens: the batch and every later message go to an in-memory buffer (bounded by
``BREAKER_BUFFER``) and are answered ``QUEUED``; a message past the bound is answered
``REFUSED``. While the buffer holds anything the task probes Redis with capped, jittered
backoff by flushing the buffer, oldest first; a message leaves the buffer only once Redis took
it (published or queued), so an accepted message is never dropped — a message the Redis queue
refuses (full) stays buffered and is retried. When the buffer is empty the breaker closes.
Messages still buffered at shutdown are logged with their count (nothing else can hold them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway import metrics
from services.gateway.hub import backoff
from shared.registry import PublishResult, Registry

__all__ = ["Item", "Publisher"]

log = logging.getLogger(__name__)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(slots=True)
class Item:
    channel: str
    data: bytes
    done: Callable[[int], None]  # called once with a PublishResult code


class Publisher:
    def __init__(
        self,
        registry: Registry,
        *,
        batch: int,
        queue_size: int,
        queue_bound: int,
        buffer_size: int,
        backoff_base: float,
        backoff_cap: float,
    ) -> None:
        self.registry = registry
        self.batch = batch
        self.queue_size = queue_size
        self.queue_bound = queue_bound
        self.buffer_size = buffer_size
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._pending: deque[Item] = deque()
        self._wakeup = asyncio.Event()
        self._buffer: deque[Item] = deque()  # the breaker's; already answered QUEUED
        self.breaker_open = False
        self.published = 0
        self.queued = 0
        self.refused = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, item: Item) -> bool:
        """Hand a message over; False (answer ``unavailable``) when the publisher is full."""
        if len(self._pending) >= self.queue_size:
            return False
        self._pending.append(item)
        self._wakeup.set()
        return True

    async def run(self) -> None:
        attempt = 0
        while True:
            if self._buffer:
                self._absorb()
                if await self._flush_buffer():
                    attempt = 0
                    continue
                attempt += 1
                await self._wait(backoff(attempt, self.backoff_base, self.backoff_cap))
                continue
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
            try:
                results = await self._publish(batch)
            except _REDIS_DOWN as exc:
                self._open(exc)
                for item in batch:
                    self._hold(item)
                continue
            for item, result in zip(batch, results, strict=True):
                self._answer(item, result)

    async def _wait(self, seconds: float) -> None:
        """Sleep, or less when new work arrives (it goes behind the buffer anyway)."""
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    async def _publish(self, batch: list[Item]) -> list[int]:
        metrics.PUBLISH_BATCH.observe(len(batch))
        raw = await self.registry.run_scripts(
            [
                self.registry.publish_or_queue_call(item.channel, item.data, self.queue_bound)
                for item in batch
            ]
        )
        out: list[int] = []
        for value in raw:
            if isinstance(value, _REDIS_DOWN):
                raise value
            if isinstance(value, Exception):
                log.warning("publish script failed: %r", value)
                out.append(PublishResult.REFUSED)
            else:
                out.append(int(value))
        return out

    def _answer(self, item: Item, result: int) -> None:
        if result == PublishResult.PUBLISHED:
            self.published += 1
        elif result == PublishResult.QUEUED:
            self.queued += 1
        else:
            self.refused += 1
        item.done(result)

    def _open(self, exc: BaseException) -> None:
        if not self.breaker_open:
            log.error("redis unavailable, circuit breaker open: %r", exc)
            self.breaker_open = True
            metrics.BREAKER_OPEN.set(1)

    def _hold(self, item: Item) -> None:
        if len(self._buffer) >= self.buffer_size:
            self._answer(item, PublishResult.REFUSED)
            return
        self._buffer.append(item)
        metrics.BREAKER_BUFFERED.set(len(self._buffer))
        self.queued += 1
        item.done(PublishResult.QUEUED)

    def _absorb(self) -> None:
        """While the buffer is not empty, new messages queue behind it to keep order."""
        while self._pending:
            self._hold(self._pending.popleft())

    async def _flush_buffer(self) -> bool:
        """Try to hand the buffer to Redis, oldest first. True when it made progress."""
        progressed = False
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(self.batch, len(self._buffer)))]
            try:
                results = await self._publish(batch)
            except _REDIS_DOWN as exc:
                self._open(exc)
                return progressed
            for _ in batch:
                self._buffer.popleft()
            # A message the Redis queue refused (full) stays, in order; the others were taken.
            kept = [
                item
                for item, result in zip(batch, results, strict=True)
                if result == PublishResult.REFUSED
            ]
            self._buffer.extendleft(reversed(kept))
            progressed = progressed or len(kept) < len(batch)
            if kept:
                metrics.BREAKER_BUFFERED.set(len(self._buffer))
                return progressed
            metrics.BREAKER_BUFFERED.set(len(self._buffer))
            self._absorb()
        if self.breaker_open:
            log.info("redis is back, circuit breaker closed")
        self.breaker_open = False
        metrics.BREAKER_OPEN.set(0)
        return True

    def abandon(self) -> int:
        """At shutdown: the number of buffered messages that could not be delivered."""
        lost = len(self._buffer) + len(self._pending)
        if lost:
            log.error("shutting down with %d accepted messages still waiting for redis", lost)
        return lost
