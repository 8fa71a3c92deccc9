"""The gateway's HTTP and WebSocket handlers.

``/ws`` follows docs/architecture.md, "Life of a connection": refuse before the socket opens
when not ready (503) or from a foreign origin (403); accept, then validate the token with
Traffic Cop (4401 when invalid, 1013 when Traffic Cop cannot answer); subscribe the process's
pub/sub connection to the connection's channel, register it, tie it to its session, welcome it;
then read frames until it leaves, and unregister it exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from services.gateway import metrics
from services.gateway.connection import Connection, TokenBucket
from services.gateway.core import Gateway
from services.gateway.keys import GATEWAY, ORIGINS
from services.gateway.publisher import Item
from shared import redis_names as names
from shared.http import json_error, json_response
from shared.protocol import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    ack_frame,
    agent_message,
    error_frame,
    new_connection_id,
    new_message_id,
    validate_client_object,
    welcome_frame,
)
from shared.pubsub import PubSubUnavailable
from shared.registry import ConnectionRecord, PublishResult
from shared.service import SERVICE
from shared.tracing import message_traceparent
from shared.traffic_cop_client import TrafficCopError, TrafficCopRejected

__all__ = ["health_detailed", "health_summary", "index", "legacy", "websocket"]

log = logging.getLogger(__name__)

#: A rate-limited frame longer than this is not parsed to echo its ``id`` (the error has null).
RATE_LIMITED_PARSE_BYTES = 1024


def _token(request: web.Request) -> str | None:
    token = request.query.get("session_token")
    if token:
        return token
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def _refuse(ws: web.WebSocketResponse, code: int, reason: str) -> web.WebSocketResponse:
    """Close an accepted socket that never became a connection."""
    metrics.CLOSES.labels(str(code)).inc()
    await ws.close(code=code, message=reason.encode())
    return ws


async def websocket(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    s = gw.settings
    if not gw.ready or not gw.hub.connected:
        metrics.UPGRADES_REFUSED.labels("not_ready").inc()
        return json_error(
            503,
            ErrorCode.UNAVAILABLE,
            "the gateway is not ready; retry shortly",
            {"Retry-After": "1"},
        )
    origin = request.headers.get("Origin")
    if not request.app[ORIGINS].allows(origin, request.headers.get("Host")):
        metrics.UPGRADES_REFUSED.labels("origin").inc()
        return json_error(
            403, ErrorCode.FORBIDDEN, f"origin {(origin or '')[:100]!r} may not open /ws"
        )
    # No aiohttp ``heartbeat=``: it drops a socket (1006, no close frame) half an interval after
    # one unanswered ping, which would pre-empt the idle contract (1008 "idle" and an
    # ``evicted`` event after MAX_IDLE_SECONDS). The gateway's own tick sends a protocol ping
    # with every app ping, through each connection's writer, and MAX_IDLE decides.
    ws = web.WebSocketResponse(
        autoping=False,  # protocol pongs are liveness: the loop sees them
        max_msg_size=s.max_frame_bytes,
        compress=s.compress,
        timeout=s.close_timeout,
    )
    await ws.prepare(request)
    gw.sockets.add(ws)
    gw.open_sockets += 1
    try:
        if gw.open_sockets > s.max_connections:
            # Accepted and closed rather than answered 503: a browser can read a close code,
            # not the status of a refused upgrade. Nothing is spent on Traffic Cop.
            metrics.CONNECTIONS_REFUSED.labels("overloaded").inc()
            return await _refuse(ws, CloseCode.TRY_AGAIN_LATER, "overloaded")
        return await _serve(gw, ws, _token(request))
    except Exception:
        # After the upgrade an HTTP error body is no answer (the error middleware would write
        # one onto the WebSocket stream and the client would see a protocol error): a bug
        # here closes the socket with 1011, which the client can read.
        log.exception("unexpected error on /ws")
        if not ws.closed:
            with contextlib.suppress(Exception):
                await _refuse(ws, CloseCode.INTERNAL_ERROR, "internal error")
        return ws
    finally:
        gw.open_sockets -= 1


async def _serve(
    gw: Gateway, ws: web.WebSocketResponse, token: str | None
) -> web.WebSocketResponse:
    s = gw.settings
    if not token:
        return await _refuse(ws, CloseCode.SESSION_INVALID, "missing session token")
    if gw.refused_tokens.refused(token, time.monotonic()):
        metrics.CONNECTIONS_REFUSED.labels("invalid_token_cached").inc()
        return await _refuse(ws, CloseCode.SESSION_INVALID, "invalid or expired session")
    try:
        session = await gw.traffic_cop.validate(token)
    except TrafficCopRejected as exc:
        log.error("traffic cop refused the gateway: %s", exc)
        return await _refuse(ws, CloseCode.INTERNAL_ERROR, "session check failed")
    except TrafficCopError as exc:
        log.warning("traffic cop unavailable: %s", exc)
        return await _refuse(ws, CloseCode.TRY_AGAIN_LATER, "session service unavailable")
    if session is None:
        gw.refused_tokens.add(token, time.monotonic())
        metrics.CONNECTIONS_REFUSED.labels("invalid_token").inc()
        return await _refuse(ws, CloseCode.SESSION_INVALID, "invalid or expired session")
    if not gw.ready or ws.closed:  # the drain began while Traffic Cop answered
        return await _refuse(ws, CloseCode.GOING_AWAY, "server shutting down")
    # No await between this count and the table insert below: the bound is exact.
    if gw.connections.count_of_session(session.session_id) >= s.max_connections_per_session:
        metrics.CONNECTIONS_REFUSED.labels("session_limit").inc()
        return await _refuse(ws, CloseCode.RATE_LIMITED, "too many connections for this session")

    cid = new_connection_id(session.user_id)
    conn = Connection(
        ws,
        cid,
        session.user_id,
        session.session_id,
        queue_frames=s.send_queue_frames,
        queue_bytes=s.send_queue_bytes,
        bucket=TokenBucket(s.rate_limit_per_second, s.rate_limit_burst),
        pong_bucket=TokenBucket(s.pong_rate_per_second, s.pong_burst),
        close_timeout=s.close_timeout,
        flush_timeout=s.close_flush_seconds,
        expires_at=session.expires_at,
    )
    gw.connection_sockets.add(ws)
    # First in the queue, so it is the first frame even if a delivery races the registration.
    conn.send(welcome_frame(cid, session.user_id, s.channels, s.heartbeat_interval))
    gw.connections.add(conn)
    # Each flag is set BEFORE its call: a call that fails (a timeout, say) may still have
    # written, so leaving undoes whatever may have been done.
    registered = maybe_tied = False
    try:
        try:
            await gw.hub.subscribe(
                names.connection_messages(cid), functools.partial(gw.deliver, conn)
            )
            registered = True
            async with gw.redis_slots:
                await gw.registry.register(
                    ConnectionRecord(
                        cid,
                        session.user_id,
                        session.session_id,
                        gw.instance,
                        time.time(),
                        metadata=_record_metadata(session.metadata, s.record_metadata_bytes),
                    )
                )
            maybe_tied = True
            tied = await gw.traffic_cop.register_connection(
                cid, session.session_id, session.user_id, gw.instance
            )
            if not tied:
                maybe_tied = False  # Traffic Cop answered: it wrote nothing
                conn.close(CloseCode.SESSION_INVALID, "session revoked")
            elif not gw.ready:
                conn.close(CloseCode.GOING_AWAY, "server shutting down")
        except (PubSubUnavailable, RedisError, OSError) as exc:
            log.warning("registration failed: %r", exc, extra={"connection_id": cid})
            conn.close(CloseCode.TRY_AGAIN_LATER, "gateway unavailable")
        except TrafficCopRejected as exc:
            log.error("traffic cop refused the registration: %s", exc, extra={"connection_id": cid})
            conn.close(CloseCode.INTERNAL_ERROR, "session check failed")
        except TrafficCopError as exc:
            log.warning("traffic cop unavailable: %s", exc, extra={"connection_id": cid})
            conn.close(CloseCode.TRY_AGAIN_LATER, "session service unavailable")
        if not conn.closing:
            conn.start_writer()
            metrics.CONNECTIONS_TOTAL.inc()
            log.info("connected", extra={"connection_id": cid})
            await _read(gw, conn)
    except Exception:
        # A bug while serving: the client learns it from 1011 (the leave below would otherwise
        # close normally), and the process goes on serving every other socket.
        log.exception("unexpected error", extra={"connection_id": cid})
        conn.close(CloseCode.INTERNAL_ERROR, "internal error")
    finally:
        await _leave(gw, conn, registered=registered, maybe_tied=maybe_tied)
    return ws


def _record_metadata(metadata: dict[str, Any], limit: int) -> dict[str, Any]:
    """The session's metadata for the registry record, unless its JSON passes ``limit`` bytes."""
    try:
        size = len(orjson.dumps(metadata))
    except TypeError:
        return {"truncated": True}
    return metadata if size <= limit else {"truncated": True}


async def _read(gw: Gateway, conn: Connection) -> None:
    ws = conn.ws
    async for msg in ws:
        if conn.closing:
            break  # frames after the gateway decided to close are not taken (nor answered)
        conn.seen()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            _on_text(gw, conn, msg.data)
        elif kind is WSMsgType.BINARY:
            if _take(gw, conn):
                _error(
                    conn,
                    None,
                    ErrorCode.INVALID_ENVELOPE,
                    "binary frames are not accepted; send JSON text",
                )
            else:
                _limited(gw, conn, None)
        elif kind is WSMsgType.PING:
            await ws.pong(msg.data)
        elif kind is WSMsgType.ERROR:
            # aiohttp already closed the socket (1009 for an oversized frame).
            code = ws.close_code or CloseCode.INTERNAL_ERROR
            metrics.CLOSES.labels(str(code)).inc()
            conn.close_code = code
            conn.close_reason = "frame too large" if code == CloseCode.MESSAGE_TOO_BIG else "error"
            log.info(
                "socket error %r, closed with %s", msg.data, code, extra={"connection_id": conn.id}
            )
            break
        if conn.closing:
            break


def _error(conn: Connection, client_id: Any, code: ErrorCode, message: str) -> None:
    metrics.ERRORS.labels(str(code)).inc()
    conn.answer_now(error_frame(client_id, code, message))


def _take(gw: Gateway, conn: Connection) -> bool:
    """Count a client frame and take a rate-limit token for it; False when there is none."""
    gw.frames_in += 1
    metrics.FRAMES_IN.inc()
    if conn.bucket.take(time.monotonic()):
        conn.limited_in_a_row = 0
        return True
    return False


def _limited(gw: Gateway, conn: Connection, data: str | None) -> None:
    """A frame over the rate limit: answered ``rate_limited`` (a pong: not answered), or the
    socket closed with 4429 once too many came in a row.

    Only a frame of at most ``RATE_LIMITED_PARSE_BYTES`` is parsed to echo its ``id``: a client
    over its limit must not make the gateway parse 64 KiB frames; a longer one gets ``id`` null.
    """
    conn.limited_in_a_row += 1
    if conn.limited_in_a_row >= gw.settings.rate_limit_close_after:
        log.info("rate limit exceeded repeatedly, closing", extra={"connection_id": conn.id})
        conn.close(CloseCode.RATE_LIMITED, "rate limit exceeded")
        return
    client_id: Any = None
    if data is not None and len(data) <= RATE_LIMITED_PARSE_BYTES:
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            raw = None
        if isinstance(raw, dict):
            if raw.get("type") == "pong":
                return
            value = raw.get("id")
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                client_id = value
    _error(conn, client_id, ErrorCode.RATE_LIMITED, "too many messages; slow down")


def _on_text(gw: Gateway, conn: Connection, data: str) -> None:
    if not _take(gw, conn):
        _limited(gw, conn, data)
        return
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        _error(conn, None, ErrorCode.INVALID_JSON, f"not valid JSON: {exc.msg}")
        return
    if isinstance(raw, dict) and raw.get("type") == "pong":
        # Any object with "type": "pong" is the app pong: liveness only, never answered.
        # Within the pong allowance it is free (the token goes back); past it, it costs a
        # message token like any frame, so pongs cannot buy unbounded parsing.
        conn.pongs += 1
        metrics.PONGS.inc()
        if conn.pong_bucket.take(time.monotonic()):
            conn.bucket.give_back()
        return
    try:
        envelope = validate_client_object(raw, gw.channels)
    except ProtocolError as exc:
        _error(conn, exc.client_id, exc.code, exc.message)
        return
    conn.messages_in += 1
    message_id = new_message_id()
    gw.connections.use_channel(conn, envelope.channel)
    metadata = envelope.payload.get("metadata")
    parent = metadata.get("traceparent") if isinstance(metadata, dict) else None
    body = agent_message(
        envelope,
        message_id=message_id,
        connection_id=conn.id,
        user_id=conn.user_id,
        gateway_instance=gw.instance,
        traceparent=message_traceparent(
            parent if isinstance(parent, str) else None,
            channel=envelope.channel,
            message_id=message_id,
        ),
    ).to_bytes()
    client_id = envelope.id
    place = conn.reserve()  # the answer goes out in the order the message came in

    def unavailable(why: str) -> None:
        metrics.ERRORS.labels(str(ErrorCode.UNAVAILABLE)).inc()
        conn.answer(place, error_frame(client_id, ErrorCode.UNAVAILABLE, why))

    def done(result: int) -> None:
        if result == PublishResult.PUBLISHED:
            metrics.ACKS.labels("published").inc()
            conn.answer(place, ack_frame(client_id, message_id, "published"))
        elif result == PublishResult.QUEUED:
            metrics.ACKS.labels("queued").inc()
            conn.answer(place, ack_frame(client_id, message_id, "queued"))
        else:
            unavailable("the message could not be taken; retry later")

    if not gw.publisher.submit(Item(envelope.channel, body, done)):
        unavailable(
            "the gateway is shutting down; retry on another connection"
            if not gw.ready
            else "the gateway is overloaded; retry later"
        )


async def _leave(gw: Gateway, conn: Connection, *, registered: bool, maybe_tied: bool) -> None:
    """Unregister exactly once, whatever ended the connection. Never raises."""
    gw.connections.remove(conn)
    await conn.wait_closed()
    await gw.hub.unsubscribe(names.connection_messages(conn.id))
    # What the gateway sent, when it closed; else what the client's Close frame said.
    code = conn.close_code if conn.close_code is not None else conn.ws.close_code
    if conn.close_code is not None:
        reason = conn.close_reason or f"closed by the gateway ({conn.close_code})"
    else:
        reason = f"closed by client ({conn.ws.close_code})"
    if registered:
        # Out of the table already, so no later flush includes it; wait out one in flight.
        async with gw.flush_lock:
            pass
        event = "evicted" if conn.evicted else "disconnected"
        try:
            async with gw.redis_slots:
                await gw.registry.unregister(conn.id, event=event, reason=reason)
        except (RedisError, OSError) as exc:
            # The record's TTL and the eviction worker clean up what this could not.
            log.warning("unregister failed: %r", exc, extra={"connection_id": conn.id})
    if maybe_tied:
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
            gw.retry_unregister(conn.id)
    log.info("disconnected (%s %s)", code, reason, extra={"connection_id": conn.id})


# -- HTTP -------------------------------------------------------------------------------------


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    return {"ws_path": "/ws"}


async def legacy(request: web.Request) -> web.Response:
    return json_error(404, ErrorCode.NOT_FOUND, "this endpoint is gone; open a WebSocket on /ws")


async def health_summary(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return json_response(
        {
            "status": "ok" if gw.ready else "starting_or_draining",
            "service": "websocket-gateway",
            "instance": gw.instance,
            "connections": len(gw.connections),
        }
    )


async def health_detailed(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    state = request.app[SERVICE]
    failing = await state.failing()
    dependencies = {name: failing.get(name, "ok") for name in state.checks}
    healthy = gw.ready and not failing
    return json_response(
        {
            "status": "healthy" if healthy else "degraded",
            "service": "websocket-gateway",
            "ready": gw.ready,
            "dependencies": dependencies,
            **gw.snapshot(),
        },
        200 if healthy else 503,
    )
