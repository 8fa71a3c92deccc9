"""The gateway's Prometheus metrics (served on ``/metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.gateway.connection_protocol import ProtocolStats
from shared.metrics import LATENCY_BUCKETS

__all__ = [
    "AGENT_ANSWER_SECONDS",
    "BREAKER_BUFFERED",
    "BREAKER_OPEN",
    "CLOSES",
    "CONNECTIONS",
    "CONNECTIONS_REFUSED",
    "CONNECTIONS_TOTAL",
    "DELIVERY_WRITE_SECONDS",
    "FRAME_TO_REDIS_SECONDS",
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


#: What every connection's protocol of this process counts (acks, errors, pongs).
PROTOCOL_STATS = ProtocolStats()


class _ProtocolCollector(Collector):
    """Frames, acks, error frames and pongs, read from :data:`PROTOCOL_STATS` when scraped."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = PROTOCOL_STATS
        acks = CounterMetricFamily(
            "postoffice_gateway_acks", "Acks sent, by status (published, queued)", labels=["status"]
        )
        for status, count in stats.acks.items():
            acks.add_metric([status], count)
        yield acks
        errors = CounterMetricFamily(
            "postoffice_gateway_errors", "Error frames sent, by code", labels=["code"]
        )
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code], count)
        yield errors
        pongs = CounterMetricFamily("postoffice_gateway_pongs", "Pongs received (app and protocol)")
        pongs.add_metric([], stats.pongs)
        yield pongs
        frames_in = CounterMetricFamily(
            "postoffice_gateway_frames_in", "Frames received from clients"
        )
        frames_in.add_metric([], stats.frames_in)
        yield frames_in
        frames_out = CounterMetricFamily(
            "postoffice_gateway_frames_out", "Text frames written to clients"
        )
        frames_out.add_metric([], stats.frames_out)
        yield frames_out


#: Collectors whose metrics are read at scrape time (docs/metrics.md lists theirs too).
COLLECTORS: tuple[Collector, ...] = (_ProtocolCollector(),)
for _collector in COLLECTORS:
    REGISTRY.register(_collector)

# Latencies, in seconds. Where each clock starts and stops is part of the metric's meaning
# (docs/metrics.md); the code that observes them says so at the observation.
FRAME_TO_REDIS_SECONDS = Histogram(
    "postoffice_gateway_frame_to_redis_seconds",
    "From a client's message frame read off the socket to its publish (or queue) round trip "
    "with Redis completed or the breaker's promise, by outcome (published, queued); frames "
    "refused (invalid, rate limited, unavailable) are not observed",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
DELIVERY_WRITE_SECONDS = Histogram(
    "postoffice_gateway_delivery_write_seconds",
    "From an agent's delivery received from Redis pub/sub by this gateway to its frame "
    "written to the client's socket (queueing in the per-connection buffer included), by kind "
    "(connection: to the connection or its user; broadcast)",
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
