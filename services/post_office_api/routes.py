"""The ``/v1`` routes of the Post Office API.

Every route has a name, which is also its OpenAPI ``operationId`` and the key of
:data:`services.post_office_api.auth.ROUTE_CAPABILITIES` (the capabilities that allow it). The
operational routes (``/health``, ``/ready``, ``/metrics``) come from the service skeleton and
need no key.
"""

from __future__ import annotations

from aiohttp import web

from services.post_office_api import consumers, handlers

__all__ = ["setup_routes"]


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/openapi.json", handlers.openapi, name="get_openapi", allow_head=False)
    r.add_get(
        "/v1/websocket-endpoint",
        handlers.websocket_endpoint,
        name="get_websocket_endpoint",
        allow_head=False,
    )
    r.add_post(
        "/v1/channels/{channel}/messages", handlers.publish_to_channel, name="publish_to_channel"
    )
    r.add_get(
        "/v1/channels/{channel}/events",
        handlers.subscribe_to_channel,
        name="subscribe_to_channel",
        allow_head=False,
    )
    r.add_get(
        "/v1/channels/{channel}/groups/{group}/events",
        consumers.consume_group,
        name="consume_group",
        allow_head=False,
    )
    r.add_post("/v1/channels/{channel}/groups/{group}/acks", consumers.ack_group, name="ack_group")
    r.add_get(
        "/v1/channels/{channel}/dead-letters",
        consumers.list_dead_letters,
        name="list_dead_letters",
        allow_head=False,
    )
    r.add_post(
        "/v1/channels/{channel}/dead-letters/requeue",
        consumers.requeue_dead_letters,
        name="requeue_dead_letters",
    )
    r.add_post(
        "/v1/channels/{channel}/broadcast",
        handlers.broadcast_to_channel,
        name="broadcast_to_channel",
    )
    r.add_post(
        "/v1/connections/{connection_id}/messages",
        handlers.send_to_connection,
        name="send_to_connection",
    )
    r.add_get(
        "/v1/connections/{connection_id}",
        handlers.get_connection,
        name="get_connection",
        allow_head=False,
    )
    r.add_delete(
        "/v1/connections/{connection_id}", handlers.close_connection, name="close_connection"
    )
    r.add_post("/v1/users/{user_id}/messages", handlers.send_to_user, name="send_to_user")
