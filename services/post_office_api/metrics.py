"""Prometheus metrics of the Post Office API (``postoffice_api_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

__all__ = [
    "DEAD_LETTERS_REQUEUED",
    "DELIVERIES",
    "GROUP_ACKS",
    "GROUP_CONSUMERS",
    "GROUP_EVENTS",
    "PUBLISHED",
    "REQUESTS",
    "REQUEST_SECONDS",
    "SSE_DROPPED",
    "SSE_EVENTS",
    "SSE_INVALID",
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
    "API request duration in seconds by operation (the route name, the OpenAPI operationId), "
    "from the request reaching the API's middleware to its response; SSE streams excluded",
    ["operation"],
    buckets=LATENCY_BUCKETS,
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
TRAFFIC_COP_REPORTS = Counter(
    "postoffice_api_traffic_cop_reports_total",
    "stale connections reported to Traffic Cop, by outcome (sent, unknown: Traffic Cop did not "
    "know it, failed, dropped: the report queue was full)",
    ["outcome"],
)
GROUP_CONSUMERS = Gauge("postoffice_api_group_consumers", "open group-consumer SSE streams")
GROUP_EVENTS = Counter(
    "postoffice_api_group_events_total", "stream entries sent on group-consumer SSE streams"
)
GROUP_ACKS = Counter(
    "postoffice_api_group_acks_total", "stream entries acked through the API (pending ones)"
)
DEAD_LETTERS_REQUEUED = Counter(
    "postoffice_api_dead_letters_requeued_total", "dead letters appended to their stream again"
)
