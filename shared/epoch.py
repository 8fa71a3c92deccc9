"""Noticing that Redis lost its data: the epoch key.

Redis restarted without persistence, or a failover to a replica that never had the data, looks
to a client like a short outage followed by a working Redis — that is empty. Nothing errors;
records, sessions and indexes are simply gone. Every service therefore keeps an *epoch*: a
random value in :data:`shared.redis_names.EPOCH`, written with ``SET NX`` by whichever process
finds it missing first, with no TTL. Each process learns the value at start and checks it every
``interval`` seconds, and at once on the first check that succeeds after a failed one (a
reconnect). A missing key or another value means the data set this process knew is gone:

* missing: this process writes a new epoch (``SET NX``; if another process won the race, its
  value is adopted), then reports the loss;
* another value: another process noticed first and wrote the new epoch; this one adopts it and
  reports the loss.

The owner hears of it through ``on_loss(loss)`` (a coroutine function; see :class:`DataLoss`),
and ``postoffice_redis_data_loss_total{service}`` counts it. A failing callback is logged; the
watch goes on (the next loss is reported again).

What it cannot see: writes lost *within* a data set that kept its epoch — the last second of an
AOF ``everysec`` Redis that crashed, the replication lag of a Sentinel failover. Those are the
persistence window documented in docs/operations.md, not a loss of the data set.

In a service, :func:`epoch_context` is the whole wiring — one cleanup context owning the watch
as a supervised background task (``shared.service.background(..., critical=True)``) on the
app's ``REDIS`` client::

    app.cleanup_ctx.append(epoch_context(SERVICE_NAME, on_loss, settings.redis_epoch_check_seconds))

:meth:`EpochWatch.run` never returns and raises nothing but ``CancelledError``, so its end is a
bug the supervisor turns into a failed process.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import redis_names as names
from shared.backoff import backoff
from shared.service import REDIS, background

__all__ = ["DATA_LOSS", "DataLoss", "EpochWatch", "epoch_context", "new_epoch"]

log = logging.getLogger(__name__)

DATA_LOSS = Counter(
    "postoffice_redis_data_loss_total",
    "Times this process found that Redis lost its data (the epoch key missing or changed)",
    ["service"],
)


@dataclass(frozen=True)
class DataLoss:
    """What the watch found: the epoch this process knew, the one Redis has now, and whether
    the key was missing (this process, or a racing one, wrote the new one) or had changed
    (another process noticed first)."""

    previous: str
    current: str
    missing: bool
    detected_at: float


OnLoss = Callable[[DataLoss], Awaitable[None]]


def new_epoch() -> str:
    """A fresh epoch value: unix seconds (for a reader) and 64 random bits (for uniqueness)."""
    return f"{int(time.time())}-{secrets.token_hex(8)}"


class EpochWatch:
    """Watch :data:`~shared.redis_names.EPOCH` for ``service`` (the metric's label).

    ``interval``: seconds between checks; ``retry_base``/``retry_cap``: the backoff between
    attempts while Redis does not answer (the first successful one is the reconnect check).
    """

    def __init__(
        self,
        redis: Redis,
        service: str,
        on_loss: OnLoss,
        *,
        interval: float = 2.0,
        retry_base: float = 0.1,
        retry_cap: float | None = None,
    ) -> None:
        self.redis = redis
        self.service = service
        self.on_loss = on_loss
        self.interval = interval
        self.retry_base = retry_base
        self.retry_cap = interval if retry_cap is None else retry_cap
        #: The epoch this process knows; None until the first check reached Redis.
        self.epoch: str | None = None
        #: Losses seen by this process.
        self.losses = 0

    async def check(self) -> DataLoss | None:
        """One check (raises :class:`redis.exceptions.RedisError` when Redis does not answer).
        The first successful one only learns the epoch, writing it if there is none."""
        current = await self.redis.get(names.EPOCH)
        missing = current is None
        if current is None:
            await self.redis.set(names.EPOCH, new_epoch(), nx=True)
            current = await self.redis.get(names.EPOCH)
            if current is None:  # flushed again between the two commands: next check
                return None
        value = current.decode() if isinstance(current, bytes) else str(current)
        previous, self.epoch = self.epoch, value
        if previous is None or previous == value:
            return None
        loss = DataLoss(previous, value, missing, time.time())
        self.losses += 1
        DATA_LOSS.labels(self.service).inc()
        log.error(
            "Redis lost its data: epoch %s is %s; repairing",
            previous,
            "missing (new epoch written)" if missing else f"now {value}",
        )
        return loss

    async def run(self) -> None:
        """Check until cancelled; report each loss to ``on_loss``."""
        failures = 0
        while True:
            try:
                loss = await self.check()
            except RedisError as exc:
                _raise_if_cancelling()
                # Redis away: try again soon; the first check that succeeds is the reconnect's.
                if not failures:
                    log.info("epoch check failed (%r); retrying until Redis answers", exc)
                delay = backoff(failures, self.retry_base, self.retry_cap)
                failures += 1
                await asyncio.sleep(delay)
                continue
            _raise_if_cancelling()
            failures = 0
            if loss is not None:
                try:
                    await self.on_loss(loss)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The owner's repair failed; the watch must go on noticing.
                    log.exception("handling the Redis data loss failed")
            await asyncio.sleep(self.interval)


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation that a Redis call swallowed. redis-py can absorb the
    ``CancelledError`` delivered while a command is in flight (seen with redis-py 8.1: the
    command returns, the task stays "cancelling"); a loop that then goes on would never end,
    and its owner's cleanup would wait for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def epoch_context(
    service: str, on_loss: OnLoss, interval: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running an :class:`EpochWatch` on ``app[REDIS]`` as a critical
    background task; append it after the contexts whose state ``on_loss`` uses."""
    return background(
        "redis-epoch",
        lambda app: EpochWatch(app[REDIS], service, on_loss, interval=interval).run(),
        critical=True,
    )
