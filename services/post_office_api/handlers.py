"""HTTP handlers of the Post Office API, and its realm and metrics middlewares.

Every refusal is a JSON error ``{"error": {"code", "message"}}`` (docs/api.md lists them):

* 400 ``bad_request`` / ``invalid_json``: a malformed id, query parameter or body;
* 401 ``unauthorized``: no ``Authorization: Bearer`` realm key, or an unknown one;
* 403 ``forbidden``: the realm lacks the capability, which the message names;
* 404 ``not_found`` / ``unknown_channel``: an unknown connection, or a channel that is not
  configured;
* 410 ``gone``: the connection no longer exists on any gateway;
* 429 ``rate_limited``: the realm is over ``RATE_LIMIT_PER_SECOND`` (with ``Retry-After``);
* 413 ``too_large``: the body is larger than ``MAX_BODY_BYTES`` (aiohttp refuses it while
  reading; the skeleton's error middleware words it);
* 503 ``unavailable``: Redis is down (skeleton), a channel's stream is at STREAM_MAX_PENDING,
  no gateway is known, or the SSE hub cannot subscribe.

Realm keys and session tokens never reach a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from services.post_office_api import metrics
from services.post_office_api.auth import PUBLIC_ROUTES, missing_capability
from services.post_office_api.consumers import ack_in_reply, check_reply_ack
from services.post_office_api.delivery import CloseOutcome
from services.post_office_api.endpoint import message_format
from services.post_office_api.hub import HubFull, Subscriber
from services.post_office_api.keys import (
    DELIVERIES,
    ENDPOINTS,
    HUB,
    OPENAPI,
    RATE_LIMITER,
    REALM,
    REALM_KEYS,
    REGISTRY,
    SETTINGS,
)
from services.post_office_api.params import UNKNOWN_CHANNEL_STATUS, channel_param, fail
from shared import redis_names as names
from shared.discovery import DiscoveryError
from shared.http import bearer_token, error_middleware, json_response
from shared.protocol import (
    MAX_CLOSE_REASON_BYTES,
    ErrorCode,
    ProtocolError,
    close_reason_fits,
    is_agent_close_code,
    is_valid_connection_id,
    is_valid_user_id,
    parse_delivery_body,
    parse_reply_body,
)
from shared.pubsub import PubSubUnavailable
from shared.registry import SendResult
from shared.tracing import message_traceparent

__all__ = [
    "MAX_SESSION_TOKEN_LENGTH",
    "UNKNOWN_CHANNEL_STATUS",
    "broadcast_to_channel",
    "close_connection",
    "get_connection",
    "metrics_middleware",
    "openapi",
    "publish_to_channel",
    "realm_middleware",
    "send_to_connection",
    "send_to_user",
    "subscribe_to_channel",
    "websocket_endpoint",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: A session token longer than this is not one Traffic Cop issued (43 characters).
MAX_SESSION_TOKEN_LENGTH = 512
#: Status recorded (never sent) for a request whose client left before the answer (nginx's).
CLIENT_GONE_STATUS = 499

# -- middlewares ------------------------------------------------------------------------------


def _operation(request: web.Request) -> str:
    """The route name (the operationId), else its path template (``/health``): never the raw
    path, which would give every unknown URL its own time series."""
    route = request.match_info.route
    if route.name:
        return route.name
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests by operation and status; latency for every call but the SSE streams.

    The skeleton's error middleware sits outside this one, so the handler is called through it
    here too: the status recorded is the one the client gets (a Redis outage is the 503 it
    becomes, not a 500)."""
    operation = _operation(request)
    start = time.perf_counter()
    status = 500
    try:
        response = await error_middleware(request, handler)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_GONE_STATUS
        raise
    finally:
        metrics.REQUESTS.labels(operation=operation, status=str(status)).inc()
        if operation not in ("subscribe_to_channel", "consume_group"):
            metrics.REQUEST_SECONDS.labels(operation=operation).observe(time.perf_counter() - start)


@web.middleware
async def realm_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 without a known realm key, 403 when the realm lacks the route's capability, 429
    when it is over its rate limit."""
    route = request.match_info.route.name
    if route is None or route in PUBLIC_ROUTES or not request.path.startswith("/v1/"):
        # Unmatched paths and methods fall through to aiohttp's 404/405 (as JSON).
        return await handler(request)
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        fail(
            401,
            ErrorCode.UNAUTHORIZED,
            "missing realm key: send Authorization: Bearer <realm key>",
            {"WWW-Authenticate": 'Bearer realm="post-office"'},
        )
    realm = request.app[REALM_KEYS].realm_for(token)
    if realm is None:
        fail(
            401,
            ErrorCode.UNAUTHORIZED,
            "unknown realm key",
            {"WWW-Authenticate": 'Bearer realm="post-office", error="invalid_token"'},
        )
    missing = missing_capability(realm, route)
    if missing is not None:
        fail(
            403,
            ErrorCode.FORBIDDEN,
            f"realm {realm!r} lacks the capability {missing} needed by {route}",
        )
    wait = request.app[RATE_LIMITER].take(realm)
    if wait > 0:
        fail(
            429,
            ErrorCode.RATE_LIMITED,
            f"realm {realm!r} is over its rate limit; retry in {wait}s",
            {"Retry-After": str(wait)},
        )
    request[REALM] = realm
    return await handler(request)


# -- helpers ----------------------------------------------------------------------------------


_channel = channel_param


def _connection_id(request: web.Request) -> str:
    connection_id = request.match_info["connection_id"]
    if not is_valid_connection_id(connection_id):
        fail(
            400,
            ErrorCode.BAD_REQUEST,
            f"malformed connection id {connection_id[:80]!r}: expected ws_<user_id>_<8 hex>",
        )
    return connection_id


async def _delivery_body(request: web.Request) -> tuple[dict[str, Any], str | None]:
    data = await request.read()
    try:
        return parse_delivery_body(data)
    except ProtocolError as exc:
        fail(400, exc.code, exc.message)


# -- handlers ---------------------------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def websocket_endpoint(request: web.Request) -> web.Response:
    token = request.query.get("session_token", "")
    if not token:
        fail(400, ErrorCode.BAD_REQUEST, "the session_token query parameter is required")
    if len(token) > MAX_SESSION_TOKEN_LENGTH:
        fail(400, ErrorCode.BAD_REQUEST, "session_token is too long to be a session token")
    settings = request.app[SETTINGS]
    try:
        url = await request.app[ENDPOINTS].url(token)
    except DiscoveryError as exc:
        log.warning("no gateway for websocket-endpoint: %s", exc)
        fail(
            503, ErrorCode.UNAVAILABLE, "no gateway is available; retry later", {"Retry-After": "1"}
        )
    return json_response(
        {
            "websocket_url": url,
            "channels": list(settings.channels),
            "message_format": message_format(settings.channels),
        }
    )


async def publish_to_channel(request: web.Request) -> web.Response:
    channel = _channel(request)
    message, parent = await _delivery_body(request)
    outcome = await request.app[DELIVERIES].publish(
        channel, message, message_traceparent(parent, channel=channel), request[REALM]
    )
    metrics.PUBLISHED.labels(outcome=outcome.status).inc()
    if outcome.status == "refused":
        fail(
            503,
            ErrorCode.UNAVAILABLE,
            f"the stream of {channel!r} holds STREAM_MAX_PENDING unconsumed messages; retry later",
            {"Retry-After": "1"},
        )
    return json_response({"message_id": outcome.message_id, "status": outcome.status}, 202)


async def send_to_connection(request: web.Request) -> web.Response:
    connection_id = _connection_id(request)
    try:
        message, _parent, raw_ack = parse_reply_body(await request.read())
    except ProtocolError as exc:
        fail(400, exc.code, exc.message)
    # A reply may ack the stream entry it answers: checked first, acked once the reply went
    # out (or the client is gone: redelivering would not bring it back). One call, not two.
    ack = None if raw_ack is None else check_reply_ack(request, request[REALM], raw_ack)
    sent = await request.app[DELIVERIES].to_connection(connection_id, orjson.dumps(message))
    acked = None
    if ack is not None and sent.result is not SendResult.NOT_RECEIVED:
        acked = await ack_in_reply(request, ack)
    if sent.result is SendResult.DELIVERED:
        metrics.DELIVERIES.labels(kind="connection", outcome="delivered").inc()
        body: dict[str, int] = {"delivered": sent.receivers}
        if acked is not None:
            body["acked"] = acked
        return json_response(body, 202)
    if sent.result is SendResult.NOT_RECEIVED:
        # The holding gateway is alive but was not subscribed: most likely re-subscribing after
        # a Redis restart. Nothing was delivered, so the caller may safely send again (the
        # message it answers stays unacked); a 410 here made agents give the answer up for a
        # socket that is reachable a moment later.
        metrics.DELIVERIES.labels(kind="connection", outcome="not_received").inc()
        fail(
            503,
            ErrorCode.UNAVAILABLE,
            f"connection {connection_id!r} was not received: its gateway is alive but not "
            "subscribed (re-subscribing after a Redis restart?); retry",
            {"Retry-After": "1"},
        )
    metrics.DELIVERIES.labels(kind="connection", outcome="gone").inc()
    why = {
        SendResult.NO_RECORD: "is unknown or has disconnected",
        SendResult.STALE: "has no live gateway; its record was removed",
    }[sent.result]
    fail(410, ErrorCode.GONE, f"connection {connection_id!r} {why}")


async def get_connection(request: web.Request) -> web.Response:
    connection_id = _connection_id(request)
    record = await request.app[REGISTRY].get(connection_id)
    if record is None:
        fail(404, ErrorCode.NOT_FOUND, f"connection {connection_id!r} is unknown")
    return json_response(record.as_json())


def _close_code(request: web.Request) -> int:
    raw = request.query.get("code", "1000")
    # int() alone would take "+1000", " 1000", "1_000" and non-ASCII digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 5):
        fail(400, ErrorCode.BAD_REQUEST, f"code={raw[:20]!r}: expected an integer")
    code = int(raw)
    if not is_agent_close_code(code):
        fail(400, ErrorCode.BAD_REQUEST, f"code={code}: use 1000 or an application code 3000-4999")
    return code


async def close_connection(request: web.Request) -> web.Response:
    connection_id = _connection_id(request)
    code = _close_code(request)
    reason = request.query.get("reason", "closed by the Post Office API")
    if not close_reason_fits(reason):
        fail(400, ErrorCode.BAD_REQUEST, f"reason is longer than {MAX_CLOSE_REASON_BYTES} bytes")
    outcome, instance = await request.app[DELIVERIES].close(connection_id, code, reason)
    metrics.DELIVERIES.labels(kind="close", outcome=outcome.value).inc()
    if outcome is CloseOutcome.NOT_FOUND:
        fail(404, ErrorCode.NOT_FOUND, f"connection {connection_id!r} is unknown")
    if outcome is CloseOutcome.GATEWAY_GONE:
        fail(410, ErrorCode.GONE, f"connection {connection_id!r} had no live gateway; removed")
    if outcome is CloseOutcome.NOT_RECEIVED:
        fail(
            503,
            ErrorCode.UNAVAILABLE,
            f"gateway {instance!r} did not receive the close command; retry later",
            {"Retry-After": "1"},
        )
    return json_response(
        {
            "status": "closing",
            "connection_id": connection_id,
            "gateway_instance": instance,
            "code": code,
        },
        202,
    )


async def send_to_user(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    if not is_valid_user_id(user_id):
        fail(400, ErrorCode.BAD_REQUEST, f"malformed user id {user_id[:80]!r}")
    message, _parent = await _delivery_body(request)
    outcome = await request.app[DELIVERIES].to_user(user_id, orjson.dumps(message))
    metrics.DELIVERIES.labels(
        kind="user", outcome="delivered" if outcome.delivered else "none"
    ).inc()
    return json_response(
        {
            "delivered": outcome.delivered,
            "connections": outcome.connections,
            "stale_removed": outcome.stale_removed,
        },
        202,
    )


async def broadcast_to_channel(request: web.Request) -> web.Response:
    channel = _channel(request)
    message, _parent = await _delivery_body(request)
    outcome = await request.app[DELIVERIES].broadcast(channel, orjson.dumps(message))
    metrics.DELIVERIES.labels(kind="broadcast", outcome="sent").inc()
    return json_response({"gateways": outcome.gateways, "connections": outcome.connections}, 202)


async def subscribe_to_channel(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events, the tap: every agent message published on the channel from now on,
    at most once (the durable, competing delivery is consumers.py's group stream).

    Headers are sent only once Redis confirmed the subscription, so a client that got them
    receives everything published afterwards. Each event's ``id`` is the message id. The stream
    ends with ``event: error`` (code ``too_slow``) when the client reads too slowly for its
    bounded buffer, and ends cleanly when the process drains. Events that were buffered but not
    written when the client left are dropped: the channel's stream still holds them.
    """
    channel = _channel(request)
    settings = request.app[SETTINGS]
    hub = request.app[HUB]

    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    try:
        # The tap is at most once: what the stream did not write is not put back anywhere
        # (the durable path is the channel's stream, read through consumer groups).
        sub = await hub.join(names.agent_channel(channel), alive=alive)
    except HubFull as exc:
        fail(503, ErrorCode.UNAVAILABLE, str(exc), {"Retry-After": "5"})
    except PubSubUnavailable as exc:
        fail(503, ErrorCode.UNAVAILABLE, str(exc), {"Retry-After": "1"})
    watcher: asyncio.Task[None] | None = None
    stream = EventSourceResponse(
        ping_interval=settings.sse_keepalive_seconds,
        send_timeout=settings.sse_send_timeout_seconds,
    )
    try:
        # aiohttp_sse's prepare() asserts a transport: a client that left while the
        # subscription was being confirmed is not an internal error.
        if not alive():
            return _client_gone(sub, channel)
        try:
            await stream.prepare(request)
        except (ConnectionResetError, AssertionError):
            if alive():
                raise
            return _client_gone(sub, channel)
        async with stream:
            # The keep-alive task ends when a write fails: the client has gone. Closing the
            # subscriber then wakes the loop below instead of waiting for the next event.
            watcher = asyncio.create_task(stream.wait(), name="sse-client-watch")
            watcher.add_done_callback(lambda _t: sub.close("client_gone"))
            await stream.write(
                f"retry: {settings.sse_retry_ms}\r\n: subscribed to {channel}\r\n\r\n".encode()
            )
            while (event := await sub.get()) is not None:
                if not alive():
                    # Not written: the tap is at most once; the stream keeps the message.
                    sub.unget(event)
                    sub.close("client_gone")
                    break
                sse_id, data = event
                try:
                    await stream.send(data, id=sse_id)
                except BaseException:
                    sub.unget(event)  # dropped at leave: the tap is at most once
                    sub.close("client_gone")
                    raise
            if sub.closed == "too_slow":
                await stream.send(
                    orjson.dumps(
                        {
                            "code": "too_slow",
                            "message": f"more than {settings.sse_queue_size} events were "
                            "waiting for this stream; reconnect",
                        }
                    ).decode(),
                    event="error",
                )
    except (ConnectionResetError, TimeoutError) as exc:
        log.info("SSE stream on %s ended: %r", channel, exc)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])
        await hub.leave(sub)
    return stream


def _client_gone(sub: Subscriber, channel: str) -> web.Response:
    sub.close("client_gone")
    metrics.SSE_DROPPED.labels(reason="client_gone_before_headers").inc()
    log.info("SSE client of %s left before the stream opened", channel)
    # Never sent (there is no connection); the status is what the metrics record.
    return web.Response(status=CLIENT_GONE_STATUS)
