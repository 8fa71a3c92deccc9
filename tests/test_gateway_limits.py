"""Every limit of the gateway, and what happens past it; each test starts a gateway with tiny
settings against one module-scoped redis-server and Traffic Cop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from tests.gateway_util import (
    RedisServer,
    chat,
    close_of,
    gateway_process,
    instance_of,
    recv,
    registry_traces,
    small_receive_buffer_connector,
    start_gateway,
    start_traffic_cop,
    ws_url,
)
from tests.helpers import ServiceProcess, create_session, timeout, wait_for


@dataclass
class Base:
    redis_url: str
    traffic_cop: ServiceProcess

    def token(self, user_id: str) -> str:
        return create_session(self.traffic_cop.url, user_id)


@pytest.fixture(scope="module")
def base() -> Iterator[Base]:
    server = RedisServer().start()
    traffic_cop = start_traffic_cop(server.url)
    try:
        yield Base(server.url, traffic_cop)
    finally:
        traffic_cop.stop()
        server.cleanup()


@pytest.fixture
def gateways(base: Base) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


@pytest.fixture
async def redis(base: Base) -> AsyncIterator[Redis]:
    client = Redis.from_url(base.redis_url)
    yield client
    await client.aclose()


def gateway(base: Base, gateways: list[ServiceProcess], **env: str) -> ServiceProcess:
    started = start_gateway(base.redis_url, base.traffic_cop.url, **env)
    gateways.append(started)
    return started


async def test_rate_limited_frames_get_errors_then_4429(base, gateways):
    gw = gateway(
        base,
        gateways,
        GATEWAY_RATE_LIMIT_PER_SECOND="0.001",
        GATEWAY_RATE_LIMIT_BURST="2",
        GATEWAY_RATE_LIMIT_CLOSE_AFTER="3",
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, base.token("rl"))) as ws:
        await recv(ws)
        for i in (1, 2):
            await ws.send_str(chat(id=i))
        assert {(f["type"], f["id"]) for f in [await recv(ws), await recv(ws)]} == {
            ("ack", 1),
            ("ack", 2),
        }
        for i in (3, 4):
            await ws.send_str(chat(id=i))
            error = await recv(ws)
            assert (error["type"], error["code"], error["id"]) == ("error", "rate_limited", i)
        await ws.send_str(chat(id=5))
        assert await close_of(ws) == (4429, "rate limit exceeded")


async def test_a_full_agent_queue_answers_unavailable(base, gateways, redis):
    gw = gateway(base, gateways, GATEWAY_QUEUE_BOUND="1")
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, base.token("qb"))) as ws:
        await recv(ws)
        await ws.send_str(chat(id="a", channel="pillar:business_outcomes"))
        assert (await recv(ws))["status"] == "queued"
        await ws.send_str(chat(id="b", channel="pillar:business_outcomes"))
        error = await recv(ws)
        assert (error["type"], error["code"], error["id"]) == ("error", "unavailable", "b")
        assert await redis.llen(names.queue("pillar:business_outcomes")) == 1
        # The connection stays usable.
        await ws.send_str(chat(id="c", channel="pillar:business_outcomes"))
        assert (await recv(ws))["code"] == "unavailable"


async def test_a_slow_reader_is_closed_with_1013(base, gateways, redis):
    gw = gateway(base, gateways, GATEWAY_SEND_QUEUE_FRAMES="4")
    frame = orjson.dumps({"type": "bulk", "data": "x" * 32_000}).decode()
    async with (
        aiohttp.ClientSession(connector=small_receive_buffer_connector()) as http,
        http.ws_connect(ws_url(gw, base.token("slow"))) as ws,
    ):
        cid = (await recv(ws))["connection_id"]
        channel = names.connection_messages(cid)

        async def flood() -> bool:
            # The client reads nothing: kernel buffers fill, then the send queue, then 1013.
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(50):
                    pipe.publish(channel, frame)
                delivered = await pipe.execute()
            return delivered[-1] == 0  # nobody subscribed any more: the gateway let go

        await wait_for(flood, 20, interval=0, what="the gateway to drop the slow reader")
        code = None
        while code is None:
            msg = await ws.receive(timeout=timeout(10))
            if msg.type is aiohttp.WSMsgType.CLOSE:
                code = (msg.data, msg.extra)
            elif msg.type is not aiohttp.WSMsgType.TEXT:
                break
        assert code == (1013, "too slow")
    await wait_for(lambda: _absent(redis, cid, "slow", instance_of(gw)), 5)
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as r:
        assert 'postoffice_gateway_closes_total{code="1013"} 1.0' in await r.text()


async def _absent(redis: Redis, cid: str, user: str, instance: str) -> bool:
    return not await registry_traces(redis, cid, user, instance)


async def test_an_idle_connection_is_evicted_with_1008(base, gateways, redis):
    gw = gateway(base, gateways, GATEWAY_MAX_IDLE_SECONDS="0.3", GATEWAY_HEARTBEAT_INTERVAL="60")
    pubsub = redis.pubsub()
    await pubsub.subscribe(names.EVENTS)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url(gw, base.token("idle"))) as ws,
        ):
            cid = (await recv(ws))["connection_id"]
            assert await close_of(ws) == (1008, "idle")
        events = []

        async def evicted() -> bool:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message:
                events.append(orjson.loads(message["data"]))
            return any(e["connection_id"] == cid and e["type"] == "evicted" for e in events)

        await wait_for(evicted, 5, what="the evicted event")
        (event,) = [e for e in events if e["connection_id"] == cid and e["type"] != "connected"]
        assert event["reason"] == "idle"
        await wait_for(lambda: _absent(redis, cid, "idle", instance_of(gw)), 5)
    finally:
        await pubsub.aclose()


async def test_pings_keep_a_silent_client_alive(base, gateways):
    # Protocol pongs (answered by the client library) count as liveness, and the app ping
    # arrives every heartbeat interval, as the welcome frame announces.
    gw = gateway(base, gateways, GATEWAY_MAX_IDLE_SECONDS="0.4", GATEWAY_HEARTBEAT_INTERVAL="0.1")
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(gw, base.token("alive"))) as ws,
    ):
        welcome = await recv(ws)
        assert welcome["heartbeat_interval"] == 0.1
        pings = 0
        until = time.monotonic() + 1.2  # three idle bounds
        while time.monotonic() < until:
            frame = await recv(ws, skip_pings=False)
            assert frame["type"] == "ping" and isinstance(frame["timestamp"], float)
            pings += 1
        assert pings >= 3
        await ws.send_str(chat(id="still"))
        frame = await recv(ws)
        assert frame["id"] == "still"


async def test_drain_on_sigterm_closes_1001_cleans_up_and_exits_0(base, gateways, redis):
    gw = gateway(base, gateways)
    instance = instance_of(gw)
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(ws_url(gw, base.token(f"drain{i}"))) for i in range(3)]
        ids = [(await recv(ws))["connection_id"] for ws in sockets]
        stopping = asyncio.create_task(asyncio.to_thread(gw.stop))
        closes = await asyncio.gather(*(close_of(ws, 10) for ws in sockets))
        assert closes == [(1001, "server shutting down")] * 3
        assert await stopping == 0
        for ws in sockets:
            await ws.close()
    for i, cid in enumerate(ids):
        assert not await registry_traces(redis, cid, f"drain{i}", instance)
    assert not await redis.exists(names.gateway_instance(instance))
    assert not await redis.sismember(names.GATEWAYS, instance)


async def test_traffic_cop_down_closes_1013(base, gateways, redis):
    traffic_cop = start_traffic_cop(base.redis_url)
    try:
        token = create_session(traffic_cop.url, "tcdown")
        gw = start_gateway(base.redis_url, traffic_cop.url, GATEWAY_TRAFFIC_COP_TIMEOUT_SECONDS="1")
        gateways.append(gw)
    finally:
        traffic_cop.stop()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(gw, token)) as ws:
            assert await close_of(ws) == (1013, "session service unavailable")
        async with http.get(gw.url + "/ready") as r:
            assert r.status == 503
            assert "traffic_cop" in (await r.json())["failing"]


def test_start_fails_clearly_when_redis_never_answers(base):
    from tests.helpers import free_port

    gw = gateway_process(
        f"redis://127.0.0.1:{free_port()}/0",
        base.traffic_cop.url,
        GATEWAY_STARTUP_WAIT_SECONDS="0.3",
    )
    gw.start(wait_ready=False)
    assert gw.proc is not None
    code = gw.proc.wait(timeout(20))
    gw.stop()
    assert code != 0
    assert "redis did not answer at start" in gw.log()
