"""OpenTelemetry: one tracer provider per process, W3C ``traceparent`` on every message.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` unset nothing is exported and no span objects are built on
the hot path: :func:`message_traceparent` then only continues the caller's trace id (or starts
a new one) with a fresh span id, which is all agents need to correlate, and
:func:`tracing_middleware` / :func:`client_trace_config` cost one ``None`` check.

With it set, :func:`tracing_context` installs a tracer provider exporting over OTLP/HTTP in
batches (``OTEL_BSP_*`` and ``OTEL_TRACES_SAMPLER*`` are honoured, as the SDK reads them), and:

* every HTTP request except ``/health``, ``/ready``, ``/metrics`` and WebSocket upgrades gets a
  SERVER span that continues the caller's ``traceparent`` header;
* every outgoing request of a client session built with :func:`client_trace_config` gets a
  CLIENT span and carries ``traceparent``;
* every :func:`message_traceparent` records a PRODUCER span (``message publish``), child of the
  message's parent or of the current span, whose id is the one returned — so an agent that
  continues the message's ``traceparent`` joins the same trace.

The provider is kept here rather than installed as OpenTelemetry's global one, because the
global can be set only once per process and tests build many apps in one process.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web

from shared.protocol import is_valid_traceparent, new_traceparent

__all__ = [
    "client_trace_config",
    "message_traceparent",
    "tracing_context",
    "tracing_enabled",
    "tracing_middleware",
]

log = logging.getLogger(__name__)

#: Operational routes are polled every few seconds by Consul, Prometheus and load balancers;
#: tracing them would drown the traces that matter.
UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class _Tracing:
    tracer: Any  # opentelemetry.trace.Tracer
    propagator: Any  # TraceContextTextMapPropagator
    trace: Any  # the opentelemetry.trace module, imported lazily


_active: _Tracing | None = None


def tracing_enabled() -> bool:
    return _active is not None


def message_traceparent(parent: str | None = None) -> str:
    """A traceparent for a new hop: same trace as ``parent`` when it is valid, new span id."""
    t = _active
    if t is None:
        if parent and is_valid_traceparent(parent):
            version, trace_id, _span, flags = parent.split("-")
            return f"{version}-{trace_id}-{os.urandom(8).hex()}-{flags}"
        return new_traceparent()
    # Parent given: continue it; otherwise continue whatever span is current (the HTTP request
    # being served), or start a new trace.
    context = (
        t.propagator.extract({"traceparent": parent})
        if parent and is_valid_traceparent(parent)
        else None
    )
    span = t.tracer.start_span("message publish", context=context, kind=t.trace.SpanKind.PRODUCER)
    span.end()
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A SERVER span per HTTP request while tracing is on; a pass-through otherwise."""
    t = _active
    if (
        t is None
        or request.path in UNTRACED_PATHS
        or request.headers.get("Upgrade", "").lower() == "websocket"
    ):
        return await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    context = t.propagator.extract(request.headers)
    attributes = {
        "http.request.method": request.method,
        "http.route": route,
        "url.path": request.path,
        "server.address": request.host,
    }
    with t.tracer.start_as_current_span(
        f"{request.method} {route}",
        context=context,
        kind=t.trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _set_status(t, span, exc.status)
            raise
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(t.trace.Status(t.trace.StatusCode.ERROR, type(exc).__name__))
            raise
        _set_status(t, span, response.status)
        return response


def _set_status(t: _Tracing, span: Any, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(t.trace.Status(t.trace.StatusCode.ERROR))


def client_trace_config() -> aiohttp.TraceConfig:
    """An aiohttp ``TraceConfig`` for ``ClientSession(trace_configs=[...])``: while tracing is
    on, a CLIENT span per request and its ``traceparent`` header on the request."""

    async def on_start(
        _s: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        t = _active
        ctx.span = None
        if t is None:
            return
        span = t.tracer.start_span(
            f"{params.method} {params.url.host}{params.url.path}",
            kind=t.trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": params.method,
                "url.full": str(params.url.with_query(None)),
            },
        )
        ctx.span = span
        t.propagator.inject(params.headers, context=t.trace.set_span_in_context(span))

    async def on_end(
        _s: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        span = getattr(ctx, "span", None)
        t = _active
        if span is not None:
            if t is not None:
                _set_status(t, span, params.response.status)
            span.end()

    async def on_error(
        _s: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams
    ) -> None:
        span = getattr(ctx, "span", None)
        t = _active
        if span is not None:
            if t is not None:
                span.record_exception(params.exception)
                span.set_status(
                    t.trace.Status(t.trace.StatusCode.ERROR, type(params.exception).__name__)
                )
            span.end()

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_start)
    config.on_request_end.append(on_end)
    config.on_request_exception.append(on_error)
    return config


def _traces_url(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def tracing_context(
    service: str, instance: str, endpoint: str | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context installing an OTLP/HTTP exporting tracer provider when ``endpoint``
    is set, and flushing it at shutdown."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        global _active
        if not endpoint:
            yield
            return
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        provider = TracerProvider(
            resource=Resource.create({"service.name": service, "service.instance.id": instance})
        )
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=_traces_url(endpoint)))
        )
        previous = _active
        _active = _Tracing(
            tracer=provider.get_tracer("post-office"),
            propagator=TraceContextTextMapPropagator(),
            trace=trace,
        )
        log.info("tracing to %s", _traces_url(endpoint))
        try:
            yield
        finally:
            _active = previous
            # shutdown() exports what is left with blocking HTTP; keep it off the event loop.
            await asyncio.to_thread(provider.shutdown)

    return ctx
