"""The process's ONE Redis pub/sub connection, multiplexed over every channel it listens to.

The gateway (one channel per socket, plus the process channels) and the Post Office API (one
channel per SSE agent channel, fanned out to its streams in ``post_office_api/hub.py``) both
build on :class:`Hub`. Each channel maps to a synchronous handler that gets the raw message
bytes; a handler only queues work, so the reader never waits on a consumer. A handler that
raises is logged and counted (``postoffice_pubsub_handler_errors_total``); the reader goes on.

Confirmation. Redis answers each SUBSCRIBE/UNSUBSCRIBE with one reply per channel, in order.
The hub counts commands in flight per channel; a channel is live when a ``subscribe`` reply
brings its count to zero, so an UNSUBSCRIBE-then-SUBSCRIBE race never reports a subscription
that an in-flight UNSUBSCRIBE is about to undo. :meth:`Hub.subscribe` returns only once Redis
confirmed the subscription (a caller that announces itself afterwards cannot miss a message),
or raises :class:`PubSubUnavailable` when the connection is down or Redis did not confirm
within ``confirm_timeout``. Until Redis confirms an UNSUBSCRIBE, messages keep reaching the
channel's handler: ``PUBLISH`` counted this process as a receiver for them.

Reconnection. :meth:`Hub.run` is the reader. After any Redis failure it waits
``shared.backoff.backoff(attempt, backoff_base, backoff_cap)``, reconnects and resubscribes
every channel current at that moment (``postoffice_pubsub_reconnects_total``). A reader that
dies of anything else (a bug, an unexpected reply) is logged with its traceback, counted
(``postoffice_pubsub_listener_restarts_total``) and restarted the same way; ``CancelledError``
always propagates. While it is not connected, :meth:`Hub.check` (the ``/ready`` check) fails
and ``postoffice_pubsub_connected`` is 0.

Messages published while the connection is down are lost (Redis pub/sub keeps nothing), so
callbacks registered with :meth:`Hub.on_resubscribed` run once Redis confirmed every channel of
a (re)connection: the caller then re-reads from Redis the state those messages would have
announced. A channel unsubscribed while the reader was resubscribing is unsubscribed again as
soon as the new connection is up, so none is left behind.

Exception tree::

    Exception
     └── PubSubUnavailable   the pub/sub connection is down, or Redis did not confirm in time
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from shared.backoff import backoff
from shared.redis_client import make_redis

__all__ = ["Handler", "Hub", "PubSubUnavailable"]

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]

#: Channels per SUBSCRIBE command when resubscribing after a reconnect.
_CHUNK = 1000

RECONNECTS = Counter(
    "postoffice_pubsub_reconnects_total",
    "Pub/sub connections lost (a Redis or socket error) and retried, by client name",
    ["client"],
)
RESTARTS = Counter(
    "postoffice_pubsub_listener_restarts_total",
    "Pub/sub readers that died of an unexpected exception (a bug) and were restarted",
    ["client"],
)
HANDLER_ERRORS = Counter(
    "postoffice_pubsub_handler_errors_total",
    "Messages whose channel handler raised (logged; the reader goes on)",
    ["client"],
)
CONNECTED = Gauge(
    "postoffice_pubsub_connected",
    "1 while the pub/sub reader holds a live connection, else 0",
    ["client"],
)


class PubSubUnavailable(Exception):
    """The pub/sub connection is down or did not confirm a subscription in time."""


class _Draining:
    """A channel unsubscribed whose UNSUBSCRIBE Redis has not confirmed yet."""

    __slots__ = ("done", "handler")

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.done = asyncio.Event()


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
        # caller would never learn that messages published meanwhile were lost.
        self.redis: Redis = make_redis(
            redis_url,
            max_connections=2,
            socket_timeout=None,
            health_check_interval=0,
            retries=0,
            name=name,
        )
        self.name = name
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.confirm_timeout = confirm_timeout
        self._handlers: dict[bytes, Handler] = {}
        self._draining: dict[bytes, _Draining] = {}
        # Per channel, the SUBSCRIBE/UNSUBSCRIBE commands sent and not answered yet, in order,
        # each with a serial number so that one that was never written can be taken back.
        self._in_flight: dict[bytes, list[tuple[str, int]]] = {}
        self._serial = 0
        self._generation = 0  # one per connection: a command queued for an older one is void
        self._confirmed: set[bytes] = set()
        self._confirm: dict[bytes, list[asyncio.Future[None]]] = {}
        self._awaiting: set[bytes] = set()  # channels of the current resubscription unconfirmed
        self._resubscribed: list[Callable[[], None]] = []
        self._pubsub: PubSub | None = None
        self._connected = False
        #: Held while a command is written to the connection: one writer at a time.
        self.lock = asyncio.Lock()
        self.reconnects = 0
        self.restarts = 0
        self._metric_labels = {"client": name}
        CONNECTED.labels(**self._metric_labels).set(0)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def channel_count(self) -> int:
        return len(self._handlers)

    def is_subscribed(self, channel: str) -> bool:
        """True once Redis confirmed ``channel`` on the live connection."""
        return channel.encode() in self._confirmed

    async def check(self) -> None:
        """Readiness check: raises unless the reader holds a live connection."""
        if not self._connected:
            raise PubSubUnavailable(
                f"the pub/sub connection is down ({self.reconnects} reconnects, "
                f"{self.restarts} reader restarts)"
            )

    def watch(self, channel: str, handler: Handler) -> None:
        """Remember a channel without waiting: subscribed when the reader (re)connects.
        For process-wide channels, registered before the reader starts."""
        self._handlers[channel.encode()] = handler

    def on_resubscribed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (it must not block) each time every channel is subscribed again
        after a (re)connection, the first connection included."""
        self._resubscribed.append(callback)

    async def subscribe(self, channel: str, handler: Handler) -> None:
        """Route ``channel`` to ``handler`` once Redis confirmed it; raise
        :class:`PubSubUnavailable` when the connection is down or Redis does not confirm within
        ``confirm_timeout`` (the channel is then forgotten, unless it was wanted before).

        Subscribing a channel already live replaces its handler and returns at once; one whose
        SUBSCRIBE is in flight waits for that confirmation."""
        if not self._connected:
            raise PubSubUnavailable("the pub/sub connection is down")
        key = channel.encode()
        added = key not in self._handlers
        self._handlers[key] = handler
        self._end_draining(key)  # from here on, messages go to the new handler
        if key in self._confirmed:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(key, []).append(future)
        try:
            async with asyncio.timeout(self.confirm_timeout):
                if self._last_command(key) != "subscribe":
                    await self._send("subscribe", key)
                await future
        except (RedisError, OSError, TimeoutError, PubSubUnavailable) as exc:
            if added and self._handlers.get(key) is handler:
                await self.unsubscribe(channel)
            raise PubSubUnavailable(
                f"subscribing to {channel!r} failed: {type(exc).__name__}"
            ) from None
        finally:
            waiting = self._confirm.get(key)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._confirm[key]

    async def unsubscribe(self, channel: str, *, confirmed: bool = False) -> None:
        """Stop routing ``channel``. Never raises: a failed write is left to the reader, which
        sees the broken connection and reconnects without the channel.

        With ``confirmed``, return only once no further message can reach the handler: Redis
        confirmed the UNSUBSCRIBE, the channel was subscribed again, or the connection is gone;
        or after ``confirm_timeout`` (logged)."""
        key = channel.encode()
        handler = self._handlers.pop(key, None)
        self._confirmed.discard(key)
        self._fail_waiters(key, "unsubscribed while waiting for confirmation")
        if handler is None:
            draining = self._draining.get(key)
        elif not self._connected:
            # The reader is (re)connecting: it drops channels unsubscribed meanwhile.
            return
        else:
            draining = self._draining[key] = _Draining(handler)
            try:
                await self._send("unsubscribe", key)
            except (RedisError, OSError, PubSubUnavailable) as exc:
                log.info("pub/sub UNSUBSCRIBE failed (the reader reconnects): %r", exc)
        if confirmed and draining is not None:
            try:
                await asyncio.wait_for(draining.done.wait(), self.confirm_timeout)
            except TimeoutError:
                log.warning("redis did not confirm UNSUBSCRIBE %r in time", channel)

    def _last_command(self, key: bytes) -> str | None:
        sent = self._in_flight.get(key)
        return sent[-1][0] if sent else None

    async def _send(self, command: str, key: bytes) -> None:
        """Write SUBSCRIBE/UNSUBSCRIBE for one channel on the live connection.

        The command is recorded before waiting for the lock, so that whoever looks next sees
        the channel's latest intent; taken back if it is never written. A connection lost
        meanwhile voids it: the reader resubscribes every wanted channel when it is back."""
        if not self._connected:
            raise PubSubUnavailable("the pub/sub connection is down")
        generation = self._generation
        self._serial += 1
        entry = (command, self._serial)
        self._in_flight.setdefault(key, []).append(entry)
        written = False
        try:
            async with self.lock:
                pubsub = self._pubsub
                if pubsub is None or generation != self._generation:
                    raise PubSubUnavailable("the pub/sub connection was lost")
                await pubsub.execute_command(command.upper(), key)
                written = True
        finally:
            sent = self._in_flight.get(key)
            if not written and sent is not None and entry in sent:
                sent.remove(entry)
                if not sent:
                    del self._in_flight[key]

    # -- the reader ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The reader: connect, subscribe every current channel, dispatch; on any failure back
        off and start over. Runs until cancelled."""
        attempt = 0
        while True:
            pubsub = self.redis.pubsub()
            try:
                await self._connect(pubsub)
                attempt = 0
                while True:
                    reply = await pubsub.get_message(timeout=None)
                    if reply is not None:
                        self._dispatch(reply)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection %s lost: %r", self.name, exc)
                self.reconnects += 1
                RECONNECTS.labels(**self._metric_labels).inc()
            except Exception:
                # A bug or a reply this code did not expect: the reader must not stay dead.
                log.exception("pub/sub reader %s died; restarting it", self.name)
                self.restarts += 1
                RESTARTS.labels(**self._metric_labels).inc()
            finally:
                await self._disconnect(pubsub)
            delay = backoff(attempt, self.backoff_base, self.backoff_cap)
            attempt += 1
            log.info("pub/sub %s reconnecting in %.3fs (attempt %d)", self.name, delay, attempt)
            await asyncio.sleep(delay)

    async def _connect(self, pubsub: PubSub) -> None:
        async with self.lock:
            await pubsub.connect()  # type: ignore[no-untyped-call]
            channels = list(self._handlers)
            self._awaiting = set(channels)
            self._in_flight.clear()
            for i in range(0, len(channels), _CHUNK):
                chunk = channels[i : i + _CHUNK]
                for key in chunk:
                    self._in_flight[key] = [("subscribe", 0)]
                await pubsub.execute_command("SUBSCRIBE", *chunk)
            # From here unsubscribe() talks to this connection itself; channels it dropped
            # while the list above was being subscribed are dropped now.
            self._pubsub = pubsub
            self._connected = True
            CONNECTED.labels(**self._metric_labels).set(1)
            stale = [key for key in channels if key not in self._handlers]
            for i in range(0, len(stale), _CHUNK):
                chunk = stale[i : i + _CHUNK]
                for key in chunk:
                    self._in_flight[key].append(("unsubscribe", 0))
                await pubsub.execute_command("UNSUBSCRIBE", *chunk)
        log.info(
            "pub/sub %s connected; %d channel(s) subscribed, %d dropped meanwhile",
            self.name,
            len(channels),
            len(stale),
        )
        if not channels:
            self._fire_resubscribed()

    async def _disconnect(self, pubsub: PubSub) -> None:
        self._connected = False
        self._generation += 1
        CONNECTED.labels(**self._metric_labels).set(0)
        self._pubsub = None
        self._in_flight.clear()
        self._confirmed.clear()
        self._awaiting = set()
        for key in list(self._confirm):
            self._fail_waiters(key, "the pub/sub connection was lost")
        for key in list(self._draining):
            self._end_draining(key)  # a dead connection delivers nothing more
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, reply: dict[str, object]) -> None:
        kind = reply.get("type")
        channel = reply.get("channel")
        if not isinstance(channel, bytes):
            return
        if kind == "message":
            data = reply.get("data")
            handler = self._handlers.get(channel)
            if handler is None:
                draining = self._draining.get(channel)
                handler = draining.handler if draining is not None else None
            if handler is None or not isinstance(data, bytes):
                return
            try:
                handler(data)
            except Exception:
                HANDLER_ERRORS.labels(**self._metric_labels).inc()
                log.exception("pub/sub handler failed on %s", channel.decode(errors="replace"))
        elif kind in ("subscribe", "unsubscribe"):
            self._confirmed_reply(channel, kind)

    def _confirmed_reply(self, channel: bytes, kind: object) -> None:
        sent = self._in_flight.get(channel)
        if sent:
            sent.pop(0)
            if sent:
                return  # a later command on this channel decides its state
            del self._in_flight[channel]
        if kind == "unsubscribe":
            self._end_draining(channel)
            self._resubscription_done(channel)
            return
        if channel not in self._handlers:
            return
        self._confirmed.add(channel)
        for future in self._confirm.pop(channel, ()):
            if not future.done():
                future.set_result(None)
        if sent is None:
            # A confirmation nobody asked for: the client library resubscribed by itself, so
            # messages may have been lost meanwhile.
            self._fire_resubscribed()
        else:
            self._resubscription_done(channel)

    def _resubscription_done(self, channel: bytes) -> None:
        if channel in self._awaiting:
            self._awaiting.discard(channel)
            if not self._awaiting:
                self._fire_resubscribed()

    def _fail_waiters(self, key: bytes, why: str) -> None:
        for future in self._confirm.pop(key, ()):
            if not future.done():
                future.set_exception(PubSubUnavailable(why))

    def _end_draining(self, key: bytes) -> None:
        draining = self._draining.pop(key, None)
        if draining is not None:
            draining.done.set()

    def _fire_resubscribed(self) -> None:
        for callback in self._resubscribed:
            try:
                callback()
            except Exception:
                log.exception("resubscription callback failed")

    async def aclose(self) -> None:
        await self.redis.aclose()
