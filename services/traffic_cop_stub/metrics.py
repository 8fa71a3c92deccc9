"""Traffic Cop's Prometheus metrics (served on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = [
    "CONNECTIONS_REGISTERED",
    "CONNECTIONS_UNREGISTERED",
    "SESSIONS_CREATED",
    "SESSIONS_REVOKED",
    "SESSIONS_VALIDATED",
]

SESSIONS_CREATED = Counter("postoffice_traffic_cop_sessions_created", "Sessions issued")
SESSIONS_VALIDATED = Counter(
    "postoffice_traffic_cop_sessions_validated",
    "Token validations, by result (valid, invalid)",
    ["result"],
)
SESSIONS_REVOKED = Counter("postoffice_traffic_cop_sessions_revoked", "Sessions revoked")
CONNECTIONS_REGISTERED = Counter(
    "postoffice_traffic_cop_connections_registered",
    "Connection registrations, by result (registered, session_invalid)",
    ["result"],
)
CONNECTIONS_UNREGISTERED = Counter(
    "postoffice_traffic_cop_connections_unregistered", "Connections unregistered"
)
