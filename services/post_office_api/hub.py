"""One Redis pub/sub connection per process, shared by every SSE subscriber.

:class:`ChannelHub` fans the process's one pub/sub connection out to SSE streams. The first
subscriber of a Redis channel makes it ``SUBSCRIBE``; the last one leaving makes it
``UNSUBSCRIBE``. :meth:`ChannelHub.join`
returns only once Redis has confirmed the subscription, so a stream whose headers reached the
client receives every message published from then on.

Each subscriber has a bounded buffer (:class:`Subscriber`). Fan-out never waits on a slow
reader: when a subscriber's buffer is full it is dropped (closed with reason ``too_slow``) and
its stream ends with a final ``event: error``; the others are unaffected.

This is the channel's tap, at most once: events buffered for a subscriber that leaves (its
client went away, or it was dropped ``too_slow``) are dropped. Every message is in the
channel's stream since its publish (:mod:`shared.streams`); agents that must see each one
consume a group. A client that goes away is noticed by a sweep of every stream's transport
every ``disconnect_check`` seconds, and before every write.

Events larger than ``max_event_bytes`` are not forwarded (no SSE client could read such a
line); they are counted and logged.

The pub/sub connection itself is ``shared.pubsub.Hub``, the one multiplexer the gateway uses
too: it confirms subscriptions, keeps routing a channel's messages here until Redis confirmed
its UNSUBSCRIBE, reconnects with capped, jittered backoff, resubscribes every channel that
still has subscribers and restarts a reader that died. Messages published while Redis was
unreachable are not replayed to tap subscribers (pub/sub keeps no history); the stream keeps
them for consumer groups.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
from collections.abc import Callable

import orjson

from services.post_office_api import metrics
from shared.pubsub import Hub, PubSubUnavailable

__all__ = ["ChannelHub", "HubFull", "Subscriber"]

log = logging.getLogger(__name__)

#: ``id:`` values must not contain line breaks; a message id that is not this shape is not sent.
_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


class HubFull(Exception):
    """The process already serves its maximum number of subscribers."""


Event = tuple[str | None, str]  # (SSE id, data)


class Subscriber:
    """One SSE stream's bounded buffer of events.

    ``closed`` is None while open, else the reason: ``too_slow`` (overflow), ``shutdown`` (the
    process drains: buffered events are still sent) or ``client_gone``. After ``too_slow`` or
    ``client_gone`` nothing more is handed out: what is still buffered is dropped when the
    subscriber leaves the hub (the tap is at most once).
    """

    __slots__ = (
        "_drain_left",
        "_items",
        "_limit",
        "_wakeup",
        "alive",
        "channel",
        "closed",
    )

    def __init__(
        self,
        channel: bytes,
        limit: int,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.channel = channel
        self.alive = alive
        self._items: collections.deque[Event] = collections.deque()
        self._limit = limit
        self._wakeup = asyncio.Event()
        self.closed: str | None = None
        # On shutdown, how many buffered events are still sent: those pushed later are
        # dropped, so a busy channel cannot hold a draining stream open.
        self._drain_left = 0

    def push(self, event: Event) -> bool:
        """Buffer ``event``; False (and closed ``too_slow``) when the buffer was full.

        A closed subscriber keeps what it is given until it leaves the hub (a short window)."""
        if self.closed is None and len(self._items) >= self._limit:
            self.close("too_slow")
            self._items.append(event)
            return False
        self._items.append(event)
        self._wakeup.set()
        return True

    @property
    def buffered(self) -> int:
        return len(self._items)

    def unget(self, event: Event) -> None:
        """Put back an event that could not be written (it goes first)."""
        self._items.appendleft(event)
        self._drain_left = 0

    def take_pending(self) -> list[Event]:
        items = list(self._items)
        self._items.clear()
        return items

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self._drain_left = len(self._items) if reason == "shutdown" else 0
        self._wakeup.set()

    async def get(self) -> Event | None:
        """The next event, or None once closed (after the buffer is sent on shutdown)."""
        while True:
            if self.closed is not None:
                if self._drain_left > 0 and self._items:
                    self._drain_left -= 1
                    return self._items.popleft()
                return None
            if self._items:
                return self._items.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()


class ChannelHub:
    def __init__(
        self,
        pubsub: Hub,
        *,
        queue_size: int,
        max_subscribers: int,
        max_event_bytes: int = 2 * 1024 * 1024,
        disconnect_check: float = 0.1,
    ) -> None:
        self.pubsub = pubsub
        self._max_event_bytes = max_event_bytes
        self._disconnect_check = disconnect_check
        self._queue_size = queue_size
        self._max_subscribers = max_subscribers
        self._subs: dict[bytes, set[Subscriber]] = {}
        self._count = 0
        # Events whose message carries no usable message_id still get an SSE id: hub-NNN.
        self._seq = 0
        self.dispatched = 0
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self.pubsub.connected

    @property
    def subscriber_count(self) -> int:
        return self._count

    def subscribers(self, channel: str) -> list[Subscriber]:
        """The subscribers of Redis channel ``channel`` (for diagnostics and tests)."""
        return list(self._subs.get(channel.encode(), ()))

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

    async def join(
        self,
        channel: str,
        *,
        alive: Callable[[], bool] | None = None,
    ) -> Subscriber:
        """A subscriber of Redis channel ``channel``, once Redis confirmed the subscription.

        ``alive``: False once its client has gone (checked by :meth:`watch` and before each write).

        Raises :class:`HubFull` past ``max_subscribers`` and :class:`PubSubUnavailable` when
        the pub/sub connection is down or Redis does not confirm in time.
        """
        if self._count >= self._max_subscribers:
            raise HubFull(f"this process already serves {self._max_subscribers} streams")
        if not self.connected:
            # Fail fast while Redis is unreachable: the client retries with its backoff, rather
            # than every new stream hanging for the whole subscribe timeout.
            raise PubSubUnavailable("redis pub/sub is not connected; retry later")
        key = channel.encode()
        sub = Subscriber(key, self._queue_size, alive)
        self._subs.setdefault(key, set()).add(sub)
        self._count += 1
        metrics.SSE_SUBSCRIBERS.set(self._count)
        try:
            # Every subscriber waits for the confirmation; the first one sends the SUBSCRIBE.
            await self.pubsub.subscribe(channel, functools.partial(self._dispatch, key))
        except BaseException:
            await self.leave(sub)
            raise
        return sub

    async def leave(self, sub: Subscriber) -> None:
        """Forget ``sub``; the channel's last subscriber leaving unsubscribes it. Idempotent."""
        if not self._detach(sub) or sub.channel in self._subs:
            return
        sub.take_pending()  # the tap is at most once: what it did not write is dropped
        await self.pubsub.unsubscribe(sub.channel.decode())

    def _detach(self, sub: Subscriber) -> bool:
        subs = self._subs.get(sub.channel)
        if subs is None or sub not in subs:
            return False
        subs.discard(sub)
        self._count -= 1
        metrics.SSE_SUBSCRIBERS.set(self._count)
        if not subs:
            del self._subs[sub.channel]
        return True

    async def watch(self) -> None:
        """Close the subscribers whose client has gone, every ``disconnect_check`` seconds:
        the stream then leaves the hub at once instead of at its next write, so ``PUBLISH``
        stops counting this process as a receiver."""
        while True:
            await asyncio.sleep(self._disconnect_check)
            for subs in self._subs.values():
                for sub in subs:
                    if sub.closed is None and sub.alive is not None and not sub.alive():
                        sub.close("client_gone")

    def close_all(self, reason: str) -> None:
        """End every stream (process shutdown): buffered events are still sent."""
        for subs in self._subs.values():
            for sub in subs:
                sub.close(reason)

    # -- fan-out (a handler of the shared pub/sub hub: it never waits) -----------------------

    def _with_id(self, event: Event) -> Event:
        if event[0] is not None:
            return event
        self._seq += 1
        return (f"hub-{self._seq}", event[1])

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        subs = self._subs.get(channel)
        if not subs:
            return
        if len(data) > self._max_event_bytes:
            metrics.SSE_INVALID.labels(reason="too_large").inc()
            log.warning(
                "dropped a %d-byte message on %r: larger than SSE_MAX_EVENT_BYTES (%d)",
                len(data),
                channel[:100],
                self._max_event_bytes,
            )
            return
        event = _event(data, self._max_event_bytes)
        if event is None:
            metrics.SSE_INVALID.labels(reason="not_json_object").inc()
            log.warning("dropped a non-JSON-object message on %r", channel[:100])
            return
        event = self._with_id(event)
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
            if len(subs) > 1:
                # The others received the same events: its buffer is discarded now. The last
                # one stays until its stream leaves, which pushes its buffer back.
                self._detach(sub)
                sub.take_pending()


def _event(data: bytes, max_bytes: int) -> Event | None:
    """The SSE id (the agent message's ``message_id``) and data of one pub/sub message."""
    if len(data) > max_bytes:
        return None
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    message_id = raw.get("message_id")
    sse_id = message_id if isinstance(message_id, str) and _SAFE_ID.match(message_id) else None
    return sse_id, data.decode("utf-8", "replace")
