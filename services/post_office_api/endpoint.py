"""Where clients connect: the answer of ``GET /v1/websocket-endpoint``.

``PUBLIC_WS_URL`` (the public edge, e.g. Traefik's ``wss://example.com/ws``) wins; without it a
healthy gateway is found by discovery (Consul, else ``GATEWAY_URLS``) and its
``http://host:port`` becomes ``ws://host:port/ws``. Successive answers rotate over the gateways.
The session token is appended as the ``session_token`` query parameter; it is not validated here
(the gateway validates it with Traffic Cop on connect) and never logged.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from yarl import URL

from shared.discovery import Discovery
from shared.protocol import DEFAULT_CHANNELS, INTENTS, MAX_CLIENT_ID_LENGTH
from shared.service_names import GATEWAY_SERVICE

__all__ = ["WebSocketEndpoints", "message_format"]


class WebSocketEndpoints:
    def __init__(
        self, discovery: Discovery, public_ws_url: str, gateway_urls: Sequence[str]
    ) -> None:
        self.discovery = discovery
        self.public_ws_url = public_ws_url
        self.gateway_urls = tuple(gateway_urls)
        self._next = itertools.count()

    async def url(self, session_token: str) -> str:
        """Raises :class:`shared.discovery.DiscoveryError` when no gateway can be found."""
        if self.public_ws_url:
            base = URL(self.public_ws_url)
        else:
            urls = await self.discovery.resolve_all(GATEWAY_SERVICE.name, self.gateway_urls)
            base = _ws_url(URL(urls[next(self._next) % len(urls)]))
        return str(base.update_query(session_token=session_token))


def _ws_url(http: URL) -> URL:
    scheme = "wss" if http.scheme == "https" else "ws"
    return http.with_scheme(scheme).with_path(http.path.rstrip("/") + "/ws").with_query(None)


def message_format(channels: Sequence[str] = DEFAULT_CHANNELS) -> dict[str, Any]:
    """A JSON Schema of the client envelope (docs/protocol.md), with an example."""
    return {
        "encoding": "one JSON object per WebSocket text frame",
        "schema": {
            "type": "object",
            "required": ["payload"],
            "additionalProperties": False,
            "properties": {
                "channel": {"enum": list(channels), "default": "guide"},
                "intent": {"enum": sorted(INTENTS), "default": "chat"},
                "payload": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {
                        "message": {"type": "string"},
                        "conversation_id": {"type": "string"},
                        "metadata": {"type": "object"},
                    },
                },
                "id": {
                    "type": ["string", "integer"],
                    "maxLength": MAX_CLIENT_ID_LENGTH,
                    "description": "optional client message id, echoed in the ack or error frame",
                },
            },
        },
        "example": {
            "channel": "guide",
            "intent": "chat",
            "payload": {"message": "help"},
            "id": "1",
        },
        "server_frames": ["welcome", "ack", "error", "ping", "agent messages (any JSON object)"],
    }
