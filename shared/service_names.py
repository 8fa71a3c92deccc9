"""The one table of Post Office service names.

Each service has one name, and every place that names a service uses it: the ``service`` field
of its log lines and of its ``/health`` answer, its OpenTelemetry ``service.name``, its Consul
registration (name, tags, HTTP check path) and every Consul lookup of it, and the Prometheus
job its metrics are scraped under (Consul service discovery in ``compose/prometheus``).

The gateway's entry is the plan's (2.2): realms discover gateways in Consul as
``websocket-gateway``, tagged ``websocket``, ``real-time`` and ``post-office``, with an HTTP
check on ``/health/websocket-gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "API_SERVICE",
    "EVICTION_WORKER_SERVICE",
    "GATEWAY_SERVICE",
    "SERVICES",
    "TRAFFIC_COP_SERVICE",
    "ServiceName",
]

#: Every Post Office service carries this tag in Consul.
_TAG = "post-office"


@dataclass(frozen=True, slots=True)
class ServiceName:
    """A service's name, its Consul tags and the path Consul's HTTP check calls."""

    name: str
    tags: tuple[str, ...] = (_TAG,)
    check_path: str = "/health"

    def __str__(self) -> str:
        return self.name


GATEWAY_SERVICE = ServiceName(
    "websocket-gateway",
    ("websocket", "real-time", _TAG),
    "/health/websocket-gateway",
)
API_SERVICE = ServiceName("post-office-api")
TRAFFIC_COP_SERVICE = ServiceName("traffic-cop")
EVICTION_WORKER_SERVICE = ServiceName("eviction-worker")

#: name -> entry, for whoever must check a name it was given (the Consul stand-in of the tests).
SERVICES: Mapping[str, ServiceName] = {
    s.name: s for s in (GATEWAY_SERVICE, API_SERVICE, TRAFFIC_COP_SERVICE, EVICTION_WORKER_SERVICE)
}
