"""The gateway's periodic work, each job in its own loop (a slow Redis in one never delays
another). What a job finds about a connection is fed to that connection's protocol as an
event; the protocol decides.

* the heartbeat: every ``HEARTBEAT_INTERVAL`` an app ping and a protocol ping to every
  connection, and at least every second each connection's :meth:`tick` (the local idle check,
  ``MAX_IDLE_SECONDS``: 1008 "idle", evicted; the session's end: 4401 "session expired");
* the liveness flush: changed last-seen times and newly used channels, one pipeline every
  ``LIVENESS_FLUSH_SECONDS``; a socket whose record is gone while its session lives (this
  instance was taken for dead while it stalled) is told it is stale (1008 "stale");
* the session check: after every pub/sub (re)subscription (a revocation published while the
  pub/sub connection was down is lost) and every ``SESSION_CHECK_SECONDS``, one pipeline of
  ``EXISTS session:id:<session_id>`` for every session held; a missing session closes its
  sockets (4401 "session revoked", "session expired", or "session lost" when Redis lost its
  data);
* Traffic Cop unregisters that failed, retried (:mod:`services.gateway.unregister_retries`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from services.gateway.connection import Connection
from services.gateway.process import Gateway
from shared import redis_names as names
from shared.protocol import ping_frame

__all__ = ["check_sessions", "flush_liveness", "reassert_after_data_loss", "run_upkeep"]

log = logging.getLogger(__name__)


async def run_upkeep(gw: Gateway) -> None:
    """Every periodic job, each in its own loop; one that dies ends them all (supervised)."""
    async with asyncio.TaskGroup() as group:
        group.create_task(_heartbeat_loop(gw), name="gateway-heartbeat")
        group.create_task(_flush_loop(gw), name="gateway-liveness-flush")
        group.create_task(_session_check_loop(gw), name="gateway-session-check")
        group.create_task(gw.unregister_retries.run(), name="gateway-unregister-retry")


def tick_all(gw: Gateway, now: float, wall: float) -> None:
    for conn in gw.connections:
        proto = conn.protocol
        if proto.closing:
            continue
        proto.tick(now, wall)
        if proto.closing:
            conn.apply()  # logs the decision


async def _heartbeat_loop(gw: Gateway) -> None:
    s = gw.settings
    interval = min(s.heartbeat_interval, s.max_idle_seconds / 4, 1.0)
    next_ping = time.monotonic() + s.heartbeat_interval
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        tick_all(gw, now, time.time())
        if now >= next_ping:
            next_ping = now + s.heartbeat_interval
            frame = ping_frame()
            for conn in gw.connections:
                conn.protocol.heartbeat(frame)
                conn.apply()


async def _flush_loop(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(gw.settings.liveness_flush_seconds)
        await _guarded("liveness flush", lambda: flush_liveness(gw))


async def _session_check_loop(gw: Gateway) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gw.check_sessions_now.wait(), gw.settings.session_check_seconds)
        gw.check_sessions_now.clear()
        await _guarded("session check", lambda: check_sessions(gw))


async def reassert_after_data_loss(gw: Gateway) -> tuple[int, int]:
    """Redis lost its data (``shared.epoch`` saw the epoch key vanish or change): make every
    socket reachable again or close it, never leave it open and unreachable.

    The instance key comes back first (the worker must see this gateway alive). Then the session
    check closes the sockets whose session vanished (4401 "session lost"), and the records and
    indexes of the others are written again from memory, in batches bounded by the gateway's
    Redis slots. Returns (closed, re-registered)."""
    await gw.refresh_instance()
    closed, unrecorded = await _check_sessions(gw)

    async def register(conn: Connection) -> None:
        if conn.record is None:
            return
        # The channels used so far go back with it, so broadcasts' counts stay right.
        record = dataclasses.replace(conn.record, channels=tuple(conn.protocol.channels))
        async with gw.redis_slots:
            await gw.registry.register(record)

    survivors = [c for c in unrecorded if not c.closing and c.record is not None]
    await asyncio.gather(*(register(conn) for conn in survivors))
    log.warning(
        "redis lost its data: %d sockets closed (session lost), %d connections re-registered",
        closed,
        len(survivors),
    )
    return closed, len(survivors)


async def check_sessions(gw: Gateway) -> int:
    """Close the sockets of sessions Traffic Cop no longer holds; how many were closed
    (see :func:`_check_sessions`)."""
    closed, _ = await _check_sessions(gw)
    return closed


async def _check_sessions(gw: Gateway) -> tuple[int, list[Connection]]:
    """Close the sockets of sessions Traffic Cop no longer holds: (how many were closed, the
    open connections whose session lives but whose record is gone).

    One pipeline: ``EXISTS session:id:<sid>`` per session held (Traffic Cop keeps that key for
    exactly the life of a session, and deletes it on revocation) and ``EXISTS`` of each of those
    connections' records. A missing session closes its sockets with 4401: "session revoked" or
    "session expired" while the connection's record exists, "session lost" when the record is
    gone too — Redis lost its data (a restart without persistence, a failover to a replica that
    missed the writes). Such a socket would otherwise stay open and unreachable (deliveries
    answer 410), and the session cannot be trusted again: a revocation written since the last
    persistence point is lost with it, so keeping the session would undo it. The client signs in
    again (4401) and reconnects. This runs after every pub/sub resubscription — a restarted Redis
    drops the pub/sub connection — so the loss is noticed within seconds.
    """
    held = {sid: gw.connections.of_session(sid) for sid in gw.connections.session_ids()}
    held = {sid: conns for sid, conns in held.items() if conns}
    if not held:
        return 0, []
    gw.session_checks += 1
    async with gw.redis.pipeline(transaction=False) as pipe:
        for sid, conns in held.items():
            pipe.exists(names.session_by_id(sid))
            for conn in conns:
                pipe.exists(names.connection(conn.id))
        results = iter(await pipe.execute())
    closed = lost = 0
    unrecorded: list[Connection] = []
    wall = time.time()
    for conns in held.values():
        alive = next(results)
        recorded = [next(results) for _ in conns]
        if alive:
            unrecorded += [c for c, has in zip(conns, recorded, strict=True) if not has]
            continue
        for conn, has_record in zip(conns, recorded, strict=True):
            proto = conn.protocol
            if proto.closing:
                continue
            if not has_record:
                lost += 1
                proto.session_lost()
            else:
                expired = proto.expires_at <= wall
                log.info(
                    "session check: session %s, closing",
                    "expired" if expired else "revoked",
                    extra={"connection_id": conn.id},
                )
                if expired:
                    proto.session_expired()
                else:
                    proto.session_revoked()
            conn.apply()
            closed += 1
    if lost:
        log.warning(
            "session check: %d connections have neither a session nor a record in Redis "
            "(Redis lost its data?); closed 4401 'session lost' so their clients sign in again",
            lost,
        )
    return closed, unrecorded


async def flush_liveness(gw: Gateway) -> int:
    """Write changed last-seen times and new channel use in one pipeline; tell the sockets
    whose record is gone that they are stale (1008). Returns how many were closed.

    Only connections that showed life or used a channel since the last flush are in the batch,
    and a connection shows life only once its registration is done (the handler reads frames
    after it), so a missing record is never one still being written. A record gone while its
    session key exists was removed by someone else: the eviction worker took this instance for
    dead while it stalled past its TTL (``gateway_lost``), or evicted the connection. Such a
    socket has no registry record, so deliveries to it would answer 410 and the agent's replies
    would be lost: close it, so the client reconnects. The worker already announced the removal
    and told Traffic Cop; leaving unregisters a missing record, which announces nothing. A record
    gone together with its session means Redis lost its data: the session check closes those
    (4401 "session lost").

    The touch script writes only records that exist, so a flush racing a connection's leave
    cannot bring its record back: no lock is needed between the two.
    """
    seen: dict[str, float] = {}
    used: dict[str, list[str]] = {}
    full: dict[str, list[str]] = {}
    sessions: dict[str, str] = {}
    batch: list[tuple[Connection, float, int]] = []
    for conn in gw.connections:
        proto = conn.protocol
        changed = proto.last_seen_wall != proto.flushed_wall
        if not changed and not proto.new_channels:
            continue
        if changed:
            seen[conn.id] = proto.last_seen_wall
        if proto.new_channels:
            used[conn.id] = list(proto.new_channels)
            full[conn.id] = list(proto.channels)
        sessions[conn.id] = conn.session_id
        batch.append((conn, proto.last_seen_wall, len(proto.new_channels)))
    if not batch:
        return 0
    try:
        gone = await gw.registry.touch(seen, used, full, sessions)
    except (RedisError, OSError) as exc:
        log.warning("liveness flush failed, retried next tick: %r", exc)
        return 0
    for conn, wall, new in batch:
        conn.protocol.flushed_wall = wall
        del conn.protocol.new_channels[:new]
    closed = 0
    for cid in gone:
        stale = gw.connections.get(cid)
        if stale is not None and not stale.closing:
            log.warning(
                "registry record gone (this gateway was taken for dead?), closing",
                extra={"connection_id": cid},
            )
            stale.protocol.stale()
            stale.apply()
            closed += 1
    return closed


async def _guarded(what: str, job: Callable[[], Awaitable[object]]) -> None:
    """Run one periodic job; a failure is logged and the loop goes on (never kills the tick)."""
    try:
        await job()
    except (RedisError, OSError) as exc:
        log.warning("%s failed, retried next time: %r", what, exc)
    except Exception:
        log.exception("%s failed", what)
