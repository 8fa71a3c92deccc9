"""The gateway's Prometheus metrics (served on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ACKS",
    "BREAKER_BUFFERED",
    "BREAKER_OPEN",
    "CLOSES",
    "CONNECTIONS",
    "CONNECTIONS_REFUSED",
    "CONNECTIONS_TOTAL",
    "ERRORS",
    "FRAMES_IN",
    "FRAMES_OUT",
    "PONGS",
    "PUBLISH_BATCH",
    "UPGRADES_REFUSED",
]

CONNECTIONS = Gauge("postoffice_gateway_connections", "Open, registered WebSocket connections")
CONNECTIONS_TOTAL = Counter("postoffice_gateway_connections_opened", "Connections welcomed")
UPGRADES_REFUSED = Counter(
    "postoffice_gateway_upgrades_refused",
    "Upgrades refused before the socket opened, by reason",
    ["reason"],
)
CONNECTIONS_REFUSED = Counter(
    "postoffice_gateway_connections_refused",
    "Sockets accepted then closed before the welcome, by reason (overloaded, session_limit, "
    "invalid_token, invalid_token_cached)",
    ["reason"],
)
PONGS = Counter("postoffice_gateway_pongs", "App pongs received")
FRAMES_IN = Counter("postoffice_gateway_frames_in", "Frames received from clients")
FRAMES_OUT = Counter("postoffice_gateway_frames_out", "Frames written to clients")
ACKS = Counter("postoffice_gateway_acks", "Acks sent, by status (published, queued)", ["status"])
ERRORS = Counter("postoffice_gateway_errors", "Error frames sent, by code", ["code"])
CLOSES = Counter(
    "postoffice_gateway_closes", "Sockets closed by the gateway, by close code", ["code"]
)
PUBLISH_BATCH = Histogram(
    "postoffice_gateway_publish_batch_size",
    "Messages per publisher round trip",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BREAKER_OPEN = Gauge("postoffice_gateway_breaker_open", "1 while the Redis circuit breaker is open")
BREAKER_BUFFERED = Gauge(
    "postoffice_gateway_breaker_buffered", "Messages held in memory by the breaker"
)
