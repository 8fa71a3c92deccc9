"""Redis going away under a live gateway: the circuit breaker holds accepted messages and
flushes them in order when Redis returns, the pub/sub reader reconnects and resubscribes."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from tests.gateway_util import (
    RedisServer,
    chat,
    recv,
    start_gateway,
    start_traffic_cop,
    ws_url,
)
from tests.helpers import ServiceProcess, create_session, stream_data, wait_for


@pytest.fixture
def server(persistent_redis: RedisServer) -> RedisServer:
    return persistent_redis


@pytest.fixture
def traffic_cop(server: RedisServer) -> Iterator[ServiceProcess]:
    service = start_traffic_cop(server.url)
    yield service
    service.stop()


async def _ready(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/ready") as r:
        return r.status


async def test_breaker_holds_messages_while_redis_is_down_and_flushes_them_in_order(
    server, traffic_cop
):
    gw = start_gateway(server.url, traffic_cop.url, GATEWAY_BREAKER_BUFFER="2")
    try:
        token = create_session(traffic_cop.url, "brk")
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, token)) as ws:
            cid = (await recv(ws))["connection_id"]
            server.stop()
            for i in (1, 2):
                await ws.send_str(chat(f"held {i}", id=i))
                ack = await recv(ws)
                assert (ack["type"], ack["id"], ack["status"]) == ("ack", i, "queued")
            await ws.send_str(chat("one too many", id=3))
            error = await recv(ws)
            assert (error["type"], error["id"], error["code"]) == ("error", 3, "unavailable")
            async with http.get(gw.url + "/ready") as r:
                assert r.status == 503
                failing = (await r.json())["failing"]
                assert "redis" in failing and "pubsub" in failing

            server.start()  # same port, empty: no agent listens, so the flush queues them
            redis = Redis.from_url(server.url)
            try:

                async def flushed() -> list[dict[str, object]]:
                    raw = await stream_data(redis, "guide")
                    return [orjson.loads(m) for m in raw] if len(raw) >= 2 else []

                held = await wait_for(flushed, 10, what="the breaker flush")
                assert [m["message"]["id"] for m in held] == [1, 2]
                assert all(m["connection_id"] == cid for m in held)

                # The pub/sub reader reconnected and resubscribed the connection's channel.
                await wait_for(lambda: _ready(http, gw.url), 10, what="ready again")
                await wait_for(
                    lambda: redis.publish(names.connection_messages(cid), '{"type":"back"}'), 10
                )
                assert await recv(ws) == {"type": "back"}
                await ws.send_str(chat("after", id=4))
                assert (await recv(ws))["status"] == "queued"
                assert await redis.xlen(names.stream("guide")) == 3
            finally:
                await redis.aclose()
    finally:
        assert gw.stop() == 0


async def test_ready_names_the_failing_dependency_and_recovers(server, traffic_cop):
    gw = start_gateway(server.url, traffic_cop.url)
    try:
        async with aiohttp.ClientSession() as http:
            server.stop()
            async with http.get(gw.url + "/ready") as r:
                body = await r.json()
                assert r.status == 503
                assert body["checks"]["traffic_cop"] == "ok"
                assert body["checks"]["redis"] != "ok"
            # Upgrades are refused before the socket opens while the gateway is not ready.
            await wait_for(lambda: _upgrade_status(http, gw), 5, what="503 on upgrade")
            server.start()
            await wait_for(lambda: _is_200(http, gw.url), 10, what="ready again")
    finally:
        assert gw.stop() == 0


async def _is_200(http: aiohttp.ClientSession, url: str) -> bool:
    return await _ready(http, url) == 200


async def _upgrade_status(http: aiohttp.ClientSession, gw: ServiceProcess) -> bool:
    try:
        async with http.ws_connect(ws_url(gw, "whatever")):
            return False
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status == 503
