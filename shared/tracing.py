"""OpenTelemetry: one tracer provider per process, W3C ``traceparent`` on every message.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` unset nothing is exported and no span objects are built on
the hot path: :func:`message_traceparent` then only continues the caller's trace id (or starts
a new one) with a fresh span id, which is all agents need to correlate, and
:func:`tracing_middleware` costs one ``None`` check.

With it set, :func:`tracing_context` installs a tracer provider exporting over OTLP/HTTP in
batches (``OTEL_BSP_*`` and ``OTEL_TRACES_SAMPLER*`` are honoured, as the SDK reads them), and:

* every HTTP request except ``/health``, ``/ready``, ``/metrics`` and WebSocket upgrades gets a
  SERVER span that continues the caller's ``traceparent`` header or, without one, the
  ``traceparent`` of its JSON body (the delivery contract: agents put it there);
* calls between services carry no CLIENT spans: the trace travels in the messages'
  ``traceparent`` instead, and Traffic Cop's paths hold session tokens that must never reach a
  span name or attribute;
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from shared.protocol import is_valid_traceparent, new_traceparent

__all__ = [
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


def _continuable(traceparent: object) -> bool:
    """A traceparent W3C lets us continue: well formed, not version ``ff``, and neither id all
    zeros (``is_valid_traceparent`` checks only the shape)."""
    return (
        is_valid_traceparent(traceparent)
        and isinstance(traceparent, str)
        and not traceparent.startswith("ff")
        and traceparent[3:35] != _ZERO_TRACE
        and traceparent[36:52] != _ZERO_SPAN
    )


_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def message_traceparent(
    parent: str | None = None, *, channel: str | None = None, message_id: str | None = None
) -> str:
    """A traceparent for a new hop: same trace as ``parent`` when it is valid, new span id.

    With tracing on, that span id is a PRODUCER span's (``message publish``, with the channel
    and message id as ``messaging.*`` attributes): the agent that continues the traceparent
    hangs its calls under it. Its cost on the gateway's hot path (a few microseconds per
    message; no I/O, the batch processor exports from its own thread) is bounded by the
    sampler: an unsampled span is a bare id, and its ``-00`` flags tell the API not to sample
    the agent's answer either, so a trace is kept or dropped whole (docs/operations.md)."""
    t = _active
    if t is None:
        if parent and _continuable(parent):
            version, trace_id, _span, flags = parent.split("-")
            return f"{version}-{trace_id}-{os.urandom(8).hex()}-{flags}"
        return new_traceparent()
    # Parent given: continue it, unless the span being served (an API request that already
    # continued it) is in the same trace, whose child this publish then is. No parent: the
    # current span (the HTTP request being served), or a new trace.
    context = None
    if parent and _continuable(parent):
        current = t.trace.get_current_span().get_span_context()
        if not (current.is_valid and current.trace_id == int(parent[3:35], 16)):
            context = t.propagator.extract({"traceparent": parent})
    attributes: dict[str, str] = {}
    if channel is not None:
        attributes["messaging.destination.name"] = channel
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    span = t.tracer.start_span(
        "message publish",
        context=context,
        kind=t.trace.SpanKind.PRODUCER,
        attributes=attributes,
    )
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
    context = t.propagator.extract(await _parent_carrier(request))
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


#: Largest body :func:`_parent_carrier` reads to find a ``traceparent`` in.
MAX_PEEKED_BODY = 4 * 1024 * 1024


async def _parent_carrier(request: web.Request) -> Mapping[str, str]:
    """Where the request's parent span is named: the ``traceparent`` header, else (delivery
    bodies carry one, SPEC) the ``traceparent`` of a JSON object body.

    The body is read only for a POST with a JSON content type, no content encoding and a
    declared length within the app's ``client_max_size`` and :data:`MAX_PEEKED_BODY`
    (the cost, one JSON parse more, is paid only while tracing is on and only by callers that
    do not send the header, as the Python client does): aiohttp keeps what
    ``read()`` returned, so the handler reads the same bytes again for free, and a body too
    large, chunked or broken is left alone for the handler to refuse with its own error."""
    header = request.headers.get("traceparent")
    if header is not None and _continuable(header.strip()):
        return request.headers
    length = request.content_length
    if (
        request.method != "POST"
        or request.content_type != "application/json"
        or length is None
        or length > min(request.client_max_size, MAX_PEEKED_BODY)
        # A compressed body may inflate past client_max_size: a 413 is the handler's to give.
        or "Content-Encoding" in request.headers
    ):
        return request.headers
    try:
        body = orjson.loads(await request.read())
    except (orjson.JSONDecodeError, web.HTTPException, aiohttp.ClientError, OSError):
        return request.headers
    value = body.get("traceparent") if isinstance(body, dict) else None
    if isinstance(value, str) and _continuable(value):
        return {"traceparent": value}
    return request.headers


def _set_status(t: _Tracing, span: Any, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(t.trace.Status(t.trace.StatusCode.ERROR))


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
