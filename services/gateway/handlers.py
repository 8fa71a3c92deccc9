"""The gateway's HTTP and WebSocket handlers: thin, by design.

``/ws`` refuses before the socket opens when not ready (503) or from a foreign origin (403),
accepts, then hands the socket to :func:`services.gateway.lifecycle.admit` (validation and
registration). Then it is a loop that reads a frame, feeds it to the connection's protocol
(:mod:`services.gateway.connection_protocol`, which decides everything) and applies what the
protocol decided; and finally :func:`services.gateway.lifecycle.leave`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import aiohttp_jinja2
from aiohttp import WSMsgType, web

from services.gateway import metrics
from services.gateway.connection import Connection
from services.gateway.keys import GATEWAY, ORIGINS
from services.gateway.lifecycle import admit, leave, refuse
from services.gateway.process import Gateway
from shared.http import bearer_token, json_error, json_response
from shared.protocol import CloseCode, ErrorCode
from shared.service import SERVICE
from shared.service_names import GATEWAY_SERVICE

__all__ = ["health_detailed", "health_summary", "index", "legacy", "websocket"]

log = logging.getLogger(__name__)


def _token(request: web.Request) -> str | None:
    """The session token: the ``session_token`` query parameter (what a browser can send),
    else ``Authorization: Bearer``."""
    return request.query.get("session_token") or bearer_token(request.headers.get("Authorization"))


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
        # aiohttp refuses a frame of exactly max_msg_size bytes (its check is >=): +1 lets a
        # frame of GATEWAY_MAX_FRAME_BYTES through, as documented, and closes 1009 past it.
        max_msg_size=s.max_frame_bytes + 1,
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
            return await refuse(ws, CloseCode.TRY_AGAIN_LATER, "overloaded")
        return await _serve(gw, request, ws, _token(request))
    except Exception:
        # After the upgrade an HTTP error body is no answer (the error middleware would write
        # one onto the WebSocket stream and the client would see a protocol error): a bug
        # here closes the socket with 1011, which the client can read.
        log.exception("unexpected error on /ws")
        if not ws.closed:
            with contextlib.suppress(Exception):
                await refuse(ws, CloseCode.INTERNAL_ERROR, "internal error")
        return ws
    finally:
        gw.open_sockets -= 1


async def _serve(
    gw: Gateway, request: web.Request, ws: web.WebSocketResponse, token: str | None
) -> web.WebSocketResponse:
    admitted = await admit(gw, request, ws, token)
    if admitted is None:
        return ws
    conn = admitted.conn
    try:
        if not conn.closing:
            await _read(gw, conn)
    except Exception:
        # A bug while serving: the client learns it from 1011 (the leave below would otherwise
        # close normally), and the process goes on serving every other socket.
        log.exception("unexpected error", extra={"connection_id": conn.id})
        conn.protocol.internal_error()
        conn.apply()
    finally:
        await leave(gw, admitted)
    return ws


async def _read(gw: Gateway, conn: Connection) -> None:
    """Read, feed, apply: until the socket ends or the protocol decided to close."""
    ws, proto, table = conn.ws, conn.protocol, gw.connections
    clock, wall, stats = time.monotonic, time.time, proto.stats
    async for msg in ws:
        stats.frames_in += 1  # a plain counter: /metrics reads it when scraped
        kind = msg.type
        if kind is WSMsgType.TEXT:
            known = len(proto.channels)
            proto.receive_text(msg.data, clock(), wall())
            if len(proto.channels) > known:
                table.index_channels(conn, proto.channels[known:])
        elif kind is WSMsgType.BINARY:
            proto.receive_binary(clock(), wall())
        elif kind is WSMsgType.PING:
            proto.receive_ping(msg.data, clock(), wall())
        elif kind is WSMsgType.PONG:
            proto.receive_pong(clock(), wall())
        elif kind is WSMsgType.ERROR:
            # aiohttp already closed the socket (1009 for an oversized frame).
            proto.socket_error(ws.close_code)
            log.info(
                "socket error %r, closed with %s",
                msg.data,
                ws.close_code,
                extra={"connection_id": conn.id},
            )
        conn.apply()
        if proto.closing:
            break  # frames after the close decision are not taken (nor answered)


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
            "service": GATEWAY_SERVICE.name,
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
            "service": GATEWAY_SERVICE.name,
            "ready": gw.ready,
            "dependencies": dependencies,
            **gw.snapshot(),
        },
        200 if healthy else 503,
    )
