"""Prometheus metrics of the eviction worker (served on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ALREADY_GONE",
    "CONSUMERS_REMOVED",
    "DEAD_GATEWAYS",
    "DEAD_LETTERED",
    "DEAD_LETTERS",
    "EVICTIONS",
    "GROUP_CONSUMERS",
    "GROUP_LAG",
    "GROUP_PENDING",
    "LAST_PASS",
    "OLDEST_PENDING_AGE",
    "PASS_DURATION",
    "PASS_ERRORS",
    "REDELIVERIES",
    "STALE_FOUND",
    "STREAM_LENGTH",
    "TRAFFIC_COP_PENDING",
    "TRAFFIC_COP_REPORTS",
    "UNREGISTER_ERRORS",
]

EVICTIONS = Counter(
    "postoffice_eviction_evictions_total",
    "Connections this worker removed from the registry, by reason (idle, gateway_lost)",
    ["reason"],
)
STALE_FOUND = Counter(
    "postoffice_eviction_stale_found_total",
    "Ids read from the stale end of the last-seen index",
)
ALREADY_GONE = Counter(
    "postoffice_eviction_already_gone_total",
    "Stale ids with no record left (another worker or the gateway removed it, or its TTL ran "
    "out): only their last-seen entry was removed",
)
UNREGISTER_ERRORS = Counter(
    "postoffice_eviction_unregister_errors_total",
    "Unregister scripts that failed for one id (a corrupt record); the id is skipped",
)
DEAD_GATEWAYS = Counter(
    "postoffice_eviction_dead_gateways_cleaned_total",
    "Gateway instances whose liveness key expired and whose records were removed",
)
REDELIVERIES = Counter(
    "postoffice_stream_redeliveries_total",
    "Unacked messages handed to another consumer after ACK_TIMEOUT_SECONDS, by channel and group",
    ["channel", "group"],
)
DEAD_LETTERED = Counter(
    "postoffice_stream_dead_lettered_total",
    "Messages moved to the dead letters after MAX_DELIVERIES deliveries, by channel and group",
    ["channel", "group"],
)
CONSUMERS_REMOVED = Counter(
    "postoffice_stream_consumers_removed_total",
    "Stale consumers (holding nothing, silent for CONSUMER_STALE_SECONDS) removed",
)
STREAM_LENGTH = Gauge(
    "postoffice_stream_length", "Entries in a channel's stream (XLEN), by channel", ["channel"]
)
DEAD_LETTERS = Gauge(
    "postoffice_stream_dead_letters", "Entries in a channel's dead-letter stream", ["channel"]
)
GROUP_LAG = Gauge(
    "postoffice_stream_group_lag",
    "Entries of the channel's stream the group has not read yet, by channel and group",
    ["channel", "group"],
)
GROUP_PENDING = Gauge(
    "postoffice_stream_group_pending",
    "Entries delivered to the group's consumers and not acked yet, by channel and group",
    ["channel", "group"],
)
GROUP_CONSUMERS = Gauge(
    "postoffice_stream_group_consumers", "Consumers of the group", ["channel", "group"]
)
OLDEST_PENDING_AGE = Gauge(
    "postoffice_stream_oldest_pending_age_seconds",
    "Age of the group's oldest delivered-but-unacked entry (0: none), by channel and group",
    ["channel", "group"],
)
PASS_DURATION = Histogram(
    "postoffice_eviction_pass_duration_seconds",
    "Wall time of one pass (stale connections, dead gateways, streams)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PASS_ERRORS = Counter(
    "postoffice_eviction_pass_errors_total",
    "Passes cut short by an error (Redis unavailable ...); the next pass retries",
)
LAST_PASS = Gauge(
    "postoffice_eviction_last_pass_timestamp_seconds",
    "Unix time at which the last complete pass ended",
)
TRAFFIC_COP_REPORTS = Counter(
    "postoffice_eviction_traffic_cop_reports_total",
    "Reports of evicted connections to Traffic Cop, by outcome "
    "(unregistered, unknown, rejected, unavailable, dropped)",
    ["outcome"],
)
TRAFFIC_COP_PENDING = Gauge(
    "postoffice_eviction_traffic_cop_pending",
    "Evicted connections waiting to be reported to Traffic Cop",
)
