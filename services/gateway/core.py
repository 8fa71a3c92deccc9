"""The gateway's process-wide state and its background work.

One :class:`Gateway` per process holds the connection table, the ONE pub/sub hub, the ONE
batched publisher, the registry and the Traffic Cop client, and runs:

* the instance heartbeat: ``websocket:gateway:<instance>`` refreshed every third of its TTL;
* the tick: app pings every ``HEARTBEAT_INTERVAL``, liveness flushed to Redis in one pipeline
  every ``LIVENESS_FLUSH_SECONDS`` (only connections seen since the last flush, plus newly used
  channels), and the local idle check (``MAX_IDLE_SECONDS``: close 1008 "idle", evicted);
* the handlers of the process-wide channels: this instance's control channel, session
  revocations and the channel broadcasts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway.connection import Connection, ConnectionTable
from services.gateway.hub import Hub
from services.gateway.publisher import Publisher
from services.gateway.settings import Settings
from shared import redis_names as names
from shared.protocol import CloseCode, ping_frame
from shared.registry import Registry
from shared.traffic_cop_client import TrafficCopClient

__all__ = ["Gateway"]

log = logging.getLogger(__name__)


async def _close_socket(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    await ws.close(code=code, message=reason.encode())


class Gateway:
    def __init__(
        self,
        settings: Settings,
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
            queue_bound=settings.queue_bound,
            buffer_size=settings.breaker_buffer,
            backoff_base=settings.breaker_backoff_base,
            backoff_cap=settings.breaker_backoff_cap,
        )
        self.connections = ConnectionTable()
        # Every accepted socket, registered or still being validated: the drain closes them all.
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        # redis-py's pool raises instead of waiting when it is exhausted: connects and
        # disconnects wait here instead, leaving connections for the publisher and the tick.
        self.redis_slots = asyncio.Semaphore(settings.redis_max_connections - 8)
        # Held while a liveness flush is in flight: a leaving connection waits for it before
        # unregistering, so a flush cannot write to a record after it was removed.
        self.flush_lock = asyncio.Lock()
        self.channels = frozenset(settings.channels)
        self.ready = False  # True once started; False again while draining
        self.started = time.monotonic()
        self.frames_in = 0
        self.frames_out_pubsub = 0

    # -- process-wide channels ----------------------------------------------------------------

    def watch_process_channels(self) -> None:
        self.hub.watch(names.gateway_control(self.instance), self.on_control)
        self.hub.watch(names.SESSION_REVOCATIONS, self.on_revocation)
        for channel in self.settings.channels:
            self.hub.watch(names.channel_broadcast(channel), self._broadcaster(channel))

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
        if not (code == 1000 or 3000 <= code <= 4999 or code in (1001, 1008, 1011, 1013)):
            code = CloseCode.NORMAL
        conn = self.connections.get(str(cid))
        if conn is not None:
            log.info("closing on request: %d %s", code, reason, extra={"connection_id": conn.id})
            conn.close(code, reason, evicted=code == CloseCode.POLICY_VIOLATION)

    def on_revocation(self, data: bytes) -> None:
        try:
            session_id = orjson.loads(data)["session_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed revocation")
            return
        for conn in self.connections.of_session(str(session_id)):
            log.info("session revoked, closing", extra={"connection_id": conn.id})
            conn.close(CloseCode.SESSION_INVALID, "session revoked")

    def _broadcaster(self, channel: str) -> Callable[[bytes], None]:
        def fan_out(data: bytes) -> None:
            text = data.decode("utf-8", "replace")
            for conn in self.connections.using(channel):
                if conn.send(text):
                    self.frames_out_pubsub += 1

        return fan_out

    def deliver(self, conn: Connection, data: bytes) -> None:
        """A frame from ``websocket:connection:<id>:messages``: forwarded as text, unparsed."""
        if conn.send(data.decode("utf-8", "replace")):
            self.frames_out_pubsub += 1

    # -- background work ----------------------------------------------------------------------

    async def keep_instance_alive(self) -> None:
        ttl = self.settings.instance_ttl_seconds
        key = names.gateway_instance(self.instance)
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, str(time.time()), px=int(ttl * 1000))
                    pipe.sadd(names.GATEWAYS, self.instance)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not refresh the instance key: %r", exc)
            await asyncio.sleep(ttl / 3)

    async def tick(self) -> None:
        s = self.settings
        interval = min(s.liveness_flush_seconds, s.heartbeat_interval, s.max_idle_seconds / 4)
        next_ping = time.monotonic() + s.heartbeat_interval
        next_flush = time.monotonic() + s.liveness_flush_seconds
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.check_idle(now)
            if now >= next_ping:
                next_ping = now + s.heartbeat_interval
                frame = ping_frame()
                for conn in self.connections:
                    conn.send(frame)
            if now >= next_flush:
                next_flush = now + s.liveness_flush_seconds
                await self.flush_liveness()

    def check_idle(self, now: float) -> None:
        limit = self.settings.max_idle_seconds
        for conn in self.connections:
            if not conn.closing and now - conn.last_seen > limit:
                log.info(
                    "idle for %.1fs, evicting",
                    now - conn.last_seen,
                    extra={"connection_id": conn.id},
                )
                conn.close(CloseCode.POLICY_VIOLATION, "idle", evicted=True)

    async def flush_liveness(self) -> None:
        """Write changed last-seen times and new channel use in one pipeline."""
        seen: dict[str, float] = {}
        used: dict[str, list[str]] = {}
        full: dict[str, list[str]] = {}
        batch: list[tuple[Connection, float, list[str]]] = []
        for conn in self.connections:
            changed = conn.last_seen_wall != conn.flushed_wall
            if not changed and not conn.new_channels:
                continue
            if changed:
                seen[conn.id] = conn.last_seen_wall
            if conn.new_channels:
                used[conn.id] = list(conn.new_channels)
                full[conn.id] = list(conn.channels)
            batch.append((conn, conn.last_seen_wall, list(conn.new_channels)))
        if not batch:
            return
        try:
            async with self.flush_lock:
                await self.registry.touch(seen, used, full)
        except (RedisError, OSError) as exc:
            log.warning("liveness flush failed, retried next tick: %r", exc)
            return
        for conn, wall, new in batch:
            conn.flushed_wall = wall
            del conn.new_channels[: len(new)]

    # -- shutdown ----------------------------------------------------------------------------

    async def close_all(self, code: int, reason: str, wait: float) -> None:
        conns = list(self.connections)
        for conn in conns:
            conn.close(code, reason)
        held = {conn.ws for conn in conns}
        # Sockets still between accept and welcome: their handlers see ``ready`` is False and
        # stop, but close them now so the client learns why at once.
        strays = [ws for ws in self.sockets if ws not in held and not ws.closed]
        tasks = [asyncio.create_task(c.wait_closed()) for c in conns]
        tasks += [asyncio.create_task(_close_socket(ws, code, reason)) for ws in strays]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=wait)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def forget_instance(self) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(names.gateway_instance(self.instance))
                if not len(self.connections):
                    pipe.srem(names.GATEWAYS, self.instance)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not delete the instance key: %r", exc)

    def snapshot(self) -> dict[str, object]:
        return {
            "instance": self.instance,
            "connections": len(self.connections),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "messages_in": self.frames_in,
            "messages_out": Connection.frames_written,
            "pubsub_frames_forwarded": self.frames_out_pubsub,
            "published": self.publisher.published,
            "queued": self.publisher.queued,
            "refused": self.publisher.refused,
            "publisher_waiting": self.publisher.waiting,
            "breaker": {"open": self.publisher.breaker_open, "buffered": self.publisher.buffered},
            "pubsub": {
                "connected": self.hub.connected,
                "channels": self.hub.channel_count,
                "reconnects": self.hub.reconnects,
            },
        }
