"""The process's ONE Redis pub/sub connection, shared by every socket.

Each subscribed channel maps to a synchronous handler that gets the raw message bytes;
handlers only queue work (a frame into a socket's bounded queue), so the reader never waits on
a client. The reader task reconnects with capped, jittered exponential backoff after any Redis
failure and resubscribes every channel that is current at that moment; ``CancelledError`` always
propagates.

:meth:`Hub.subscribe` returns only once Redis confirmed the subscription, so a caller that
announces a connection afterwards (the welcome frame) cannot miss a frame published to it.

Exception tree::

    Exception
     └── PubSubUnavailable   the pub/sub connection is down, or Redis did not confirm in time
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from services.gateway import metrics
from shared.redis_client import make_redis

__all__ = ["Hub", "PubSubUnavailable"]

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]

#: Channels per SUBSCRIBE command when resubscribing after a reconnect.
_CHUNK = 1000


class PubSubUnavailable(Exception):
    """The pub/sub connection is down or did not confirm a subscription in time."""


def backoff(attempt: int, base: float, cap: float) -> float:
    """Equal-jitter exponential backoff: half fixed, half random, capped."""
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Hub:
    def __init__(
        self,
        redis_url: str,
        *,
        name: str,
        backoff_base: float,
        backoff_cap: float,
        confirm_timeout: float = 5.0,
    ) -> None:
        # socket_timeout=None: the connection blocks waiting for messages by design.
        # health_check_interval=0: a health-check PING would read concurrently with the reader.
        self.redis: Redis = make_redis(
            redis_url,
            max_connections=4,
            socket_timeout=None,  # type: ignore[arg-type]  # make_redis documents None for pub/sub
            health_check_interval=0,
            name=name,
        )
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.confirm_timeout = confirm_timeout
        self._handlers: dict[bytes, Handler] = {}
        self._pubsub: PubSub | None = None
        self._connected = False
        self._lock = asyncio.Lock()  # one command at a time on the shared connection
        self._confirm: dict[bytes, list[asyncio.Future[None]]] = {}
        self.messages = 0
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def channel_count(self) -> int:
        return len(self._handlers)

    async def check(self) -> None:
        """Readiness check: raises unless the reader holds a live subscription."""
        if not self._connected:
            raise PubSubUnavailable("the pub/sub connection is down")

    def watch(self, channel: str, handler: Handler) -> None:
        """Remember a channel without waiting: subscribed when the reader (re)connects.
        For the process-wide channels, registered before the reader starts."""
        self._handlers[channel.encode()] = handler

    async def subscribe(self, channel: str, handler: Handler) -> None:
        """Subscribe and wait for Redis's confirmation; raise :class:`PubSubUnavailable`."""
        key = channel.encode()
        self._handlers[key] = handler
        pubsub = self._pubsub
        if pubsub is None or not self._connected:
            self._handlers.pop(key, None)
            raise PubSubUnavailable("the pub/sub connection is down")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(key, []).append(future)
        try:
            async with self._lock:
                await pubsub.subscribe(key)
            await asyncio.wait_for(asyncio.shield(future), self.confirm_timeout)
        except (RedisError, OSError, TimeoutError, PubSubUnavailable) as exc:
            self._handlers.pop(key, None)
            raise PubSubUnavailable(f"subscribing failed: {type(exc).__name__}") from None
        finally:
            waiting = self._confirm.get(key)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._confirm[key]

    async def unsubscribe(self, channel: str) -> None:
        key = channel.encode()
        if self._handlers.pop(key, None) is None:
            return
        pubsub = self._pubsub
        if pubsub is None or not self._connected:
            return  # the next reconnect subscribes only current channels
        try:
            async with self._lock:
                await pubsub.unsubscribe(key)
        except (RedisError, OSError) as exc:
            log.debug("unsubscribe failed (the reader reconnects): %r", exc)

    async def run(self) -> None:
        """The reader: connect, subscribe every current channel, dispatch, reconnect."""
        attempt = 0
        while True:
            pubsub = self.redis.pubsub()
            try:
                channels = list(self._handlers)
                async with self._lock:
                    for i in range(0, len(channels), _CHUNK):
                        await pubsub.subscribe(*channels[i : i + _CHUNK])
                self._pubsub = pubsub
                async for message in pubsub.listen():
                    if not self._connected:
                        self._connected = True
                        if attempt:
                            log.info("pub/sub reconnected; %d channels resubscribed", len(channels))
                        attempt = 0
                    self._dispatch(message)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost: %r", exc)
            finally:
                self._connected = False
                self._pubsub = None
                for futures in self._confirm.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(PubSubUnavailable("pub/sub connection lost"))
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            attempt += 1
            self.reconnects += 1
            metrics.PUBSUB_RECONNECTS.inc()
            await asyncio.sleep(backoff(attempt, self.backoff_base, self.backoff_cap))

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if not isinstance(channel, bytes):
            return
        if kind == b"message" or kind == "message":
            handler = self._handlers.get(channel)
            data = message.get("data")
            if handler is None or not isinstance(data, bytes):
                return
            self.messages += 1
            try:
                handler(data)
            except Exception:
                log.exception("pub/sub handler failed on %s", channel.decode(errors="replace"))
        elif kind == "subscribe":
            for future in self._confirm.pop(channel, ()):
                if not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        await self.redis.aclose()
