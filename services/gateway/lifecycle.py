"""The steps that open and end a connection: validate, register, welcome; and leave.

``/ws`` follows docs/architecture.md, "Life of a connection": the handler (already past the
503/403/capacity checks) calls :func:`admit`, which validates the token with Traffic Cop (4401
when invalid, 1013 when Traffic Cop cannot answer), subscribes the process's pub/sub connection
to the connection's channel, registers it, ties it to its session and queues the welcome; then
the handler reads frames; then :func:`leave` unregisters it exactly once.

Leaving always runs to its end. It is a task of its own (:func:`leave` shields it), so the
handler being cancelled (aiohttp cancels handlers at shutdown) or the close raising cannot stop
it half-way: the record, its indexes, the pub/sub subscription and the Traffic Cop tie are
undone, and ``disconnected``/``evicted`` is announced once, whatever ended the connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from services.gateway import metrics
from services.gateway.connection import Connection
from services.gateway.connection_protocol import ConnectionProtocol
from services.gateway.process import Gateway
from shared import redis_names as names
from shared.address_budget import refund
from shared.protocol import (
    CLOSE_REASON_SESSION_LIMIT,
    CloseCode,
    new_connection_id,
    welcome_frame,
)
from shared.pubsub import PubSubUnavailable
from shared.registry import ConnectionRecord
from shared.traffic_cop_client import TrafficCopError, TrafficCopRejected

__all__ = ["Admitted", "admit", "leave", "refuse"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Admitted:
    """A connection that passed validation, and what its leave must undo."""

    conn: Connection
    registered: bool = False  # subscribed and maybe recorded in Redis
    maybe_tied: bool = False  # maybe tied to its session in Traffic Cop


async def refuse(ws: web.WebSocketResponse, code: int, reason: str) -> web.WebSocketResponse:
    """Close an accepted socket that never became a connection."""
    metrics.CLOSES.labels(str(code)).inc()
    await ws.close(code=code, message=reason.encode())
    return ws


async def admit(
    gw: Gateway, request: web.Request, ws: web.WebSocketResponse, token: str | None
) -> Admitted | None:
    """Validate ``token`` and register the connection; None when the socket was refused (and
    closed). A returned connection may already be closing (registration failed): its leave
    undoes what was done."""
    s = gw.settings
    if not token:
        await refuse(ws, CloseCode.SESSION_INVALID, "missing session token")
        return None
    if gw.refused_tokens.refused(token, time.monotonic()):
        metrics.CONNECTIONS_REFUSED.labels("invalid_token_cached").inc()
        await refuse(ws, CloseCode.SESSION_INVALID, "invalid or expired session")
        return None
    try:
        session = await gw.traffic_cop.validate(token)
    except TrafficCopRejected as exc:
        log.error("traffic cop refused the gateway: %s", exc)
        await refuse(ws, CloseCode.INTERNAL_ERROR, "session check failed")
        return None
    except TrafficCopError as exc:
        log.warning("traffic cop unavailable: %s", exc)
        await refuse(ws, CloseCode.TRY_AGAIN_LATER, "session service unavailable")
        return None
    if session is None:
        gw.refused_tokens.add(token, time.monotonic())
        metrics.CONNECTIONS_REFUSED.labels("invalid_token").inc()
        await refuse(ws, CloseCode.SESSION_INVALID, "invalid or expired session")
        return None
    # Only upgrades with a bad token spend the address's unauthenticated budget: a valid one
    # gets its token back, so a crowd behind one NAT can reconnect at once after a crash.
    refund(request)
    if not gw.ready or ws.closed:  # the drain began while Traffic Cop answered
        await refuse(ws, CloseCode.GOING_AWAY, "server shutting down")
        return None
    # No await between this count and the table insert below: the bound is exact.
    if gw.connections.count_of_session(session.session_id) >= s.max_connections_per_session:
        metrics.CONNECTIONS_REFUSED.labels("session_limit").inc()
        await refuse(ws, CloseCode.RATE_LIMITED, CLOSE_REASON_SESSION_LIMIT)
        return None

    cid = new_connection_id(session.user_id)
    protocol = ConnectionProtocol(
        cid,
        session.user_id,
        session.session_id,
        instance=gw.instance,
        channels=gw.channels,
        limits=gw.limits,
        now=time.monotonic(),
        wall=time.time(),
        expires_at=session.expires_at,
        stats=metrics.PROTOCOL_STATS,
    )
    conn = Connection(
        ws, protocol, gw, close_timeout=s.close_timeout, flush_timeout=s.close_flush_seconds
    )
    gw.connection_sockets.add(ws)
    # First in the queue, so it is the first frame even if a delivery races the registration.
    welcome = welcome_frame(cid, session.user_id, s.channels, s.heartbeat_interval)
    protocol.deliver(welcome, len(welcome))
    gw.connections.add(conn)
    admitted = Admitted(conn)
    # Each flag is set BEFORE its call: a call that fails (a timeout, say) may still have
    # written, so leaving undoes whatever may have been done.
    try:
        admitted.registered = True
        await gw.hub.subscribe(names.connection_messages(cid), functools.partial(gw.deliver, conn))
        conn.record = ConnectionRecord(
            cid,
            session.user_id,
            session.session_id,
            gw.instance,
            time.time(),
            metadata=_record_metadata(session.metadata, s.record_metadata_bytes),
        )
        async with gw.redis_slots:
            await gw.registry.register(conn.record)
        admitted.maybe_tied = True
        tied = await gw.traffic_cop.register_connection(
            cid, session.session_id, session.user_id, gw.instance
        )
        if not tied:
            admitted.maybe_tied = False  # Traffic Cop answered: it wrote nothing
            protocol.session_revoked()
        elif not gw.ready:
            protocol.going_away()
    except (PubSubUnavailable, RedisError, OSError) as exc:
        log.warning("registration failed: %r", exc, extra={"connection_id": cid})
        protocol.decide_close(CloseCode.TRY_AGAIN_LATER, "gateway unavailable")
    except TrafficCopRejected as exc:
        log.error("traffic cop refused the registration: %s", exc, extra={"connection_id": cid})
        protocol.decide_close(CloseCode.INTERNAL_ERROR, "session check failed")
    except TrafficCopError as exc:
        log.warning("traffic cop unavailable: %s", exc, extra={"connection_id": cid})
        protocol.decide_close(CloseCode.TRY_AGAIN_LATER, "session service unavailable")
    if not protocol.closing:
        # A connection refused while registering gets its close code, not a welcome first.
        conn.start_writer()
        metrics.CONNECTIONS_TOTAL.inc()
        log.info("connected", extra={"connection_id": cid})
    conn.apply()
    return admitted


def _record_metadata(metadata: dict[str, Any], limit: int) -> dict[str, Any]:
    """The session's metadata for the registry record, unless its JSON passes ``limit`` bytes."""
    try:
        size = len(orjson.dumps(metadata))
    except TypeError:
        return {"truncated": True}
    return metadata if size <= limit else {"truncated": True}


async def leave(gw: Gateway, admitted: Admitted) -> None:
    """Unregister exactly once, whatever ended the connection. Never raises; runs to its end
    even when the caller is cancelled (the caller then still waits for it, bounded by the
    close timeouts)."""
    task = asyncio.create_task(_leave(gw, admitted), name=f"ws-leave-{admitted.conn.id}")
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # The handler is being cancelled: the leave goes on by itself; wait for it all the
        # same, so that shutdown does not outrun the unregister.
        await asyncio.wait([task])
        raise


async def _leave(gw: Gateway, admitted: Admitted) -> None:
    conn = admitted.conn
    gw.connections.remove(conn)
    try:
        await conn.finish()
    except Exception:
        log.exception("closing failed", extra={"connection_id": conn.id})
    await gw.hub.unsubscribe(names.connection_messages(conn.id))
    decision = conn.protocol.close
    # What the gateway sent, when it closed; else what the client's Close frame said.
    code: int | None
    if decision is not None and decision.reason:
        code, reason = decision.code, decision.reason
    elif decision is not None and decision.code != CloseCode.NORMAL:
        code, reason = decision.code, f"closed by the gateway ({decision.code})"
    else:
        code = conn.ws.close_code
        reason = f"closed by client ({code})"
    if admitted.registered:
        event = "evicted" if decision is not None and decision.evicted else "disconnected"
        try:
            async with gw.redis_slots:
                await gw.registry.unregister(conn.id, event=event, reason=reason)
        except (RedisError, OSError) as exc:
            # The record's TTL and the eviction worker clean up what this could not.
            log.warning("unregister failed: %r", exc, extra={"connection_id": conn.id})
    if admitted.maybe_tied:
        try:
            await gw.traffic_cop.unregister_connection(conn.id)
        except TrafficCopRejected as exc:
            log.error(
                "traffic cop refused the unregister: %s", exc, extra={"connection_id": conn.id}
            )
        except TrafficCopError as exc:
            log.warning(
                "traffic cop unregister failed, retried later: %s",
                exc,
                extra={"connection_id": conn.id},
            )
            gw.unregister_retries.add(conn.id)
    log.info("disconnected (%s %s)", code, reason, extra={"connection_id": conn.id})
