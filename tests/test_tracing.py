"""Tracing end to end: spans really leave the processes over OTLP/HTTP, and one trace runs
from the client's socket to the agent's answer.

Real processes (redis-server, Traffic Cop, gateways, the Post Office API, the guide agent)
export to :class:`tests.otlp_receiver.OtlpReceiver`, which stands in for the OpenTelemetry
collector of the compose stack. ``OTEL_BSP_SCHEDULE_DELAY`` (read by the SDK's
BatchSpanProcessor) is short, so spans arrive within a fraction of a second.

The chain under test (docs/operations.md, "Tracing"):

    client frame → gateway: PRODUCER span "message publish", its id is the agent message's
    traceparent → guide agent → POST /v1/connections/{id}/messages with that traceparent →
    API: SERVER span, child of the gateway's span → the answer on the client's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from shared.tracing import message_traceparent, tracing_context, tracing_enabled
from tests.api_util import auth
from tests.gateway_util import AgentListener, gateway_process, recv, ws_url
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, create_session, live_consumers, wait_for
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

#: W3C Trace Context, version 00: lowercase hex, trace id and span id not all zeros.
W3C = re.compile(r"^00-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})$")
DELIVERY_ROUTE = "POST /v1/connections/{connection_id}/messages"
PUBLISH_ROUTE = "POST /v1/channels/{channel}/messages"

#: What makes a process export quickly; the endpoint itself is set per process.
FAST_EXPORT = {
    "OTEL_BSP_SCHEDULE_DELAY": "50",
    "OTEL_TRACES_SAMPLER": "parentbased_always_on",
}


def otel_env(receiver: OtlpReceiver, traced: bool) -> dict[str, str]:
    """Environment of a process exporting to ``receiver``, or of one with no endpoint: then
    the SDK's own ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` still names the receiver, so a
    process that built an exporter regardless would be caught sending to it."""
    if not traced:
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces",
            **FAST_EXPORT,
        }
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, **FAST_EXPORT}


def parse(traceparent: Any) -> tuple[str, str, str]:
    """(trace id, span id, flags) of a valid W3C traceparent; fails the test otherwise."""
    assert isinstance(traceparent, str), traceparent
    match = W3C.match(traceparent)
    assert match is not None, f"not a valid W3C traceparent: {traceparent!r}"
    return match.group(1), match.group(2), match.group(3)


Stack = Callable[[bool], Awaitable[dict[str, ServiceProcess]]]


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = await OtlpReceiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def start_stack(
    redis_url: str, traffic_cop: ServiceProcess, redis: Redis, receiver: OtlpReceiver
) -> AsyncIterator[Stack]:
    """Start a gateway, the API and the guide agent, exporting to the receiver (or, with
    ``traced`` False, nowhere). Processes start and stop in threads: the receiver lives in
    this event loop and must keep answering their exports, until after they stopped (they
    flush at shutdown; this fixture depends on the receiver's, so it is torn down first)."""
    started: list[ServiceProcess] = []

    async def start(traced: bool) -> dict[str, ServiceProcess]:
        env = otel_env(receiver, traced)
        gateway = gateway_process(
            redis_url, traffic_cop.url, GATEWAY_INSTANCE_ID="gw-traced", **env
        )
        started.append(gateway)
        api = ServiceProcess(
            "services.post_office_api",
            {
                "REDIS_URL": redis_url,
                "GATEWAY_URLS": gateway.url,
                "TRAFFIC_COP_URL": traffic_cop.url,
                "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                "POST_OFFICE_INSTANCE_ID": "api-traced",
                "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.5",
                **env,
            },
        )
        api.env["POST_OFFICE_PORT"] = str(api.port)
        started.append(api)
        await asyncio.gather(asyncio.to_thread(gateway.start), asyncio.to_thread(api.start))
        agent = ServiceProcess(
            "agents.guide",
            {"POST_OFFICE_URL": api.url, "GUIDE_AGENT_BACKOFF_CAP_SECONDS": "0.2", **env},
        )
        started.append(agent)
        agent.start(wait_ready=False)

        async def agent_subscribed() -> bool:
            return await live_consumers(redis) >= 1

        await wait_for(agent_subscribed, 15, what="guide agent subscribed through the API")
        return {"gateway": gateway, "api": api, "agent": agent}

    try:
        yield start
    finally:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in reversed(started)))


async def ask_guide(
    http: aiohttp.ClientSession,
    gateway: ServiceProcess,
    traffic_cop: ServiceProcess,
    listener: AgentListener,
    user: str,
    metadata: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """A client on ``gateway`` asks the guide and gets its answer; the agent message it
    caused (as published on the agent channel) and the client's connection id."""
    token = await asyncio.to_thread(create_session, traffic_cop.url, user)
    payload: dict[str, Any] = {"message": f"hello from {user}"}
    if metadata is not None:
        payload["metadata"] = metadata
    async with http.ws_connect(ws_url(gateway, token)) as ws:
        welcome = await recv(ws)
        assert welcome["type"] == "welcome", welcome
        frame = {"channel": "guide", "intent": "chat", "payload": payload, "id": "1"}
        await ws.send_str(orjson.dumps(frame).decode())
        # The answer may overtake the ack: the ack waits for PUBLISH's reply on the gateway's
        # command connection, the answer comes on its pub/sub connection (docs/protocol.md
        # orders acks and errors among themselves only).
        frames = {f["type"]: f for f in [await recv(ws), await recv(ws)]}
        assert set(frames) == {"ack", "response"}, frames
        ack, answer = frames["ack"], frames["response"]
        assert ack["status"] == "published" and answer["in_reply_to"] == ack["message_id"]
        assert answer["message"] == f"You said: hello from {user}"
        await ws.close()
    sent = [m for m in listener.messages if m.get("message_id") == ack["message_id"]]
    assert len(sent) == 1, listener.messages
    return sent[0], welcome["connection_id"]


async def spans_of(
    receiver: OtlpReceiver, what: str, count: int = 1, **match: Any
) -> list[ReceivedSpan]:
    async def found() -> list[ReceivedSpan]:
        spans = receiver.find(**match)
        return spans if len(spans) >= count else []

    return await wait_for(found, 10, what=f"{what} in the receiver ({match})")


async def test_one_trace_from_socket_to_answer(
    start_stack: Stack, receiver: OtlpReceiver, traffic_cop: ServiceProcess, redis: Redis
) -> None:
    stack = await start_stack(True)
    async with aiohttp.ClientSession() as http, AgentListener(redis, "guide") as listener:
        message, connection_id = await ask_guide(
            http, stack["gateway"], traffic_cop, listener, "alice"
        )
        trace_id, span_id, flags = parse(message["traceparent"])
        # Sampled (parentbased_always_on, no parent); the SDK may also set W3C level 2's
        # "random trace id" bit (0x02).
        assert int(flags, 16) & 1

        # The gateway recorded the publish; its span id is the one the agent message carries.
        (publish,) = await spans_of(
            receiver, "the gateway's publish span", trace_id=trace_id, service="websocket-gateway"
        )
        assert publish.span_id == span_id
        assert publish.kind == "SPAN_KIND_PRODUCER" and publish.name == "message publish"
        assert publish.parent_span_id == ""  # the client sent no traceparent: a new trace
        assert publish.instance == "gw-traced"
        assert publish.attributes["messaging.destination.name"] == "guide"
        assert publish.attributes["messaging.message.id"] == message["message_id"]

        # The guide answered with that traceparent: the API's server span for the delivery
        # is a child of the gateway's span, in the same trace.
        (delivery,) = await spans_of(
            receiver,
            "the API's span for the guide's delivery",
            trace_id=trace_id,
            service="post-office-api",
        )
        assert delivery.name == DELIVERY_ROUTE and delivery.kind == "SPAN_KIND_SERVER"
        assert delivery.parent_span_id == span_id
        assert delivery.instance == "api-traced"
        assert delivery.attributes["http.response.status_code"] == 202
        assert delivery.attributes["url.path"] == f"/v1/connections/{connection_id}/messages"

        # A client that sends its own traceparent (payload.metadata) gets its trace continued.
        client_trace, client_span = os.urandom(16).hex(), os.urandom(8).hex()
        message, _ = await ask_guide(
            http,
            stack["gateway"],
            traffic_cop,
            listener,
            "bob",
            {"traceparent": f"00-{client_trace}-{client_span}-01"},
        )
        trace_id, span_id, _flags = parse(message["traceparent"])
        assert trace_id == client_trace and span_id != client_span
        (publish,) = await spans_of(
            receiver, "the publish span", trace_id=client_trace, service="websocket-gateway"
        )
        assert publish.span_id == span_id and publish.parent_span_id == client_span
        (delivery,) = await spans_of(
            receiver, "the delivery span", trace_id=client_trace, service="post-office-api"
        )
        assert delivery.name == DELIVERY_ROUTE and delivery.parent_span_id == span_id

    # Health checks and readiness polls are not traced.
    assert not [s for s in receiver.spans if s.attributes.get("url.path") in ("/ready", "/health")]
    assert receiver.rejected == 0


async def test_api_takes_the_parent_from_the_body_or_the_header(
    start_stack: Stack, receiver: OtlpReceiver, traffic_cop: ServiceProcess, redis: Redis
) -> None:
    stack = await start_stack(True)
    api = stack["api"]
    token = await asyncio.to_thread(create_session, traffic_cop.url, "carol")
    async with (
        aiohttp.ClientSession(headers=auth()) as http,
        http.ws_connect(ws_url(stack["gateway"], token)) as ws,
        AgentListener(redis, "guide") as listener,
    ):
        connection_id = (await recv(ws))["connection_id"]
        url = f"{api.url}/v1/connections/{connection_id}/messages"

        async def deliver(body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            async with http.post(url, json=body, headers=headers) as r:
                assert r.status == 202, await r.text()
            assert await recv(ws) == body["message"]

        # The body's traceparent (the delivery contract; what non-HTTP-aware callers send).
        by_body = (os.urandom(16).hex(), os.urandom(8).hex())
        await deliver({"message": {"n": 1}, "traceparent": f"00-{by_body[0]}-{by_body[1]}-01"})
        (span,) = await spans_of(receiver, "body-parented delivery", trace_id=by_body[0])
        assert span.name == DELIVERY_ROUTE and span.parent_span_id == by_body[1]

        # The W3C header, for callers whose HTTP stack propagates context itself.
        by_header = (os.urandom(16).hex(), os.urandom(8).hex())
        await deliver(
            {"message": {"n": 2}}, {"traceparent": f"00-{by_header[0]}-{by_header[1]}-01"}
        )
        (span,) = await spans_of(receiver, "header-parented delivery", trace_id=by_header[0])
        assert span.parent_span_id == by_header[1]

        # An invalid one in the body is ignored (a new trace), never an error.
        await deliver(
            {"message": {"n": 3}, "traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"}
        )

        # Publishing for an agent: the message's traceparent is the API's publish span, a child
        # of the request's server span, in the caller's trace.
        caller = (os.urandom(16).hex(), os.urandom(8).hex())
        async with http.post(
            f"{api.url}/v1/channels/guide/messages",
            json={"message": {"text": "hi"}, "traceparent": f"00-{caller[0]}-{caller[1]}-01"},
        ) as r:
            assert r.status == 202, await r.text()
            message_id = (await r.json())["message_id"]
        message = await wait_for(
            lambda: [m for m in listener.messages if m.get("message_id") == message_id],
            what="the published agent message",
        )
        trace_id, span_id, _flags = parse(message[0]["traceparent"])
        assert trace_id == caller[0]
        server, publish = sorted(
            await spans_of(receiver, "publish and its request", 2, trace_id=caller[0]),
            key=lambda s: s.kind != "SPAN_KIND_SERVER",
        )
        assert server.name == PUBLISH_ROUTE and server.parent_span_id == caller[1]
        assert publish.kind == "SPAN_KIND_PRODUCER" and publish.span_id == span_id
        assert publish.parent_span_id == server.span_id
    assert receiver.rejected == 0


async def test_without_an_endpoint_nothing_is_exported(
    start_stack: Stack, receiver: OtlpReceiver, traffic_cop: ServiceProcess, redis: Redis
) -> None:
    stack = await start_stack(False)
    async with aiohttp.ClientSession() as http, AgentListener(redis, "guide") as listener:
        message, _ = await ask_guide(http, stack["gateway"], traffic_cop, listener, "dave")
        parse(message["traceparent"])  # agents still get a valid trace context
    # A tracer provider would flush at shutdown: stop everything, then nothing may have come.
    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in stack.values()))
    assert receiver.requests == 0, receiver.spans


def exporter_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]


async def test_tracing_context_starts_an_exporter_only_with_an_endpoint(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    before = exporter_threads()
    app = web.Application()
    async with running(tracing_context("test", "t-1", None), app):
        assert not tracing_enabled() and exporter_threads() == before
        parse(message_traceparent())
    assert receiver.requests == 0

    async with running(tracing_context("test", "t-2", receiver.url), app):
        assert tracing_enabled() and len(exporter_threads()) == len(before) + 1
        traceparent = message_traceparent(channel="guide", message_id="msg_1")
        trace_id, span_id, _ = parse(traceparent)
        await spans_of(receiver, "an in-process span", trace_id=trace_id, span_id=span_id)
    assert not tracing_enabled() and exporter_threads() == before
    assert receiver.services() == {("test", "t-2")}


@contextlib.asynccontextmanager
async def running(
    ctx: Callable[[web.Application], AsyncIterator[None]], app: web.Application
) -> AsyncIterator[None]:
    """One cleanup context, run as aiohttp runs it at start-up and at cleanup."""
    steps = ctx(app)
    await anext(steps)
    try:
        yield
    finally:
        await anext(steps, None)
