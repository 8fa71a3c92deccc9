"""A small OTLP/HTTP trace receiver: it stands in for the OpenTelemetry collector in tests.

There is no collector binary here, so this server plays the part the compose stack gives
``otel-collector`` (``compose/otel/collector.yaml``, its ``otlp`` receiver over HTTP on 4318).
It follows the OTLP/HTTP specification
(https://opentelemetry.io/docs/specs/otlp/#otlphttp) for binary Protobuf traces:

* ``POST /v1/traces`` with ``Content-Type: application/x-protobuf``; the body is an
  ``ExportTraceServiceRequest``, optionally gzipped (``Content-Encoding: gzip``);
* success is ``200`` with an ``ExportTraceServiceResponse`` in the same encoding (empty here:
  nothing was rejected);
* a body that cannot be decoded is ``400``; another content type is ``415`` (JSON-encoded OTLP
  exists, but the services export Protobuf, so only that is accepted); another method ``405``.

Parsing uses the official ``opentelemetry-proto`` messages. Every span is recorded with its
resource attributes (``service.name``, ``service.instance.id``), so a test can tell which
process sent it, and ``requests`` counts every export that arrived, accepted or not.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

__all__ = ["OtlpReceiver", "ReceivedSpan"]

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, ids as lowercase hex (as in a ``traceparent``)."""

    name: str
    kind: str  # SPAN_KIND_SERVER, SPAN_KIND_PRODUCER, ...
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def instance(self) -> str:
        return str(self.resource.get("service.instance.id", ""))


@dataclass
class OtlpReceiver:
    """Serve with ``await receiver.start()``; ``receiver.url`` is the OTLP base URL (what
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes); ``await receiver.stop()`` at the end."""

    host: str = "127.0.0.1"
    port: int = 0
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    rejected: int = 0
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_route("*", "/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        # Port 0: the kernel picked a free one; no window for another process to take it.
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- queries ------------------------------------------------------------------------------

    def find(self, **match: Any) -> list[ReceivedSpan]:
        """Spans whose fields (``name``, ``trace_id``, ``service``, ...) equal ``match``."""
        return [s for s in self.spans if all(getattr(s, k) == v for k, v in match.items())]

    def services(self) -> set[tuple[str, str]]:
        """(service.name, service.instance.id) of every process that exported spans."""
        return {(s.service, s.instance) for s in self.spans}

    # -- OTLP/HTTP ----------------------------------------------------------------------------

    async def _traces(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.method != "POST":
            self.rejected += 1
            return web.Response(status=405, headers={"Allow": "POST"})
        if request.content_type != PROTOBUF:
            self.rejected += 1
            return web.Response(status=415, text=f"only {PROTOBUF} is accepted")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                self.rejected += 1
                return web.Response(status=415, text=f"unsupported Content-Encoding {encoding}")
            export = ExportTraceServiceRequest.FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError) as exc:
            self.rejected += 1
            return web.Response(status=400, text=f"not an ExportTraceServiceRequest: {exc}")
        self.spans.extend(_spans(export))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF
        )


def _spans(export: ExportTraceServiceRequest) -> Iterable[ReceivedSpan]:
    for resource_spans in export.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield ReceivedSpan(
                    name=span.name,
                    kind=Span.SpanKind.Name(span.kind),
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    attributes=_attributes(span.attributes),
                    resource=resource,
                    scope=scope_spans.scope.name,
                )


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)
