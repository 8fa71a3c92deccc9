"""Prometheus metrics of the Post Office API (``postoffice_api_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "DELIVERIES",
    "PUBLISHED",
    "REQUESTS",
    "REQUEST_SECONDS",
    "SSE_DROPPED",
    "SSE_EVENTS",
    "SSE_INVALID",
    "SSE_REQUEUED",
    "SSE_SUBSCRIBERS",
    "STALE_REMOVED",
    "TRAFFIC_COP_REPORTS",
]

REQUESTS = Counter(
    "postoffice_api_requests_total",
    "API requests by operation and status",
    ["operation", "status"],
)
REQUEST_SECONDS = Histogram(
    "postoffice_api_request_seconds",
    "API request latency by operation (SSE streams excluded)",
    ["operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PUBLISHED = Counter(
    "postoffice_api_channel_messages_total",
    "messages published to agent channels, by outcome (published, queued, refused)",
    ["outcome"],
)
DELIVERIES = Counter(
    "postoffice_api_deliveries_total",
    "delivery calls by kind (connection, user, broadcast, close) and outcome",
    ["kind", "outcome"],
)
STALE_REMOVED = Counter(
    "postoffice_api_stale_connections_removed_total",
    "registry records removed because no gateway held the connection any more",
)
SSE_SUBSCRIBERS = Gauge("postoffice_api_sse_subscribers", "open SSE streams")
SSE_EVENTS = Counter("postoffice_api_sse_events_total", "events handed to SSE subscribers")
SSE_DROPPED = Counter(
    "postoffice_api_sse_dropped_subscribers_total",
    "SSE subscribers dropped by the server, by reason",
    ["reason"],
)
SSE_INVALID = Counter(
    "postoffice_api_sse_invalid_messages_total",
    "messages on agent channels not forwarded to SSE streams, by reason (not_json_object, "
    "too_large)",
    ["reason"],
)
SSE_REQUEUED = Counter(
    "postoffice_api_sse_requeued_events_total",
    "events buffered for SSE streams that left, pushed back to the agent queue (requeued) or "
    "not (lost: Redis refused)",
    ["outcome"],
)
TRAFFIC_COP_REPORTS = Counter(
    "postoffice_api_traffic_cop_reports_total",
    "stale connections reported to Traffic Cop, by outcome (sent, unknown: Traffic Cop did not "
    "know it, failed, dropped: the report queue was full)",
    ["outcome"],
)
