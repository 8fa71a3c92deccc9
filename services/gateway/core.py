"""The gateway's process-wide state and its background work.

One :class:`Gateway` per process holds the connection table, the ONE pub/sub hub, the ONE
batched publisher, the registry and the Traffic Cop client, and runs:

* the instance heartbeat: ``websocket:gateway:<instance>`` refreshed every third of its TTL;
* the tick, four independent loops (a slow Redis in one never delays another):

  - app pings every ``HEARTBEAT_INTERVAL``, the local idle check (``MAX_IDLE_SECONDS``: close
    1008 "idle", evicted) and the session expiry check (``expires_at`` passed: close 4401
    "session expired");
  - the liveness flush: changed last-seen times and newly used channels, one pipeline every
    ``LIVENESS_FLUSH_SECONDS``; a socket whose record is gone while its session lives (this
    instance was taken for dead while it stalled) is closed with 1008 "stale";
  - the session check: after every pub/sub (re)subscription (a revocation published while the
    pub/sub connection was down is lost) and every ``SESSION_CHECK_SECONDS``, one pipeline of
    ``EXISTS session:id:<session_id>`` for every session held; a missing session closes its
    sockets with 4401;
  - retries of Traffic Cop unregisters that failed, with backoff, a bounded number of times;

* the handlers of the process-wide channels: this instance's control channel, session
  revocations and the channel broadcasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway.connection import Connection, ConnectionTable
from services.gateway.hub import Hub
from services.gateway.publisher import Publisher
from services.gateway.settings import GatewaySettings
from shared import redis_names as names
from shared.protocol import CloseCode, ping_frame
from shared.registry import Registry
from shared.traffic_cop_client import TrafficCopClient, TrafficCopError, TrafficCopRejected

__all__ = ["Gateway", "RefusedTokens"]

log = logging.getLogger(__name__)


async def _close_socket(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    await ws.close(code=code, message=reason.encode())


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
            queue_bound=settings.queue_max_length,
            buffer_size=settings.breaker_buffer,
            backoff_base=settings.breaker_backoff_base_seconds,
            backoff_cap=settings.breaker_backoff_cap_seconds,
        )
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
        # Held while a liveness flush is in flight: a leaving connection waits for it before
        # unregistering, so a flush cannot write to a record after it was removed.
        self.flush_lock = asyncio.Lock()
        self.channels = frozenset(settings.channels)
        self.ready = False  # True once started; False again while draining
        self.started = time.monotonic()
        self.frames_in = 0
        self.frames_out_pubsub = 0
        self.session_checks = 0
        self._check_sessions_now = asyncio.Event()
        # connection id -> (failed attempts, monotonic time of the next attempt)
        self._unregister_retries: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._retry_wakeup = asyncio.Event()

    # -- process-wide channels ----------------------------------------------------------------

    def watch_process_channels(self) -> None:
        self.hub.watch(names.gateway_control(self.instance), self.on_control)
        self.hub.watch(names.SESSION_REVOCATIONS, self.on_revocation)
        for channel in self.settings.channels:
            self.hub.watch(names.channel_broadcast(channel), self._broadcaster(channel))
        # Revocations published while pub/sub was down are lost: re-read the sessions.
        self.hub.on_resubscribed(self._check_sessions_now.set)

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
            size = len(data)
            for conn in self.connections.using(channel):
                if conn.send(text, size):
                    self.frames_out_pubsub += 1

        return fan_out

    def deliver(self, conn: Connection, data: bytes) -> None:
        """A frame from ``websocket:connection:<id>:messages``: forwarded as text, unparsed."""
        if conn.send(data.decode("utf-8", "replace"), len(data)):
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
                # Retry soon: the key may have expired meanwhile, and the worker must see this
                # gateway alive again before its recovery grace ends.
                await asyncio.sleep(min(ttl / 3, 1.0))
                continue
            await asyncio.sleep(ttl / 3)

    async def tick(self) -> None:
        """Every periodic job, each in its own loop (see the module docstring)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeat_loop(), name="gateway-heartbeat")
            group.create_task(self._flush_loop(), name="gateway-liveness-flush")
            group.create_task(self._session_check_loop(), name="gateway-session-check")
            group.create_task(self._unregister_retry_loop(), name="gateway-unregister-retry")

    async def _heartbeat_loop(self) -> None:
        s = self.settings
        interval = min(s.heartbeat_interval, s.max_idle_seconds / 4, 1.0)
        next_ping = time.monotonic() + s.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.check_idle(now)
            self.check_expired(time.time())
            if now >= next_ping:
                next_ping = now + s.heartbeat_interval
                frame = ping_frame()
                for conn in self.connections:
                    conn.send(frame)
                    conn.ping()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.liveness_flush_seconds)
            await _guarded("liveness flush", self.flush_liveness)

    async def _session_check_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._check_sessions_now.wait(), self.settings.session_check_seconds
                )
            self._check_sessions_now.clear()
            await _guarded("session check", self.check_sessions)

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

    def check_expired(self, wall: float) -> None:
        for conn in self.connections:
            if not conn.closing and conn.expires_at <= wall:
                log.info("session expired, closing", extra={"connection_id": conn.id})
                conn.close(CloseCode.SESSION_INVALID, "session expired")

    async def check_sessions(self) -> int:
        """Close the sockets of sessions Traffic Cop no longer holds; how many were closed.

        One pipeline: ``EXISTS session:id:<sid>`` per session held (Traffic Cop keeps that key
        for exactly the life of a session, and deletes it on revocation) and ``EXISTS`` of each
        of those connections' records. A session missing while its connection's record exists
        was revoked or expired: close 4401. When the record is missing too, Redis lost its data
        (a restart without persistence) or the connection is still registering; closing every
        socket for that would turn a Redis restart into a mass logout, so those are left to
        the local expiry check and to Traffic Cop at their next connect.
        """
        held = {sid: self.connections.of_session(sid) for sid in self.connections.session_ids()}
        held = {sid: conns for sid, conns in held.items() if conns}
        if not held:
            return 0
        self.session_checks += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid, conns in held.items():
                pipe.exists(names.session_by_id(sid))
                for conn in conns:
                    pipe.exists(names.connection(conn.id))
            results = iter(await pipe.execute())
        closed = unknown = 0
        wall = time.time()
        for conns in held.values():
            alive = next(results)
            recorded = [next(results) for _ in conns]
            if alive:
                continue
            for conn, has_record in zip(conns, recorded, strict=True):
                if not has_record:
                    unknown += 1
                elif not conn.closing:
                    expired = conn.expires_at <= wall
                    log.info(
                        "session check: session %s, closing",
                        "expired" if expired else "revoked",
                        extra={"connection_id": conn.id},
                    )
                    conn.close(
                        CloseCode.SESSION_INVALID,
                        "session expired" if expired else "session revoked",
                    )
                    closed += 1
        if unknown:
            log.warning(
                "session check: %d connections have neither a session nor a record in Redis "
                "(Redis lost its data?); left open",
                unknown,
            )
        return closed

    async def flush_liveness(self) -> int:
        """Write changed last-seen times and new channel use in one pipeline; close the
        sockets whose record is gone (1008 "stale"). Returns how many were closed.

        Only connections that showed life or used a channel since the last flush are in the
        batch, and a connection shows life only once its registration is done (the handler
        reads frames after it), so a missing record is never one still being written. A record
        gone while its session key exists was removed by someone else: the eviction worker
        took this instance for dead while it stalled past its TTL (``gateway_lost``), or
        evicted the connection. Such a socket has no registry record, so deliveries to it
        would answer 410 and the agent's replies would be lost: close it, so the client
        reconnects. The worker already announced the removal and told Traffic Cop; leaving
        unregisters a missing record, which announces nothing. A record gone together with its
        session means Redis lost its data: those sockets stay open (as in the session check).
        """
        seen: dict[str, float] = {}
        used: dict[str, list[str]] = {}
        full: dict[str, list[str]] = {}
        sessions: dict[str, str] = {}
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
            sessions[conn.id] = conn.session_id
            batch.append((conn, conn.last_seen_wall, list(conn.new_channels)))
        if not batch:
            return 0
        try:
            async with self.flush_lock:
                gone = await self.registry.touch(seen, used, full, sessions)
        except (RedisError, OSError) as exc:
            log.warning("liveness flush failed, retried next tick: %r", exc)
            return 0
        for conn, wall, new in batch:
            conn.flushed_wall = wall
            del conn.new_channels[: len(new)]
        closed = 0
        for cid in gone:
            stale = self.connections.get(cid)
            if stale is not None and not stale.closing:
                log.warning(
                    "registry record gone (this gateway was taken for dead?), closing",
                    extra={"connection_id": cid},
                )
                stale.close(CloseCode.POLICY_VIOLATION, "stale", evicted=True)
                closed += 1
        return closed

    # -- Traffic Cop unregisters that failed ----------------------------------------------------

    @property
    def unregisters_pending(self) -> int:
        return len(self._unregister_retries)

    def retry_unregister(self, connection_id: str) -> None:
        """Unregister ``connection_id`` from Traffic Cop later (it could not be done now)."""
        s = self.settings
        if s.unregister_retry_attempts == 0 or connection_id in self._unregister_retries:
            return
        if len(self._unregister_retries) >= s.unregister_retry_pending:
            given_up, _ = self._unregister_retries.popitem(last=False)
            log.warning(
                "too many unregisters waiting; giving up one (Traffic Cop's TTL cleans it)",
                extra={"connection_id": given_up},
            )
        due = time.monotonic() + s.unregister_retry_base_seconds
        self._unregister_retries[connection_id] = (0, due)
        self._retry_wakeup.set()

    async def _unregister_retry_loop(self) -> None:
        s = self.settings
        pending = self._unregister_retries
        while True:
            if not pending:
                self._retry_wakeup.clear()
                await self._retry_wakeup.wait()
                continue
            now = time.monotonic()
            due = [cid for cid, (_, at) in pending.items() if at <= now]
            if not due:
                wait = min(at for _, at in pending.values()) - now
                self._retry_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_wakeup.wait(), max(0.01, wait))
                continue
            # One call at a time: Traffic Cop is likely down, so no burst of timeouts.
            for cid in due:
                entry = pending.get(cid)
                if entry is None:
                    continue
                try:
                    await self.traffic_cop.unregister_connection(cid)
                except TrafficCopRejected as exc:
                    log.error(
                        "traffic cop refused an unregister: %s", exc, extra={"connection_id": cid}
                    )
                    pending.pop(cid, None)
                except TrafficCopError as exc:
                    attempts = entry[0] + 1
                    if attempts >= s.unregister_retry_attempts:
                        log.warning(
                            "traffic cop unregister failed %d times, giving up: %s",
                            attempts + 1,
                            exc,
                            extra={"connection_id": cid},
                        )
                        pending.pop(cid, None)
                    else:
                        delay = min(60.0, s.unregister_retry_base_seconds * 2.0**attempts)
                        pending[cid] = (attempts, time.monotonic() + delay)
                else:
                    log.info("traffic cop unregister retried", extra={"connection_id": cid})
                    pending.pop(cid, None)

    # -- shutdown ----------------------------------------------------------------------------

    async def close_all(self, code: int, reason: str, wait: float) -> None:
        conns = list(self.connections)
        for conn in conns:
            conn.close(code, reason)
        # Sockets still between accept and welcome: their handlers see ``ready`` is False and
        # stop, but close them now so the client learns why at once.
        strays = [ws for ws in self.sockets if ws not in self.connection_sockets and not ws.closed]
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
            "sockets": self.open_sockets,
            "frames_queued": sum(c.queued_frames for c in self.connections),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "messages_in": self.frames_in,
            "messages_out": Connection.frames_written,
            "pubsub_frames_forwarded": self.frames_out_pubsub,
            "published": self.publisher.published,
            "queued": self.publisher.queued,
            "refused": self.publisher.refused,
            "publisher_waiting": self.publisher.waiting,
            "unregisters_pending": self.unregisters_pending,
            "refused_tokens_cached": len(self.refused_tokens),
            "breaker": {"open": self.publisher.breaker_open, "buffered": self.publisher.buffered},
            "pubsub": {
                "connected": self.hub.connected,
                "channels": self.hub.channel_count,
                "reconnects": self.hub.reconnects,
            },
        }


async def _guarded(what: str, job: Callable[[], Awaitable[object]]) -> None:
    """Run one periodic job; a failure is logged and the loop goes on (never kills the tick)."""
    try:
        await job()
    except (RedisError, OSError) as exc:
        log.warning("%s failed, retried next time: %r", what, exc)
    except Exception:
        log.exception("%s failed", what)
