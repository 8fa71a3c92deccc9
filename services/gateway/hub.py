"""The process's ONE Redis pub/sub connection, shared by every socket.

Each subscribed channel maps to a synchronous handler that gets the raw message bytes;
handlers only queue work (a frame into a socket's bounded queue), so the reader never waits on
a client. The reader task reconnects with capped, jittered exponential backoff after any Redis
failure and resubscribes every channel that is current at that moment; ``CancelledError`` always
propagates.

:meth:`Hub.subscribe` returns only once Redis confirmed the subscription, so a caller that
announces a connection afterwards (the welcome frame) cannot miss a frame published to it.

Messages published while the connection is down are lost (Redis pub/sub keeps nothing), so
callbacks registered with :meth:`Hub.on_resubscribed` run once Redis confirmed every channel of
a (re)subscription: the gateway then re-reads from Redis the state those messages would have
announced (revoked sessions). A channel unsubscribed while the reader was resubscribing is
unsubscribed again as soon as the new connection is up, so none is left behind.

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
        # retries=0: redis-py would otherwise reconnect and resubscribe silently, and the
        # gateway would never learn that messages published meanwhile were lost.
        self.redis: Redis = make_redis(
            redis_url,
            max_connections=4,
            socket_timeout=None,  # type: ignore[arg-type]  # make_redis documents None for pub/sub
            health_check_interval=0,
            retries=0,
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
        self._awaiting: set[bytes] = set()  # channels of the current resubscription unconfirmed
        self._resubscribed: list[Callable[[], None]] = []
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

    def on_resubscribed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (it must not block) each time every channel is subscribed again
        after a (re)connection, the first connection included."""
        self._resubscribed.append(callback)

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
        if pubsub is None:
            # The reader is (re)connecting: it unsubscribes channels dropped meanwhile.
            return
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
                self._awaiting = set(channels)
                async with self._lock:
                    for i in range(0, len(channels), _CHUNK):
                        await pubsub.subscribe(*channels[i : i + _CHUNK])
                    # From here unsubscribe() talks to this connection itself; channels it
                    # dropped while the list above was being subscribed are dropped now.
                    self._pubsub = pubsub
                    stale = [c for c in channels if c not in self._handlers]
                    for i in range(0, len(stale), _CHUNK):
                        await pubsub.unsubscribe(*stale[i : i + _CHUNK])
                if stale:
                    log.debug("dropped %d channels unsubscribed while resubscribing", len(stale))
                if not channels:
                    self._fire_resubscribed()
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
                self._awaiting = set()
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
            waiting = self._confirm.pop(channel, ())
            for future in waiting:
                if not future.done():
                    future.set_result(None)
            if self._awaiting:
                self._awaiting.discard(channel)
                if not self._awaiting:
                    self._fire_resubscribed()
            elif not waiting:
                # A confirmation nobody asked for: the client library reconnected and
                # resubscribed by itself, so messages may have been lost meanwhile.
                self._fire_resubscribed()

    def _fire_resubscribed(self) -> None:
        for callback in self._resubscribed:
            try:
                callback()
            except Exception:
                log.exception("resubscription callback failed")

    async def close(self) -> None:
        await self.redis.aclose()
