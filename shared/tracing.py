"""OpenTelemetry: one tracer provider per process, W3C ``traceparent`` on every message.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` unset nothing is exported and no span objects are built on
the hot path: :func:`message_traceparent` then only continues the caller's trace id (or starts
a new one) with a fresh span id, which is all agents need to correlate. With it set, spans go to
the collector over OTLP/HTTP in batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from shared.protocol import is_valid_traceparent, new_traceparent

__all__ = ["message_traceparent", "tracing_context"]

log = logging.getLogger(__name__)


def message_traceparent(parent: str | None = None) -> str:
    """A traceparent for a new hop: same trace as ``parent`` when it is valid, new span id."""
    if parent and is_valid_traceparent(parent):
        version, trace_id, _span, flags = parent.split("-")
        return f"{version}-{trace_id}-{os.urandom(8).hex()}-{flags}"
    return new_traceparent()


def tracing_context(
    service: str, instance: str, endpoint: str | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context installing an OTLP/HTTP exporting tracer provider when ``endpoint``
    is set, and flushing it at shutdown."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if not endpoint:
            yield
            return
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(
            resource=Resource.create({"service.name": service, "service.instance.id": instance})
        )
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces"))
        )
        trace.set_tracer_provider(provider)
        log.info("tracing to %s", endpoint)
        try:
            yield
        finally:
            provider.shutdown()

    return ctx
