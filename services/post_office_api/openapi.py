"""The OpenAPI 3.1 document of ``/v1``, served at ``GET /v1/openapi.json``.

Built from the same tables the code uses (channels from settings, capabilities from
:mod:`services.post_office_api.auth`), and ``tests/test_api.py`` fails when a route of the
application is missing here or a documented operation has no route.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.post_office_api.auth import ROUTE_CAPABILITIES
from services.post_office_api.endpoint import message_format
from services.post_office_api.handlers import MAX_SESSION_TOKEN_LENGTH, UNKNOWN_CHANNEL_STATUS
from shared.protocol import MAX_CLOSE_REASON_BYTES, MAX_DEPTH

__all__ = ["build_openapi"]

_REF = "#/components/schemas/"
_RESP = "#/components/responses/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"{_RESP}E{s}"} for s in statuses}


_ERROR_TEXT = {
    400: "malformed id, query parameter or body (`bad_request`, `invalid_json`)",
    401: "no realm key or an unknown one (`unauthorized`)",
    403: "the realm lacks the capability; the message names it (`forbidden`)",
    404: "unknown connection (`not_found`) or channel (`unknown_channel`)",
    405: "method not allowed on this path (`method_not_allowed`); see Allow",
    410: "the connection is gone (`gone`)",
    429: "the realm is over its rate limit (`rate_limited`); see Retry-After",
    413: "body larger than MAX_BODY_BYTES (`too_large`)",
    503: "Redis down, STREAM_MAX_PENDING reached, no gateway, no subscription or too many group "
    "consumers (`unavailable`); see Retry-After",
}


#: Response headers of some errors.
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'Bearer realm="post-office" (error="invalid_token" for an unknown key)',
            "schema": {"type": "string"},
        }
    },
    405: {"Allow": {"description": "the methods the path has", "schema": {"type": "string"}}},
    429: {
        "Retry-After": {
            "description": "seconds until the realm may call again",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
    503: {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


#: The 200 of a Server-Sent Events operation.
_SSE = {
    "200": {
        "description": "the event stream",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def _error_response(status: int, text: str) -> dict[str, Any]:
    response = _json(_ref("Error"), text)
    if status in _ERROR_HEADERS:
        response["headers"] = _ERROR_HEADERS[status]
    return response


#: Operation -> its tag (the groups of the document's ``tags``).
_TAGS = {
    "get_websocket_endpoint": "clients",
    "publish_to_channel": "channels",
    "subscribe_to_channel": "channels",
    "broadcast_to_channel": "channels",
    "consume_group": "groups",
    "ack_group": "groups",
    "list_dead_letters": "groups",
    "requeue_dead_letters": "groups",
    "send_to_connection": "connections",
    "get_connection": "connections",
    "close_connection": "connections",
    "send_to_user": "users",
    "get_openapi": "meta",
}
_TAG_TEXT = {
    "clients": "where a WebSocket client connects",
    "channels": "agent channels: publish, the tap (Server-Sent Events), broadcast",
    "groups": "consumer groups: consume a channel's stream (Server-Sent Events), ack, dead letters",
    "connections": "one WebSocket connection: deliver, read its record, close it",
    "users": "every connection of one user",
    "meta": "this document",
}


def _operation(
    name: str,
    summary: str,
    description: str,
    responses: dict[str, Any],
    *,
    parameters: Sequence[dict[str, Any]] = (),
    body: bool | str = False,
    errors: Sequence[int] = (),
) -> dict[str, Any]:
    """``body``: True for a DeliveryBody, or the name of the request body's schema."""
    caps = sorted(ROUTE_CAPABILITIES.get(name, ()))
    op: dict[str, Any] = {
        "operationId": name,
        "tags": [_TAGS[name]],
        "summary": summary,
        "description": description + (f"\n\nCapability: {' or '.join(caps)}." if caps else ""),
        "x-capabilities": caps,
        "parameters": list(parameters),
        "responses": {**responses, **_errors(401, 403, 405, 429, *errors)},
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _ref(body if isinstance(body, str) else "DeliveryBody")
                }
            },
        }
        op["responses"].update(_errors(400, 413))
    return op


def _last_event_id(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def _path(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def build_openapi(channels: Sequence[str]) -> dict[str, Any]:
    channel = _path("channel", "an agent channel", {"type": "string", "enum": list(channels)})
    connection = _path(
        "connection_id",
        "a connection id as the welcome frame gave it",
        {"type": "string", "pattern": r"^ws_[A-Za-z0-9._@-]{1,128}_[0-9a-f]{8}$"},
    )
    stream_id = {"type": "string", "pattern": r"^\d{1,20}-\d{1,20}$"}
    group = _path(
        "group",
        "a consumer group: agents of one kind",
        {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
    )
    user = _path("user_id", "a user id", {"type": "string", "pattern": r"^[A-Za-z0-9._@-]{1,128}$"})
    unknown_channel = str(UNKNOWN_CHANNEL_STATUS)
    paths: dict[str, Any] = {
        "/v1/openapi.json": {
            "get": {
                "operationId": "get_openapi",
                "tags": [_TAGS["get_openapi"]],
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {"description": "the OpenAPI document"},
                    **_errors(405),
                },
            }
        },
        "/v1/websocket-endpoint": {
            "get": _operation(
                "get_websocket_endpoint",
                "Where a client connects",
                "The WebSocket URL (PUBLIC_WS_URL, else a gateway found by discovery) with the "
                "session token in its query, the channels and the client message format.",
                {"200": _json(_ref("WebSocketEndpoint"), "where to connect")},
                parameters=[
                    {
                        "name": "session_token",
                        "in": "query",
                        "required": True,
                        "description": "a session token from Traffic Cop; empty is refused",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_SESSION_TOKEN_LENGTH,
                        },
                    }
                ],
                errors=(400, 503),
            )
        },
        "/v1/channels/{channel}/messages": {
            "post": _operation(
                "publish_to_channel",
                "Publish to an agent channel",
                "Appends an agent message to the channel's stream websocket:stream:{<channel>} "
                "(consumer groups read it) and publishes it on the tap websocket:<channel>. 503 "
                "when the slowest group has STREAM_MAX_PENDING unconsumed messages.",
                {"202": _json(_ref("PublishResult"), "published or queued")},
                parameters=[channel],
                body=True,
                errors=(int(unknown_channel), 503),
            )
        },
        "/v1/channels/{channel}/events": {
            "get": _operation(
                "subscribe_to_channel",
                "The channel's tap (Server-Sent Events, at most once)",
                "A text/event-stream of the channel's agent messages, from the moment the "
                "headers arrive (no history), for observers: every tap stream gets every "
                "message, and what a stream misses (too slow, reconnecting) is not sent again. "
                "Agents that must handle each message consume a group instead "
                "(`consume_group`). Each event: `id` = message_id, `data` = the agent message "
                "JSON. Keep-alive comments every SSE_KEEPALIVE_SECONDS. A client that falls "
                'SSE_QUEUE_SIZE events behind gets `event: error` with `{"code": "too_slow"}` '
                "and the stream ends. Last-Event-ID is accepted and ignored.",
                _SSE,
                parameters=[
                    channel,
                    _last_event_id("accepted and ignored: the tap keeps no history", {}),
                ],
                errors=(int(unknown_channel), 503),
            )
        },
        "/v1/channels/{channel}/groups/{group}/events": {
            "get": _operation(
                "consume_group",
                "Consume the channel's stream as one consumer of a group (Server-Sent Events)",
                "Each message goes to exactly one consumer of each group (created at id 0 "
                "with the stream when missing: it starts with what the stream still holds). "
                "Each event: `id` = the stream id, `data` = the agent message JSON with "
                "`stream_id`, `channel`, `group` and `deliveries` (1, then one more each time "
                "it was handed to another consumer) added. Ack each one (`ack_group`, or the "
                "`ack` of `send_to_connection`); one not acked within ACK_TIMEOUT_SECONDS goes "
                "to another live consumer, and after MAX_DELIVERIES to the dead letters. The "
                "consumer holds at most max_in_flight unacked messages. At least once: dedupe "
                "by message_id.",
                _SSE,
                parameters=[
                    channel,
                    group,
                    {
                        "name": "consumer",
                        "in": "query",
                        "required": True,
                        "description": "this consumer's name, stable across its reconnects "
                        "(its unacked messages are sent again when it comes back)",
                        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,128}$"},
                    },
                    {
                        "name": "max_in_flight",
                        "in": "query",
                        "required": False,
                        "description": "unacked messages held at most (GROUP_MAX_IN_FLIGHT "
                        "and below)",
                        "schema": {"type": "integer", "minimum": 1},
                    },
                    _last_event_id(
                        "the last stream id received: this consumer's unacked messages after "
                        "it are sent again, those up to it are not",
                        {"pattern": stream_id["pattern"]},
                    ),
                ],
                errors=(400, int(unknown_channel), 503),
            )
        },
        "/v1/channels/{channel}/groups/{group}/acks": {
            "post": _operation(
                "ack_group",
                "Ack a batch of a group's messages",
                "XACK of the stream ids; answers how many were still pending (an id acked "
                "twice, or by another consumer after a hand-over, counts 0).",
                {"200": _json(_ref("Acked"), "acked")},
                parameters=[channel, group],
                body="StreamIds",
                errors=(int(unknown_channel), 503),
            )
        },
        "/v1/channels/{channel}/dead-letters": {
            "get": _operation(
                "list_dead_letters",
                "The channel's dead letters, oldest first",
                "Messages a group did not ack within MAX_DELIVERIES deliveries, with the "
                "group, the deliveries and the reason. Page with `after` = the last `id`.",
                {"200": _json(_ref("DeadLetters"), "dead letters")},
                parameters=[
                    channel,
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": stream_id["pattern"]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                errors=(400, int(unknown_channel), 503),
            )
        },
        "/v1/channels/{channel}/dead-letters/requeue": {
            "post": _operation(
                "requeue_dead_letters",
                "Append dead letters to the channel's stream again",
                "Each named dead letter's message is appended again (a new stream id, the "
                "same message_id: every group sees it) and leaves the dead letters, atomically.",
                {"200": _json(_ref("Requeued"), "requeued")},
                parameters=[channel],
                body="StreamIds",
                errors=(int(unknown_channel), 503),
            )
        },
        "/v1/channels/{channel}/broadcast": {
            "post": _operation(
                "broadcast_to_channel",
                "Deliver to every connection that has used the channel",
                "One PUBLISH on websocket:channel:<channel>:broadcast; every gateway fans it "
                "out to its sockets. Answers how many gateways received it and how many "
                "connections have used the channel.",
                {"202": _json(_ref("BroadcastResult"), "sent")},
                parameters=[channel],
                body=True,
                errors=(int(unknown_channel), 503),
            )
        },
        "/v1/connections/{connection_id}/messages": {
            "post": _operation(
                "send_to_connection",
                "Deliver to one connection",
                "The socket receives exactly `message` as one text frame, on whichever gateway "
                "holds it. 410 when no gateway holds it (its stale record is removed when the "
                "holding gateway is dead too). With `ack` the stream entries it names are "
                "acked once the frame was handed over or the connection is gone (one call per "
                "handled message); `ack` needs agent_channel_subscribe.",
                {"202": _json(_ref("Delivered"), "delivered")},
                parameters=[connection],
                body="ReplyBody",
                errors=(410, 503),
            )
        },
        "/v1/connections/{connection_id}": {
            "get": _operation(
                "get_connection",
                "A connection's registry record",
                "The record the holding gateway keeps in Redis.",
                {"200": _json(_ref("Connection"), "the record")},
                parameters=[connection],
                errors=(400, 404, 503),
            ),
            "delete": _operation(
                "close_connection",
                "Close a connection",
                "Tells the holding gateway to close the socket with `code` (1000 or "
                "3000-4999) and `reason`. 410 when that gateway is dead (the record is "
                "removed); 503 when it is alive but did not receive the command.",
                {"202": _json(_ref("Closing"), "the gateway is closing it")},
                parameters=[
                    connection,
                    {
                        "name": "code",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "default": 1000,
                            "oneOf": [{"const": 1000}, {"minimum": 3000, "maximum": 4999}],
                        },
                    },
                    {
                        "name": "reason",
                        "in": "query",
                        "required": False,
                        "description": f"at most {MAX_CLOSE_REASON_BYTES} bytes of UTF-8 (the "
                        "close frame's limit), counted in bytes, not characters: a non-ASCII "
                        "reason is refused with fewer characters than maxLength says; empty "
                        "is allowed. Default: `closed by the Post Office API`.",
                        "schema": {
                            "type": "string",
                            "maxLength": MAX_CLOSE_REASON_BYTES,
                            "x-maxBytes": MAX_CLOSE_REASON_BYTES,
                        },
                    },
                ],
                errors=(400, 404, 410, 503),
            ),
        },
        "/v1/users/{user_id}/messages": {
            "post": _operation(
                "send_to_user",
                "Deliver to every connection of a user",
                "Each live connection of the user receives `message`. `delivered` 0 means the "
                "user has no live connection.",
                {"202": _json(_ref("UserDelivered"), "sent")},
                parameters=[user],
                body=True,
                errors=(503,),
            )
        },
    }
    integer = {"type": "integer", "minimum": 0}
    agent_message: dict[str, Any] = {
        "message_id": {"type": "string"},
        "connection_id": {"type": "string"},
        "user_id": {"type": "string"},
        "gateway_instance": {"type": "string"},
        "message": {"type": "object"},
        "timestamp": {"type": "string", "format": "date-time"},
        "traceparent": {"type": "string"},
    }
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
        "DeliveryBody": {
            "type": "object",
            "required": ["message"],
            "additionalProperties": False,
            "description": "At most MAX_BODY_BYTES (1 MiB by default; 413 past it). Unknown "
            "fields are refused (400).",
            "properties": {
                "message": {
                    "type": "object",
                    "description": f"sent as is, one text frame; nesting deeper than {MAX_DEPTH} "
                    "levels is refused (400)",
                },
                "traceparent": {
                    "type": "string",
                    "description": "W3C trace context; one that does not parse is ignored "
                    "(the trace restarts), never refused",
                },
            },
        },
        "ReplyBody": {
            "type": "object",
            "required": ["message"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "object", "description": "sent as is, one text frame"},
                "traceparent": {"type": "string", "description": "W3C trace context"},
                "ack": {
                    "type": "object",
                    "required": ["channel", "group"],
                    "additionalProperties": False,
                    "properties": {
                        "channel": {"type": "string", "enum": list(channels)},
                        "group": {"type": "string"},
                        "ids": {"type": "array", "items": stream_id, "minItems": 1},
                        "id": stream_id,
                    },
                },
            },
        },
        "StreamIds": {
            "type": "object",
            "required": ["ids"],
            "additionalProperties": False,
            "properties": {"ids": {"type": "array", "items": stream_id, "minItems": 1}},
        },
        "Acked": {
            "type": "object",
            "required": ["acked", "ids"],
            "properties": {"acked": integer, "ids": integer},
        },
        "DeadLetters": {
            "type": "object",
            "required": ["dead_letters", "next"],
            "properties": {
                "dead_letters": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "id",
                            "stream_id",
                            "group",
                            "deliveries",
                            "reason",
                            "dead_at",
                            "message",
                        ],
                        "properties": {
                            "id": stream_id,
                            "stream_id": stream_id,
                            "group": {"type": "string"},
                            "deliveries": integer,
                            "reason": {"type": "string"},
                            "dead_at": {"type": "string", "format": "date-time"},
                            "message": {"type": "object"},
                        },
                    },
                },
                "next": {"type": ["string", "null"], "description": "`after` of the next page"},
            },
        },
        "Requeued": {
            "type": "object",
            "required": ["requeued", "unknown"],
            "properties": {
                "requeued": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "stream_id"],
                        "properties": {"id": stream_id, "stream_id": stream_id},
                    },
                },
                "unknown": {"type": "array", "items": stream_id},
            },
        },
        "PublishResult": {
            "type": "object",
            "required": ["message_id", "status"],
            "properties": {
                "message_id": {"type": "string"},
                "status": {
                    "enum": ["published", "queued"],
                    "description": "both: appended to the channel's stream, where it waits "
                    "until every group has acked it. published: a consumer group reads the "
                    "channel or the tap has a listener; queued: neither yet (the first group, "
                    "created at id 0, gets it)",
                },
            },
        },
        "Delivered": {
            "type": "object",
            "required": ["delivered"],
            "properties": {
                "delivered": {"type": "integer", "minimum": 1},
                "acked": {"type": "integer", "description": "with `ack`: entries acked"},
            },
        },
        "UserDelivered": {
            "type": "object",
            "required": ["delivered", "connections", "stale_removed"],
            "properties": {"delivered": integer, "connections": integer, "stale_removed": integer},
        },
        "BroadcastResult": {
            "type": "object",
            "required": ["gateways", "connections"],
            "properties": {
                "gateways": integer,
                "connections": {
                    **integer,
                    "description": "connections that have used the channel, as the gateways "
                    "last wrote it: a channel first used in the last liveness tick (5 s) may "
                    "not be counted yet, though the broadcast reaches it",
                },
            },
        },
        "Closing": {
            "type": "object",
            "required": ["status", "connection_id", "gateway_instance", "code"],
            "properties": {
                "status": {"const": "closing"},
                "connection_id": {"type": "string"},
                "gateway_instance": {"type": "string"},
                "code": {"type": "integer"},
            },
        },
        "Connection": {
            "type": "object",
            "description": "`channels` and `last_heartbeat` are written by the holding gateway's "
            "liveness flush and trail the client by up to GATEWAY_LIVENESS_FLUSH_SECONDS (5 s). "
            "A field a corrupt record lacks or cannot parse is null.",
            "required": ["connection_id", "channels", "connected_at", "last_heartbeat", "metadata"],
            "properties": {
                "connection_id": {"type": "string"},
                "user_id": {"type": "string"},
                "session_id": {"type": "string"},
                "gateway_instance": {"type": "string"},
                "channels": {"type": ["array", "null"], "items": {"type": "string"}},
                "connected_at": {"type": ["number", "null"]},
                "last_heartbeat": {"type": ["number", "null"]},
                "metadata": {"type": ["object", "null"]},
            },
        },
        "WebSocketEndpoint": {
            "type": "object",
            "required": ["websocket_url", "channels", "message_format"],
            "properties": {
                "websocket_url": {"type": "string"},
                "channels": {"type": "array", "items": {"type": "string"}},
                "message_format": {"type": "object", "example": message_format(channels)},
            },
        },
        "AgentMessage": {
            "type": "object",
            "description": "what SSE events carry (data) and agents receive on websocket:<channel>",
            "required": list(agent_message),
            "properties": agent_message,
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Post Office API",
            "version": "1",
            "description": "Publish to agent channels, consume them through consumer groups "
            "(or tap them), deliver to WebSocket "
            "connections, users and channels. Errors: "
            '`{"error": {"code": "...", "message": "..."}}`.',
        },
        # Relative: the API that served this document (behind Traefik, the edge's /v1).
        "servers": [{"url": "/", "description": "the Post Office API serving this document"}],
        "tags": [{"name": name, "description": text} for name, text in _TAG_TEXT.items()],
        "security": [{"realmKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "realmKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a realm key (REALM_KEYS); realms hold capabilities",
                }
            },
            "schemas": schemas,
            "responses": {
                f"E{status}": _error_response(status, text) for status, text in _ERROR_TEXT.items()
            },
        },
    }
