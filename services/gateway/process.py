"""The gateway's process-wide state: what every connection of this process shares.

One :class:`Gateway` per process holds the connection table, the ONE pub/sub hub, the ONE
batched publisher, the registry and the Traffic Cop client, and routes what arrives on the
process-wide channels to the connections it concerns: this instance's control channel (close
commands), session revocations, channel broadcasts, and each connection's own channel. What is
decided for a connection is decided by its protocol
(:mod:`services.gateway.connection_protocol`); this module only finds the connections and
feeds them the event. The periodic work lives in :mod:`services.gateway.upkeep`, the connect and
leave steps in :mod:`services.gateway.lifecycle`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway import metrics
from services.gateway.connection import Connection, ConnectionTable
from services.gateway.connection_protocol import Limits, Publish
from services.gateway.publisher import Item, Publisher
from services.gateway.settings import GatewaySettings
from services.gateway.unregister_retries import UnregisterRetries
from shared import redis_names as names
from shared.protocol import CloseCode
from shared.pubsub import Hub
from shared.registry import Registry
from shared.traffic_cop_client import TrafficCopClient

__all__ = ["Gateway", "RefusedTokens"]

log = logging.getLogger(__name__)


class RefusedTokens:
    """Tokens Traffic Cop refused lately, as sha256 (never the token): a flood of bad tokens
    is answered from here instead of costing Traffic Cop a call each. Bounded: the oldest entry
    goes first; entries live ``ttl`` seconds (a token never becomes valid later: tokens are
    random, so the TTL only bounds memory and staleness)."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._until: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def refused(self, token: str, now: float) -> bool:
        key = self._key(token)
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def add(self, token: str, now: float) -> None:
        if self.ttl <= 0:
            return
        key = self._key(token)
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        while len(self._until) > self.size:
            self._until.popitem(last=False)


def limits_of(settings: GatewaySettings) -> Limits:
    """The per-connection limits, from the gateway's settings of the same names."""
    return Limits(
        queue_frames=settings.send_queue_frames,
        queue_bytes=settings.send_queue_bytes,
        rate_per_second=settings.rate_limit_per_second,
        rate_burst=settings.rate_limit_burst,
        rate_limit_close_after=settings.rate_limit_close_after,
        pong_rate_per_second=settings.pong_rate_per_second,
        pong_burst=settings.pong_burst,
        max_idle_seconds=settings.max_idle_seconds,
    )


async def _close_socket(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    await ws.close(code=code, message=reason.encode())


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        redis: Redis,
        hub: Hub,
        traffic_cop: TrafficCopClient,
    ) -> None:
        self.settings = settings
        self.instance = settings.instance
        self.redis = redis
        self.hub = hub
        self.traffic_cop = traffic_cop
        self.registry = Registry(redis, settings.record_ttl)
        self.publisher = Publisher(
            self.registry,
            batch=settings.publish_batch,
            queue_size=settings.publish_queue,
            stream_max_pending=settings.stream_max_pending,
            round_trip_timeout=settings.publish_timeout_seconds,
            buffer_size=settings.breaker_buffer,
            backoff_base=settings.breaker_backoff_base_seconds,
            backoff_cap=settings.breaker_backoff_cap_seconds,
        )
        self.limits = limits_of(settings)
        self.connections = ConnectionTable()
        # Every accepted socket, registered or still being validated: the drain closes them all.
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        # Sockets that became connections, even once they left the table: a connection that is
        # already closing (with 4429, say) is its own handler's business, not a stray.
        self.connection_sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.open_sockets = 0  # accepted and not yet finished: GATEWAY_MAX_CONNECTIONS
        self.refused_tokens = RefusedTokens(
            settings.invalid_token_cache_seconds, settings.invalid_token_cache_size
        )
        # redis-py's pool raises instead of waiting when it is exhausted: connects and
        # disconnects wait here instead, leaving connections for the publisher and the tick.
        self.redis_slots = asyncio.Semaphore(settings.redis_max_connections - 8)
        self.unregister_retries = UnregisterRetries(
            traffic_cop,
            attempts=settings.unregister_retry_attempts,
            base_seconds=settings.unregister_retry_base_seconds,
            pending_limit=settings.unregister_retry_pending,
        )
        self.channels = frozenset(settings.channels)
        self.ready = False  # True once started; False again while draining
        self.started = time.monotonic()
        self.frames_out_pubsub = 0
        self.session_checks = 0
        self.check_sessions_now = asyncio.Event()

    # -- the publisher, as every connection's sink ----------------------------------------------

    def submit(self, connection: Connection, publish: Publish) -> str | None:
        """Hand one accepted message to the publisher; None when taken, else why not."""
        if self.publisher.submit(Item(connection, publish)):
            return None
        if not self.ready:
            return "the gateway is shutting down; retry on another connection"
        return "the gateway is overloaded; retry later"

    # -- process-wide channels ----------------------------------------------------------------

    def watch_process_channels(self) -> None:
        self.hub.watch(names.gateway_control(self.instance), self.on_control)
        self.hub.watch(names.SESSION_REVOCATIONS, self.on_revocation)
        for channel in self.settings.channels:
            self.hub.watch(names.channel_broadcast(channel), self._broadcaster(channel))
        # Revocations published while pub/sub was down are lost: re-read the sessions.
        self.hub.on_resubscribed(self.check_sessions_now.set)

    def on_control(self, data: bytes) -> None:
        try:
            command = orjson.loads(data)
            op, cid = command["op"], command["connection_id"]
            code = int(command.get("code") or CloseCode.NORMAL)
            reason = str(command.get("reason") or "")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed control command")
            return
        if op != "close":
            log.warning("ignoring unknown control op %r", op)
            return
        conn = self.connections.get(str(cid))
        if conn is not None:
            log.info("closing on request: %d %s", code, reason, extra={"connection_id": conn.id})
            conn.protocol.close_command(code, reason)
            conn.apply()

    def on_revocation(self, data: bytes) -> None:
        try:
            session_id = orjson.loads(data)["session_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed revocation")
            return
        for conn in self.connections.of_session(str(session_id)):
            log.info("session revoked, closing", extra={"connection_id": conn.id})
            conn.protocol.session_revoked()
            conn.apply()

    def _broadcaster(self, channel: str) -> Callable[[bytes], None]:
        def fan_out(data: bytes) -> None:
            text = data.decode("utf-8", "replace")
            size = len(data)
            for conn in self.connections.using(channel):
                if conn.deliver(text, size, "broadcast"):
                    self.frames_out_pubsub += 1

        return fan_out

    def deliver(self, conn: Connection, data: bytes) -> None:
        """A frame from ``websocket:connection:<id>:messages``: forwarded as text, unparsed."""
        if conn.deliver(data.decode("utf-8", "replace"), len(data)):
            self.frames_out_pubsub += 1

    # -- the instance key -----------------------------------------------------------------------

    async def refresh_instance(self) -> None:
        """Write the instance key (with its TTL) and this instance's place in the gateway set."""
        ttl = self.settings.instance_ttl_seconds
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(names.gateway_instance(self.instance), str(time.time()), px=int(ttl * 1000))
            pipe.sadd(names.GATEWAYS, self.instance)
            await pipe.execute()

    async def keep_instance_alive(self) -> None:
        ttl = self.settings.instance_ttl_seconds
        while True:
            try:
                await self.refresh_instance()
            except (RedisError, OSError) as exc:
                log.warning("could not refresh the instance key: %r", exc)
                # Retry soon: the key may have expired meanwhile, and the worker must see this
                # gateway alive again before its recovery grace ends.
                await asyncio.sleep(min(ttl / 3, 1.0))
                continue
            await asyncio.sleep(ttl / 3)

    async def forget_instance(self) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(names.gateway_instance(self.instance))
                if not len(self.connections):
                    pipe.srem(names.GATEWAYS, self.instance)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not delete the instance key: %r", exc)

    # -- shutdown ----------------------------------------------------------------------------

    async def close_all(self, code: int, reason: str, wait: float) -> None:
        conns = list(self.connections)
        for conn in conns:
            conn.protocol.decide_close(code, reason)
            conn.apply()
        # Sockets still between accept and welcome: their handlers see ``ready`` is False and
        # stop, but close them now so the client learns why at once.
        strays = [ws for ws in self.sockets if ws not in self.connection_sockets and not ws.closed]
        tasks = [asyncio.create_task(c.finish()) for c in conns]
        tasks += [asyncio.create_task(_close_socket(ws, code, reason)) for ws in strays]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=wait)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def snapshot(self) -> dict[str, object]:
        conns = list(self.connections)
        return {
            "instance": self.instance,
            "connections": len(conns),
            "sockets": self.open_sockets,
            "frames_queued": sum(c.protocol.queued_frames for c in conns),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "messages_in": metrics.PROTOCOL_STATS.frames_in,
            "messages_out": metrics.PROTOCOL_STATS.frames_out,
            "pubsub_frames_forwarded": self.frames_out_pubsub,
            "published": self.publisher.published,
            "queued": self.publisher.queued,
            "refused": self.publisher.refused,
            "publisher_waiting": self.publisher.waiting,
            "unregisters_pending": self.unregister_retries.pending,
            "refused_tokens_cached": len(self.refused_tokens),
            "breaker": {"open": self.publisher.breaker_open, "buffered": self.publisher.buffered},
            "pubsub": {
                "connected": self.hub.connected,
                "channels": self.hub.channel_count,
                "reconnects": self.hub.reconnects,
                "restarts": self.hub.restarts,
            },
        }
