"""One Redis pub/sub connection per process, shared by every SSE subscriber.

:class:`ChannelHub` owns a single pub/sub connection. The first subscriber of a Redis channel
makes it ``SUBSCRIBE``; the last one leaving makes it ``UNSUBSCRIBE``. :meth:`ChannelHub.join`
returns only once Redis has confirmed the subscription, so a stream whose headers reached the
client receives every message published from then on.

Each subscriber has a bounded buffer (:class:`Subscriber`). Fan-out never waits on a slow
reader: when a subscriber's buffer is full it is dropped (closed with reason ``too_slow``) and
its stream ends with a final ``event: error``; the others are unaffected.

The listener task reconnects with capped, jittered exponential backoff and resubscribes every
channel that still has subscribers. Messages published while Redis was unreachable are lost for
SSE subscribers (pub/sub keeps no history); agents that need every message rely on the gateway's
queue, which holds client messages while no agent listens.

Confirmations: Redis answers each SUBSCRIBE/UNSUBSCRIBE with one reply per channel, in order.
The hub counts commands in flight per channel; when the count falls to zero on a ``subscribe``
reply the channel is live, so a leave-then-join race never reports a subscription that an
in-flight UNSUBSCRIBE is about to undo.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import re
from collections.abc import Iterable

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from services.post_office_api import metrics

__all__ = ["ChannelHub", "HubFull", "HubUnavailable", "Subscriber"]

log = logging.getLogger(__name__)

#: ``id:`` values must not contain line breaks; a message id that is not this shape is not sent.
_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


class HubUnavailable(Exception):
    """Redis did not confirm a subscription in time."""


class HubFull(Exception):
    """The process already serves its maximum number of subscribers."""


Event = tuple[str | None, str]  # (SSE id, data)


class Subscriber:
    """One SSE stream's bounded buffer of events.

    ``closed`` is None while open, else the reason: ``too_slow`` (overflow: the buffered events
    are dropped), ``shutdown`` (the process drains: buffered events are still sent) or
    ``client_gone``.
    """

    __slots__ = ("_items", "_limit", "_wakeup", "channel", "closed")

    def __init__(self, channel: bytes, limit: int) -> None:
        self.channel = channel
        self._items: collections.deque[Event] = collections.deque()
        self._limit = limit
        self._wakeup = asyncio.Event()
        self.closed: str | None = None

    def push(self, event: Event) -> bool:
        """Buffer ``event``; False (and closed ``too_slow``) when the buffer was full."""
        if self.closed is not None:
            return True
        if len(self._items) >= self._limit:
            self._items.clear()
            self.close("too_slow")
            return False
        self._items.append(event)
        self._wakeup.set()
        return True

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        self._wakeup.set()

    async def get(self) -> Event | None:
        """The next event, or None once closed (after the buffer is sent, unless too slow)."""
        while True:
            if self.closed == "too_slow":
                return None
            if self._items:
                return self._items.popleft()
            if self.closed is not None:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()


class ChannelHub:
    def __init__(
        self,
        redis: Redis,
        *,
        queue_size: int,
        max_subscribers: int,
        subscribe_timeout: float,
        backoff_min: float,
        backoff_max: float,
    ) -> None:
        self._redis = redis
        self._queue_size = queue_size
        self._max_subscribers = max_subscribers
        self._subscribe_timeout = subscribe_timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._subs: dict[bytes, set[Subscriber]] = {}
        self._ready: dict[bytes, asyncio.Event] = {}
        self._in_flight: dict[bytes, int] = {}
        self._pubsub: PubSub | None = None
        self._send_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._count = 0
        # Events whose message carries no usable message_id still get an SSE id: hub-NNN.
        self._seq = 0
        self.dispatched = 0
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriber_count(self) -> int:
        return self._count

    def channels(self) -> list[bytes]:
        return list(self._subs)

    def stats(self) -> dict[str, object]:
        """What the hub holds: one pub/sub connection, its channels and subscribers."""
        return {
            "connected": self.connected,
            "pubsub_connections": 1 if self.connected else 0,
            "subscribers": self._count,
            "channels": {c.decode(errors="replace"): len(s) for c, s in self._subs.items()},
            "events_dispatched": self.dispatched,
            "subscribers_dropped": self.dropped,
        }

    # -- subscribers -------------------------------------------------------------------------

    async def join(self, channel: str) -> Subscriber:
        """A subscriber of Redis channel ``channel``, once Redis confirmed the subscription.

        Raises :class:`HubFull` past ``max_subscribers`` and :class:`HubUnavailable` when the
        pub/sub connection is down or Redis does not confirm within ``subscribe_timeout``.
        """
        if self._count >= self._max_subscribers:
            raise HubFull(f"this process already serves {self._max_subscribers} streams")
        if not self.connected:
            # Fail fast while Redis is unreachable: the client retries with its backoff, rather
            # than every new stream hanging for the whole subscribe timeout.
            raise HubUnavailable("redis pub/sub is not connected; retry later")
        key = channel.encode()
        sub = Subscriber(key, self._queue_size)
        subs = self._subs.setdefault(key, set())
        subs.add(sub)
        self._count += 1
        metrics.SSE_SUBSCRIBERS.set(self._count)
        if len(subs) == 1:
            self._ready[key] = asyncio.Event()
            await self._send("SUBSCRIBE", [key])
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                await self._ready[key].wait()
        except TimeoutError:
            await self.leave(sub)
            raise HubUnavailable("redis did not confirm the subscription in time") from None
        except BaseException:
            await self.leave(sub)
            raise
        return sub

    async def leave(self, sub: Subscriber) -> None:
        """Forget ``sub``; the channel's last subscriber leaving unsubscribes it. Idempotent."""
        subs = self._subs.get(sub.channel)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        self._count -= 1
        metrics.SSE_SUBSCRIBERS.set(self._count)
        if not subs:
            del self._subs[sub.channel]
            self._ready.pop(sub.channel, None)
            await self._send("UNSUBSCRIBE", [sub.channel])

    def close_all(self, reason: str) -> None:
        """End every stream (process shutdown): buffered events are still sent."""
        for subs in self._subs.values():
            for sub in subs:
                sub.close(reason)

    # -- Redis -------------------------------------------------------------------------------

    async def _send(self, command: str, channels: list[bytes]) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE on the live connection. Without one, nothing: the
        listener subscribes every wanted channel when it (re)connects. A failed write is left to
        the listener too, which sees the broken connection and reconnects."""
        async with self._send_lock:
            pubsub = self._pubsub
            if pubsub is None or not self._connected.is_set():
                return
            for ch in channels:
                self._in_flight[ch] = self._in_flight.get(ch, 0) + 1
            try:
                await pubsub.execute_command(command, *channels)
            except (RedisError, OSError) as exc:
                log.info("pub/sub %s failed (the listener reconnects): %r", command, exc)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_min * (2.0 ** min(attempt, 32)))
        # "Equal jitter": at least half the step, so retries spread without collapsing to 0.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def run(self) -> None:
        """The listener: connect, subscribe, dispatch; on failure back off and start over."""
        attempt = 0
        while True:
            pubsub = self._redis.pubsub()
            try:
                await self._connect(pubsub)
                attempt = 0
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost: %r", exc)
            except Exception:
                # A reply this code did not expect must not end SSE for the whole process.
                log.exception("pub/sub listener failed")
            finally:
                await self._disconnect(pubsub)
            metrics.PUBSUB_RECONNECTS.inc()
            delay = self._backoff(attempt)
            attempt += 1
            log.info("pub/sub reconnecting in %.3fs (attempt %d)", delay, attempt)
            await asyncio.sleep(delay)

    async def _connect(self, pubsub: PubSub) -> None:
        async with self._send_lock:
            await pubsub.connect()  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
            self._in_flight.clear()
            wanted = list(self._subs)
            if wanted:
                for ch in wanted:
                    self._in_flight[ch] = 1
                await pubsub.execute_command("SUBSCRIBE", *wanted)
            self._connected.set()
        log.info("pub/sub connected; %d channel(s) subscribed", len(wanted))

    async def _disconnect(self, pubsub: PubSub) -> None:
        self._connected.clear()
        self._pubsub = None
        self._in_flight.clear()
        for event in self._ready.values():
            event.clear()
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            reply = await pubsub.get_message(timeout=None)
            if reply is None:
                continue
            kind = reply["type"]
            channel: bytes = reply["channel"]
            if kind == "message":
                await self._dispatch(channel, reply["data"])
            elif kind in ("subscribe", "unsubscribe"):
                self._confirm(channel, kind)

    def _confirm(self, channel: bytes, kind: str) -> None:
        left = self._in_flight.get(channel, 0) - 1
        if left > 0:
            self._in_flight[channel] = left
            return
        self._in_flight.pop(channel, None)
        if kind == "subscribe" and channel in self._ready:
            self._ready[channel].set()

    async def _dispatch(self, channel: bytes, data: bytes) -> None:
        subs = self._subs.get(channel)
        if not subs:
            return
        event = _event(data)
        if event is None:
            metrics.SSE_INVALID.inc()
            log.warning("dropped a non-JSON-object message on %r", channel[:100])
            return
        if event[0] is None:
            self._seq += 1
            event = (f"hub-{self._seq}", event[1])
        dropped = [sub for sub in list(subs) if not sub.push(event)]
        metrics.SSE_EVENTS.inc(len(subs) - len(dropped))
        self.dispatched += len(subs) - len(dropped)
        self.dropped += len(dropped)
        for sub in dropped:
            metrics.SSE_DROPPED.labels(reason="too_slow").inc()
            log.warning(
                "SSE subscriber of %r fell behind (%d events buffered): dropped",
                channel.decode(errors="replace"),
                self._queue_size,
            )
            await self.leave(sub)


def _event(data: bytes) -> Event | None:
    """The SSE id (the agent message's ``message_id``) and data of one pub/sub message."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    message_id = raw.get("message_id")
    sse_id = message_id if isinstance(message_id, str) and _SAFE_ID.match(message_id) else None
    return sse_id, data.decode("utf-8", "replace")


def channel_names(channels: Iterable[bytes]) -> list[str]:
    return [c.decode(errors="replace") for c in channels]
