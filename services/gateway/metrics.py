"""The gateway's Prometheus metrics (served on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

__all__ = [
    "ACKS",
    "AGENT_ANSWER_SECONDS",
    "BREAKER_BUFFERED",
    "BREAKER_OPEN",
    "CLOSES",
    "CONNECTIONS",
    "CONNECTIONS_REFUSED",
    "CONNECTIONS_TOTAL",
    "DELIVERY_WRITE_SECONDS",
    "ERRORS",
    "FRAMES_IN",
    "FRAMES_OUT",
    "FRAME_TO_REDIS_SECONDS",
    "PONGS",
    "PUBLISH_BATCH",
    "PUBSUB_RECONNECTS",
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
PUBSUB_RECONNECTS = Counter("postoffice_gateway_pubsub_reconnects", "Pub/sub reconnections")

# Latencies, in seconds. Where each clock starts and stops is part of the metric's meaning
# (docs/metrics.md); the code that observes them says so at the observation.
FRAME_TO_REDIS_SECONDS = Histogram(
    "postoffice_gateway_frame_to_redis_seconds",
    "From a client's message frame read off the socket to its publish (or queue) round trip "
    "with Redis completed, by outcome (published, queued); frames refused before Redis "
    "(invalid, rate limited, breaker open) are not observed",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
DELIVERY_WRITE_SECONDS = Histogram(
    "postoffice_gateway_delivery_write_seconds",
    "From an agent's delivery received from Redis pub/sub by this gateway to its frame "
    "written to the client's socket (queueing in the per-connection buffer included), by kind "
    "(connection, user, broadcast)",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
AGENT_ANSWER_SECONDS = Histogram(
    "postoffice_gateway_agent_answer_seconds",
    "The agent's answer time as the client sees it: from a client's message frame read off "
    "the socket to the first delivery to the same connection whose in_reply_to names that "
    "message's message_id written to the socket, by channel; answers that never come (or "
    "come after the gateway stopped waiting for them) are not observed",
    ["channel"],
    buckets=LATENCY_BUCKETS,
)
