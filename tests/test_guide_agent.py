"""The guide agent: its answers (pure), and the real agent process against a real API process,
answering a message appended to the guide stream as a gateway would (the publish script), and
acking it in the same call."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime

import orjson
import pytest
from redis.asyncio import Redis

from agents.guide.agent import answer
from shared import redis_names as names
from shared.protocol import DEFAULT_CHANNELS, agent_message, new_message_id, parse_client_frame
from shared.registry import ConnectionRecord, PublishResult, Registry
from tests.api_util import Listener, guide_process, listening
from tests.helpers import (
    RedisServer,
    ServiceProcess,
    free_port,
    live_consumers,
    timeout,
    wait_for,
    wait_for_sync,
)


def test_answers() -> None:
    assert "pillar:content" in answer("help", DEFAULT_CHANNELS)
    assert "time" in answer(" HELP ", DEFAULT_CHANNELS)
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert answer("time", DEFAULT_CHANNELS, now=moment) == "It is 2026-01-02T03:04:05Z."
    assert answer("hello there", DEFAULT_CHANNELS) == "You said: hello there"
    assert "help" in answer("   ", DEFAULT_CHANNELS)
    # A long echo is cut so that the reply stays under the API's body limit.
    long = answer("x" * 100_000, DEFAULT_CHANNELS, max_chars=50)
    assert len(long) == 50 and long.endswith("…")
    assert len(answer("é" * 100_000, DEFAULT_CHANNELS).encode()) < 65536 - 1024


def api_process(redis_url: str, port: int | None = None) -> ServiceProcess:
    service = ServiceProcess(
        "services.post_office_api",
        {
            "REDIS_URL": redis_url,
            "POST_OFFICE_TRAFFIC_COP_URL": "",
            "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.2",
        },
        port=port,
    )
    service.env["POST_OFFICE_PORT"] = str(service.port)
    return service


@pytest.fixture
def stack(redis_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    port = free_port()
    api = api_process(redis_url, port).start()
    agent = guide_process(api.url, GUIDE_AGENT_CONSUMER=CONSUMER).start(wait_ready=False)
    yield api, agent
    agent.stop()
    api.stop()


CONSUMER = "guide-test"


async def agent_listening(redis: Redis, since: float | None = None) -> bool:
    return await live_consumers(redis, "guide", since) == 1


async def pending(redis: Redis) -> int:
    return int((await redis.xpending(names.stream("guide"), "guide"))["pending"])


async def ask(
    redis: Redis, gateway: Listener, cid: str, text: str, traceparent: str | None = None
) -> dict[str, object]:
    envelope = parse_client_frame(
        orjson.dumps({"channel": "guide", "payload": {"message": text, "conversation_id": "c1"}})
    )
    msg = agent_message(
        envelope,
        message_id=new_message_id(),
        connection_id=cid,
        user_id="alice",
        gateway_instance="gw-1",
    )
    data = msg.to_bytes()
    if traceparent is not None:
        data = orjson.dumps({**orjson.loads(data), "traceparent": traceparent})
    assert (
        await Registry(redis, 60).publish_or_queue("guide", data, 1000) == PublishResult.PUBLISHED
    )
    channel, frame = await gateway.next(10)
    assert channel == names.connection_messages(cid)
    reply: dict[str, object] = orjson.loads(frame)
    assert reply["in_reply_to"] == msg.message_id
    return reply


async def test_guide_agent_answers_and_survives_an_api_restart(
    redis: Redis, redis_server: RedisServer, stack: tuple[ServiceProcess, ServiceProcess]
) -> None:
    api, agent = stack
    cid = "ws_alice_0000beef"
    await Registry(redis, 60).register(
        ConnectionRecord(cid, "alice", "sess_0123456789abcdef", "gw-1", time.time(), ("guide",))
    )
    await redis.set(names.gateway_instance("gw-1"), "1", ex=60)
    await wait_for(lambda: agent_listening(redis), 15, what="guide agent subscribed")
    async with listening(redis, names.connection_messages(cid)) as gateway:
        reply = await ask(redis, gateway, cid, "hello")
        assert reply == {
            "type": "response",
            "agent_type": "guide",
            "in_reply_to": reply["in_reply_to"],
            "message": "You said: hello",
            "conversation_id": "c1",
        }
        assert "pillar:insights" in str((await ask(redis, gateway, cid, "help"))["message"])
        assert str((await ask(redis, gateway, cid, "time"))["message"]).startswith("It is ")

        # Every answer acked its message in the same call.
        await wait_for(lambda: _is(pending(redis), 0), what="answers acked")
        # Garbage and a 3 MB message in its stream do not kill it: the next one is answered
        # (the garbage is not acked: it ends in the dead letters after MAX_DELIVERIES).
        stream = names.stream("guide")
        await redis.xadd(stream, {"data": b"\x00not json at all"})
        await redis.xadd(stream, {"data": b"[1, 2, 3]"})
        await redis.xadd(stream, {"data": orjson.dumps({"message": "not an object"})})
        await redis.xadd(
            stream, {"data": b'{"message": {"payload": {"message": "' + b"y" * 3_000_000 + b'"}}}'}
        )
        reply = await ask(redis, gateway, cid, "still there?")
        assert reply["message"] == "You said: still there?"
        # An invalid traceparent does not cost the answer (W3C: restart the trace).
        reply = await ask(redis, gateway, cid, "traced", traceparent="00-not-a-trace")
        assert reply["message"] == "You said: traced"

        # The API restarts: the agent re-subscribes with backoff and answers again.
        assert api.stop() == 0
        restarted = time.time()
        api = api_process(redis_server.url, api.port).start()
        stack_api = api
        try:
            await wait_for(lambda: agent_listening(redis, restarted), 15, what="agent back")
            reply = await ask(redis, gateway, cid, "again")
            assert reply["message"] == "You said: again"
        finally:
            stack_api.stop()
    assert agent.stop() == 0, agent.log()[-3000:]
    assert "dev-smart_city" not in agent.log()
    assert "Traceback" not in agent.log(), agent.log()[-3000:]


def test_a_refused_realm_key_stops_the_agent_with_1(redis_url: str) -> None:
    api = api_process(redis_url).start()
    try:
        agent = ServiceProcess(
            "agents.guide",
            {"POST_OFFICE_URL": api.url, "GUIDE_AGENT_REALM_KEY": "wrong-key"},
        ).start(wait_ready=False)
        assert agent.proc is not None
        wait_for_sync(lambda: agent.proc is not None and agent.proc.poll() is not None, 15)
        log = agent.log()
        assert agent.stop() == 1
        assert "unauthorized" in log and "wrong-key" not in log
    finally:
        api.stop()


async def test_answers_go_out_concurrently_and_a_slow_one_does_not_stall_the_rest() -> None:
    """The agent answers while an earlier answer is still in flight (bounded): a stand-in API
    holds the first delivery until the second one has arrived."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from agents.guide.agent import GuideAgent
    from post_office_client import PostOfficeClient
    from tests.helpers import timeout

    second_arrived = asyncio.Event()
    order: list[str] = []

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n, cid in enumerate(("ws_slow_00000001", "ws_fast_00000002")):
            msg = {
                "message_id": f"m{n}",
                "connection_id": cid,
                "message": {"payload": {"message": "hi"}},
                "stream_id": f"1-{n}",
                "deliveries": 1,
            }
            await resp.write(b"data: " + orjson.dumps(msg) + b"\r\n\r\n")
        await asyncio.sleep(timeout(30))
        return resp

    async def deliver(request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid.startswith("ws_slow"):
            await asyncio.wait_for(second_arrived.wait(), timeout(10))
        else:
            second_arrived.set()
        order.append(cid)
        assert (await request.json())["ack"]["ids"] == [f"1-{int(cid[-1]) - 1}"]
        return web.json_response({"delivered": 1, "acked": 1}, status=202)

    app = web.Application()
    app.router.add_get("/v1/channels/guide/groups/guide/events", events)
    app.router.add_post("/v1/connections/{cid}/messages", deliver)
    server = TestServer(app)
    await server.start_server()
    try:
        async with PostOfficeClient(str(server.make_url("")), "k") as po:
            agent = GuideAgent(
                po, "guide", DEFAULT_CHANNELS, backoff_min=0.05, backoff_max=0.1, idle_timeout=30
            )
            task = asyncio.create_task(agent.run())
            await wait_for(lambda: agent.answered == 2, 10, what="both answered")
            task.cancel()
            await asyncio.wait([task])
        assert order == ["ws_fast_00000002", "ws_slow_00000001"]
    finally:
        await server.close()


async def _is(value: Awaitable[int], n: int) -> bool:
    return await value == n


async def test_a_busy_sender_in_the_same_realm_costs_the_guide_no_answer(
    redis: Redis, redis_url: str
) -> None:
    """The realm's rate limit is shared by every caller with its key. A busy sender empties the
    bucket in bursts; the guide's answers get 429 with a whole-second ``Retry-After`` and are
    retried within the delivery deadline: every message is answered, none dropped."""
    import asyncio

    import aiohttp

    from tests.api_util import auth

    api = api_process(redis_url)
    api.env.update(
        {"POST_OFFICE_RATE_LIMIT_PER_SECOND": "10", "POST_OFFICE_RATE_LIMIT_BURST": "10"}
    )
    api.start()
    agent = guide_process(
        api.url,
        GUIDE_AGENT_DELIVERY_DEADLINE_SECONDS=str(timeout(30)),
        GUIDE_AGENT_RETRY_BASE_SECONDS="0.05",
        GUIDE_AGENT_RETRY_CAP_SECONDS="0.5",
    ).start(wait_ready=False)
    cid = "ws_alice_0000beef"
    sent = answered = refused_busy = 0
    stop = asyncio.Event()

    async def busy_sender() -> None:
        # Thirty calls at once every half second: the bucket (10/s, burst 10) is empty after
        # each burst and refills in between, as a bursty agent of the same realm would leave it.
        nonlocal refused_busy
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                calls = [
                    http.get(f"{api.url}/v1/connections/{cid}", headers=auth()) for _ in range(30)
                ]
                for resp in await asyncio.gather(*calls):
                    if resp.status == 429:
                        refused_busy += 1
                    resp.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

    try:
        await Registry(redis, 60).register(
            ConnectionRecord(cid, "alice", "sess_0123456789abcdef", "gw-1", time.time(), ("guide",))
        )
        await redis.set(names.gateway_instance("gw-1"), "1", ex=120)
        await wait_for(lambda: agent_listening(redis), 15, what="guide agent subscribed")
        busy = asyncio.create_task(busy_sender())
        try:
            async with listening(redis, names.connection_messages(cid)) as gateway:
                wanted: set[str] = set()
                for n in range(20):
                    msg = agent_message(
                        parse_client_frame(
                            orjson.dumps({"channel": "guide", "payload": {"message": f"m{n}"}})
                        ),
                        message_id=new_message_id(),
                        connection_id=cid,
                        user_id="alice",
                        gateway_instance="gw-1",
                    )
                    assert (
                        await Registry(redis, 60).publish_or_queue("guide", msg.to_bytes(), 1000)
                        == PublishResult.PUBLISHED
                    )
                    wanted.add(msg.message_id)
                    sent += 1
                    await asyncio.sleep(0.05)  # a chatty user, spread over the bursts
                while wanted:
                    _, frame = await gateway.next(40)
                    reply = orjson.loads(frame)
                    if reply["in_reply_to"] in wanted:
                        wanted.discard(reply["in_reply_to"])
                        answered += 1
        finally:
            stop.set()
            await busy
        log = agent.log()
        retried = log.count("429 rate_limited")
        print(
            f"sent={sent} answered={answered} lost={sent - answered} "
            f"guide_retries_after_429={retried} busy_refused={refused_busy}"
        )
        assert (sent, answered) == (20, 20)
        assert refused_busy > 0 and retried > 0, log[-3000:]  # the limit really bit
        assert "dropped" not in log, log[-3000:]
        assert "retry in 0.00s" not in log and "retry in 0s" not in log
    finally:
        agent.stop()
        api.stop()
