"""Typed answers of the Post Office API (docs/api.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "AgentMessage",
    "BroadcastResult",
    "PublishResult",
    "UserDelivery",
    "WebSocketEndpoint",
]


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """One agent message, as published on ``websocket:<channel>`` and carried by SSE events.

    ``message`` is the client's envelope (``{"channel", "intent", "payload", "id"?}``) for
    messages from WebSocket clients, or the ``message`` object of ``POST
    /v1/channels/{channel}/messages``; ``connection_id`` is empty for the latter.
    """

    message_id: str
    connection_id: str
    user_id: str
    gateway_instance: str
    message: dict[str, Any]
    timestamp: str
    traceparent: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def text(self) -> str | None:
        """``payload.message`` of a client envelope, when there is one."""
        payload = self.message.get("payload")
        if isinstance(payload, dict) and isinstance(payload.get("message"), str):
            return str(payload["message"])
        return None

    @classmethod
    def from_json(cls, data: str | bytes) -> AgentMessage:
        """Parse one event's data; ``ValueError`` when it is not an agent message."""
        raw = orjson.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("an agent message must be a JSON object")
        message = raw.get("message")
        if not isinstance(message, dict):
            raise ValueError('an agent message must have "message": an object')
        return cls(
            message_id=str(raw.get("message_id", "")),
            connection_id=str(raw.get("connection_id") or ""),
            user_id=str(raw.get("user_id") or ""),
            gateway_instance=str(raw.get("gateway_instance") or ""),
            message=message,
            timestamp=str(raw.get("timestamp", "")),
            traceparent=str(raw.get("traceparent") or ""),
            raw=raw,
        )


@dataclass(frozen=True, slots=True)
class PublishResult:
    message_id: str
    status: str  # "published" | "queued"


@dataclass(frozen=True, slots=True)
class UserDelivery:
    delivered: int
    connections: int
    stale_removed: int


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    gateways: int
    connections: int


@dataclass(frozen=True, slots=True)
class WebSocketEndpoint:
    websocket_url: str
    channels: tuple[str, ...]
    message_format: dict[str, Any]
