"""post_office_client against a real Post Office API process and a real redis-server."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from post_office_client import (
    AgentMessage,
    BadRequest,
    Forbidden,
    Gone,
    NotFound,
    PostOfficeClient,
    PostOfficeError,
    RateLimited,
    StreamError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from shared import redis_names as names
from shared.protocol import new_connection_id
from shared.registry import ConnectionRecord, Registry
from tests.api_util import listening, numsub
from tests.helpers import RedisServer, ServiceProcess, free_port, timeout, wait_for

MESSAGE = {"type": "response", "message": "hi"}


def api_process(redis_url: str, port: int | None = None, **env: str) -> ServiceProcess:
    service = ServiceProcess(
        "services.post_office_api",
        {
            "REDIS_URL": redis_url,
            "POST_OFFICE_TRAFFIC_COP_URL": "",
            "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.2",
            "POST_OFFICE_MAX_BODY_BYTES": "4096",
            "POST_OFFICE_SHUTDOWN_TIMEOUT": str(timeout(2)),
            **env,
        },
        port=port,
    )
    service.env["POST_OFFICE_PORT"] = str(service.port)
    return service


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ServiceProcess]:
    """One API process for the module's tests (each test flushes Redis after itself)."""
    service = api_process(redis_server.url).start()
    yield service
    service.stop()


@pytest.fixture
async def po(api: ServiceProcess, redis: Redis) -> AsyncIterator[PostOfficeClient]:
    async with PostOfficeClient(api.url, "dev-smart_city", timeout=timeout(5)) as client:
        yield client


async def register(redis: Redis, user: str = "alice", gateway: str = "gw-1") -> str:
    cid = new_connection_id(user)
    await Registry(redis, 60).register(
        ConnectionRecord(cid, user, "sess_0123456789abcdef", gateway, time.time(), ("guide",))
    )
    await redis.set(names.gateway_instance(gateway), "1", ex=60)
    return cid


async def test_deliveries(po: PostOfficeClient, redis: Redis) -> None:
    cid = await register(redis)
    async with listening(redis, names.connection_messages(cid)) as gateway:
        assert await po.send_to_connection(cid, MESSAGE) == 1
        assert await gateway.next() == (names.connection_messages(cid), orjson.dumps(MESSAGE))
        delivery = await po.send_to_user("alice", MESSAGE)
        assert (delivery.delivered, delivery.connections, delivery.stale_removed) == (1, 1, 0)
        await gateway.next()
    async with listening(redis, names.channel_broadcast("guide")) as gateways:
        result = await po.broadcast("guide", MESSAGE)
        assert (result.gateways, result.connections) == (1, 1)
        await gateways.next()
    record = await po.get_connection(cid)
    assert record["user_id"] == "alice" and record["channels"] == ["guide"]
    async with listening(redis, names.gateway_control("gw-1")) as control:
        closing = await po.close_connection(cid, code=4000, reason="done")
        assert closing["status"] == "closing"
        _, command = await control.next()
        assert orjson.loads(command)["code"] == 4000


async def test_errors_carry_status_and_code(
    api: ServiceProcess, po: PostOfficeClient, redis: Redis
) -> None:
    with pytest.raises(Gone) as gone:
        await po.send_to_connection("ws_ghost_00000000", MESSAGE)
    assert (gone.value.status, gone.value.code) == (410, "gone")
    with pytest.raises(BadRequest) as bad:
        await po.send_to_connection("nope", MESSAGE)
    assert bad.value.code == "bad_request"
    with pytest.raises(NotFound) as missing:
        await po.get_connection("ws_ghost_00000000")
    assert missing.value.status == 404
    with pytest.raises(NotFound) as channel:
        await po.publish("nowhere", MESSAGE)
    assert channel.value.code == "unknown_channel"
    with pytest.raises(TooLarge):
        await po.publish("guide", {"x": "y" * 5000})
    async with PostOfficeClient(api.url, "dev-experience") as experience:
        with pytest.raises(Forbidden) as forbidden:
            await experience.send_to_connection("ws_ghost_00000000", MESSAGE)
        assert "connection_messaging" in forbidden.value.message
        result = await experience.publish("guide", MESSAGE)  # agent_messaging
        assert result.status == "queued"
    async with PostOfficeClient(api.url, "wrong") as wrong:
        with pytest.raises(Unauthorized):
            await wrong.get_connection("ws_ghost_00000000")
        with pytest.raises(Unauthorized):
            await wrong.subscribe("guide").open()
    async with PostOfficeClient(f"http://127.0.0.1:{free_port()}", "k") as down:
        with pytest.raises(Unavailable) as unavailable:
            await down.get_connection("ws_ghost_00000000")
        assert unavailable.value.status == 0
    assert "dev-smart_city" not in repr(po)


async def test_websocket_endpoint(po: PostOfficeClient) -> None:
    endpoint = await po.websocket_endpoint("abc")
    assert endpoint.websocket_url.endswith("/ws?session_token=abc")
    assert "guide" in endpoint.channels
    assert endpoint.message_format["schema"]["type"] == "object"


async def test_subscribe_yields_agent_messages_in_order(po: PostOfficeClient) -> None:
    async with po.subscribe("pillar:content") as messages:
        assert messages.connected.is_set()
        sent = [await po.publish("pillar:content", {"n": n}) for n in range(5)]
        assert {s.status for s in sent} == {"published"}
        received: list[AgentMessage] = []
        async for msg in messages:
            received.append(msg)
            if len(received) == 5:
                break
    assert [m.message for m in received] == [{"n": n} for n in range(5)]
    assert [m.message_id for m in received] == [s.message_id for s in sent]
    assert messages.last_event_id == sent[-1].message_id


async def test_subscribe_without_reconnect_raises_stream_errors(
    redis: Redis, redis_server: RedisServer
) -> None:
    api = api_process(redis_server.url, POST_OFFICE_SSE_QUEUE_SIZE="1").start()
    try:
        async with PostOfficeClient(api.url, "dev-smart_city") as po:
            sub = po.subscribe("guide", reconnect=False)
            await sub.open()
            async with redis.pipeline(transaction=False) as pipe:
                for n in range(300):
                    pipe.publish(names.agent_channel("guide"), orjson.dumps({"message": {"n": n}}))
                await pipe.execute()
            with pytest.raises(StreamError) as error:
                async for _ in sub:
                    pass
            assert error.value.code == "too_slow"
            await sub.aclose()
    finally:
        api.stop()


async def test_subscribe_reconnects_when_the_api_restarts(
    redis: Redis, redis_server: RedisServer
) -> None:
    port = free_port()
    api = api_process(redis_server.url, port=port).start()
    try:
        async with PostOfficeClient(api.url, "dev-smart_city") as po:
            sub = po.subscribe("guide", backoff_min=0.05, backoff_max=0.2, idle_timeout=timeout(2))
            async with sub:
                first = await po.publish("guide", {"n": 1})
                msg = await asyncio.wait_for(sub.__anext__(), timeout(5))
                assert msg.message_id == first.message_id
                assert api.stop() == 0
                reading = asyncio.create_task(sub.__anext__())
                api = api_process(redis_server.url, port=port).start()

                async def subscribed() -> bool:
                    return await numsub(redis, names.agent_channel("guide")) == 1

                await wait_for(subscribed, 10, what="client re-subscribed")
                second = await po.publish("guide", {"n": 2})
                assert second.status == "published"
                msg = await asyncio.wait_for(reading, timeout(10))
                assert msg.message == {"n": 2}
                assert sub.reconnects == 1
    finally:
        api.stop()


async def test_a_callers_session_gets_the_realm_key_and_a_closed_client_refuses(
    api: ServiceProcess, redis: Redis
) -> None:
    async with aiohttp.ClientSession() as http:
        po = PostOfficeClient(api.url, "dev-smart_city", session=http)
        with pytest.raises(NotFound):  # not 401: the key went with the request
            await po.get_connection("ws_ghost_00000000")
        async with po.subscribe("guide") as sub:
            assert sub.connected.is_set()
        await po.aclose()
        assert not http.closed  # the caller's session stays the caller's
        with pytest.raises(RuntimeError, match="closed"):
            await po.get_connection("ws_ghost_00000000")
    own = PostOfficeClient(api.url, "dev-smart_city")
    with pytest.raises(NotFound):
        await own.get_connection("ws_ghost_00000000")
    await own.aclose()
    with pytest.raises(RuntimeError, match="closed"):  # no new, unclosed session
        await own.publish("guide", MESSAGE)


# -- against a misbehaving server: the client's own robustness --------------------------------
#
# The real API cannot be made to answer like this; a small aiohttp server stands in for a
# broken proxy or another API version.


class Misbehaving:
    def __init__(self) -> None:
        self.hits: dict[str, list[float]] = {}
        app = web.Application()
        app.router.add_get("/v1/connections/{cid}", self.rate_limited)
        app.router.add_post("/v1/channels/{channel}/messages", self.wrong_shape)
        app.router.add_get("/v1/channels/{channel}/events", self.events)
        self.server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def rate_limited(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"code": "rate_limited", "message": "slow down"}},
            status=429,
            headers={"Retry-After": "3"},
        )

    async def wrong_shape(self, request: web.Request) -> web.Response:
        return web.json_response({"unexpected": 1}, status=202)

    async def events(self, request: web.Request) -> web.StreamResponse:
        channel = request.match_info["channel"]
        hits = self.hits.setdefault(channel, [])
        hits.append(time.monotonic())
        if channel == "busy" and len(hits) == 1:
            return web.json_response(
                {"error": {"code": "unavailable", "message": "later"}},
                status=503,
                headers={"Retry-After": "1"},
            )
        if channel == "html" and len(hits) == 1:
            return web.Response(text="<html>proxy</html>", content_type="text/html")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if channel == "flap":
            return resp  # opens and ends at once
        if channel == "big":
            big = orjson.dumps({"message_id": "m0", "message": {"x": "y" * (5 * 1024 * 1024)}})
            await resp.write(b"id: m0\r\ndata: " + big + b"\r\n\r\n")
            await resp.write(b"data: not json\r\n\r\n")
        good = orjson.dumps({"message_id": "m1", "connection_id": "", "message": {"n": 1}})
        await resp.write(b"id: m1\r\ndata: " + good + b"\r\n\r\n")
        await asyncio.sleep(timeout(30))  # stays open until the client leaves
        return resp


@pytest.fixture
async def misbehaving() -> AsyncIterator[Misbehaving]:
    stand_in = Misbehaving()
    await stand_in.server.start_server()
    yield stand_in
    await stand_in.server.close()


async def test_retry_after_and_answers_of_the_wrong_shape(misbehaving: Misbehaving) -> None:
    async with PostOfficeClient(misbehaving.url, "k") as po:
        with pytest.raises(RateLimited) as limited:
            await po.get_connection("ws_a_00000000")
        assert limited.value.retry_after == 3
        with pytest.raises(PostOfficeError) as wrong:
            await po.publish("guide", MESSAGE)
        assert wrong.value.code == "invalid_response" and not isinstance(wrong.value, KeyError)


async def test_a_stream_that_ends_at_once_backs_off_growing(misbehaving: Misbehaving) -> None:
    async with PostOfficeClient(misbehaving.url, "k") as po:
        sub = po.subscribe("flap", backoff_min=0.02, backoff_max=0.16)
        reading = asyncio.create_task(sub.__anext__())
        await wait_for(lambda: len(misbehaving.hits.get("flap", ())) >= 6, what="re-opens")
        reading.cancel()
        await asyncio.wait([reading])
        await sub.aclose()
    times = misbehaving.hits["flap"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Every re-open waited at least half a backoff step, and the step kept growing (it is
    # not reset by a stream that delivered nothing): lower bounds only, a slow box passes.
    assert all(gap >= 0.01 for gap in gaps), gaps
    assert max(gaps[3:]) >= 0.08, gaps


async def test_subscribe_honours_retry_after_and_checks_the_content_type(
    misbehaving: Misbehaving,
) -> None:
    async with PostOfficeClient(misbehaving.url, "k") as po:
        for channel in ("busy", "html"):
            async with po.subscribe(channel, backoff_min=0.01, backoff_max=0.02) as sub:
                msg = await asyncio.wait_for(sub.__anext__(), timeout(10))
                assert msg.message == {"n": 1}
    busy = misbehaving.hits["busy"]
    assert busy[1] - busy[0] >= 1.0  # Retry-After: 1, though the backoff is 10 ms
    assert len(misbehaving.hits["html"]) == 2  # text/html was not taken for a stream


async def test_oversized_and_invalid_events_are_skipped_not_fatal(
    misbehaving: Misbehaving,
) -> None:
    async with PostOfficeClient(misbehaving.url, "k") as po, po.subscribe("big") as sub:
        msg = await asyncio.wait_for(sub.__anext__(), timeout(10))
        assert msg.message_id == "m1"
        assert sub.skipped == 2
        assert sub.reconnects == 0  # the same stream went on
