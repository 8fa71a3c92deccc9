"""What every service's Prometheus metrics share: the latency buckets and the exposition.

Latencies are in seconds (Prometheus' base unit). :data:`LATENCY_BUCKETS` resolve from 100 µs
(a frame handed to a local Redis) to 10 s (an agent that thinks for a while), roughly three
buckets per decade, so ``histogram_quantile`` gives a p50 and a p99 that mean something at
either end without a series per bucket too many (16 buckets).
"""

from __future__ import annotations

from prometheus_client.aiohttp import make_aiohttp_handler

__all__ = ["LATENCY_BUCKETS", "metrics_handler"]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: ``GET /metrics``: prometheus_client's own aiohttp handler (content negotiation with
#: OpenMetrics, gzip when asked) serving the process-wide default registry.
metrics_handler = make_aiohttp_handler()
