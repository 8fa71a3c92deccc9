"""post_office_client against a real Post Office API process and a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from redis.asyncio import Redis

from post_office_client import (
    AgentMessage,
    BadRequest,
    Forbidden,
    Gone,
    NotFound,
    PostOfficeClient,
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
            "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.2",
            "POST_OFFICE_MAX_BODY_BYTES": "4096",
            "POST_OFFICE_SHUTDOWN_TIMEOUT": "2",
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
            sub = po.subscribe("guide", backoff_min=0.05, backoff_max=0.2, idle_timeout=2)
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
