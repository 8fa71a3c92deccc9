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
from services.post_office_api.handlers import UNKNOWN_CHANNEL_STATUS
from shared.protocol import MAX_CLOSE_REASON_BYTES

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
    503: "Redis down, queue full, no gateway or no subscription (`unavailable`); see Retry-After",
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


def _error_response(status: int, text: str) -> dict[str, Any]:
    response = _json(_ref("Error"), text)
    if status in _ERROR_HEADERS:
        response["headers"] = _ERROR_HEADERS[status]
    return response


def _operation(
    name: str,
    summary: str,
    description: str,
    responses: dict[str, Any],
    *,
    parameters: Sequence[dict[str, Any]] = (),
    body: bool = False,
    errors: Sequence[int] = (),
) -> dict[str, Any]:
    caps = sorted(ROUTE_CAPABILITIES.get(name, ()))
    op: dict[str, Any] = {
        "operationId": name,
        "summary": summary,
        "description": description + (f"\n\nCapability: {' or '.join(caps)}." if caps else ""),
        "x-capabilities": caps,
        "parameters": list(parameters),
        "responses": {**responses, **_errors(401, 403, 405, 429, *errors)},
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref("DeliveryBody")}},
        }
        op["responses"].update(_errors(400, 413))
    return op


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
    user = _path("user_id", "a user id", {"type": "string", "pattern": r"^[A-Za-z0-9._@-]{1,128}$"})
    unknown_channel = str(UNKNOWN_CHANNEL_STATUS)
    paths: dict[str, Any] = {
        "/v1/openapi.json": {
            "get": {
                "operationId": "get_openapi",
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
                        "schema": {"type": "string", "maxLength": 512},
                    }
                ],
                errors=(400, 503),
            )
        },
        "/v1/channels/{channel}/messages": {
            "post": _operation(
                "publish_to_channel",
                "Publish to an agent channel",
                "Publishes an agent message on websocket:<channel>, or queues it (bounded) "
                "while no agent listens. 503 when the queue is full.",
                {"202": _json(_ref("PublishResult"), "published or queued")},
                parameters=[channel],
                body=True,
                errors=(int(unknown_channel), 503),
            )
        },
        "/v1/channels/{channel}/events": {
            "get": _operation(
                "subscribe_to_channel",
                "Subscribe to an agent channel (Server-Sent Events)",
                "A text/event-stream of the channel's agent messages, from the moment the "
                "headers arrive (no history). Each event: `id` = message_id, `data` = the "
                "agent message JSON. Keep-alive comments every SSE_KEEPALIVE_SECONDS. A client "
                "that falls SSE_QUEUE_SIZE events behind gets `event: error` with "
                '`{"code": "too_slow"}` and the stream ends. Last-Event-ID is accepted and '
                "ignored: pub/sub keeps no history.",
                {
                    "200": {
                        "description": "the event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                parameters=[
                    channel,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "accepted and ignored: pub/sub keeps no history",
                        "schema": {"type": "string"},
                    },
                ],
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
                "holding gateway is dead too).",
                {"202": _json(_ref("Delivered"), "delivered")},
                parameters=[connection],
                body=True,
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
                        "schema": {"type": "string", "maxLength": MAX_CLOSE_REASON_BYTES},
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
            "properties": {
                "message": {"type": "object", "description": "sent as is, one text frame"},
                "traceparent": {"type": "string", "description": "W3C trace context"},
            },
        },
        "PublishResult": {
            "type": "object",
            "properties": {
                "message_id": {"type": "string"},
                "status": {
                    "enum": ["published", "queued"],
                    "description": "published: at least one agent subscriber received it; "
                    "queued: nobody listens, or older messages are still queued (order is "
                    "kept), so it waits in the bounded agent queue until the eviction worker "
                    "delivers it to a listening agent",
                },
            },
        },
        "Delivered": {
            "type": "object",
            "properties": {"delivered": {"type": "integer", "minimum": 1}},
        },
        "UserDelivered": {
            "type": "object",
            "properties": {"delivered": integer, "connections": integer, "stale_removed": integer},
        },
        "BroadcastResult": {
            "type": "object",
            "properties": {"gateways": integer, "connections": integer},
        },
        "Closing": {
            "type": "object",
            "properties": {
                "status": {"const": "closing"},
                "connection_id": {"type": "string"},
                "gateway_instance": {"type": "string"},
                "code": {"type": "integer"},
            },
        },
        "Connection": {
            "type": "object",
            "properties": {
                "connection_id": {"type": "string"},
                "user_id": {"type": "string"},
                "session_id": {"type": "string"},
                "gateway_instance": {"type": "string"},
                "channels": {"type": "array", "items": {"type": "string"}},
                "connected_at": {"type": "number"},
                "last_heartbeat": {"type": "number"},
                "metadata": {"type": "object"},
            },
        },
        "WebSocketEndpoint": {
            "type": "object",
            "properties": {
                "websocket_url": {"type": "string"},
                "channels": {"type": "array", "items": {"type": "string"}},
                "message_format": {"type": "object", "example": message_format(channels)},
            },
        },
        "AgentMessage": {
            "type": "object",
            "description": "what SSE events carry (data) and agents receive on websocket:<channel>",
            "properties": {
                "message_id": {"type": "string"},
                "connection_id": {"type": "string"},
                "user_id": {"type": "string"},
                "gateway_instance": {"type": "string"},
                "message": {"type": "object"},
                "timestamp": {"type": "string", "format": "date-time"},
                "traceparent": {"type": "string"},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Post Office API",
            "version": "1",
            "description": "Publish to agent channels, subscribe to them, deliver to WebSocket "
            "connections, users and channels. Errors: "
            '`{"error": {"code": "...", "message": "..."}}`.',
        },
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
