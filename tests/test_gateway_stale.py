"""A gateway that stalls past its instance TTL (GC pause, SIGSTOP, an overloaded host) is taken
for dead: the eviction worker removes its records as ``gateway_lost``. When it resumes, its
liveness flush finds those records gone and closes the sockets with 1008 "stale", so clients
reconnect instead of hanging on a socket no delivery can reach (410). Nothing is announced
twice. A record gone together with its session (Redis lost its data) is not "stale": the
session check closes those 4401 "session lost" (tests/test_redis_data_loss.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Iterator

import aiohttp
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from shared.registry import ConnectionRecord, Registry
from tests.eviction_util import Subscriber, worker_process
from tests.gateway_util import (
    RedisServer,
    chat,
    close_of,
    instance_of,
    recv,
    redis_client,
    start_gateway,
    start_traffic_cop,
    ws_url,
)
from tests.helpers import ServiceProcess, create_session, timeout, wait_for


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    return private_redis


@pytest.fixture
def traffic_cop(server: RedisServer) -> Iterator[ServiceProcess]:
    service = start_traffic_cop(server.url)
    yield service
    service.stop()


async def test_touch_reports_records_that_are_gone(redis: Redis) -> None:
    registry = Registry(redis, 60)
    kept, gone, lost = "conn_kept", "conn_gone", "conn_lost"
    for cid in (kept, gone, lost):
        await registry.register(ConnectionRecord(cid, "u1", "s-" + cid, "gw-1", time.time()))
    await redis.set(names.session_by_id("s-" + kept), "1")
    await redis.set(names.session_by_id("s-" + gone), "1")
    assert await registry.unregister(gone) == 1  # removed on purpose; its session lives
    assert await registry.unregister(lost) == 1  # ... and no session either: Redis lost it
    sessions = {cid: "s-" + cid for cid in (kept, gone, lost)}
    seen = dict.fromkeys(sessions, 500.0)
    assert await registry.touch(seen, sessions=sessions) == [gone]
    # Without sessions every missing record is reported; nothing is written for any of them.
    assert sorted(await registry.touch(seen, channels_used={gone: ["guide"]})) == [gone, lost]
    assert await redis.zscore(names.LAST_SEEN, kept) == 500.0
    assert not await redis.exists(names.connection(gone))
    assert not await redis.exists(names.channel_connections("guide"))
    assert await registry.touch({}) == []


async def test_a_gateway_that_stalled_past_its_ttl_closes_its_lost_sockets_as_stale(
    server: RedisServer, traffic_cop: ServiceProcess
) -> None:
    gw = start_gateway(
        server.url,
        traffic_cop.url,
        GATEWAY_INSTANCE_TTL_SECONDS="0.6",
        GATEWAY_HEARTBEAT_INTERVAL="0.2",
    )
    worker = worker_process(server.url, traffic_cop.url).start()
    assert gw.proc is not None
    pid = gw.proc.pid
    stopped = False
    try:
        talker, silent = (create_session(traffic_cop.url, u) for u in ("talker", "silent"))
        async with (
            redis_client(server.url) as redis,
            Subscriber(server.url, names.EVENTS) as events,
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url(gw, talker)) as ws,
            http.ws_connect(ws_url(gw, silent)) as quiet,  # only answers pings
        ):
            ids = [(await recv(ws))["connection_id"], (await recv(quiet))["connection_id"]]

            async def records() -> int:
                return int(await redis.exists(*(names.connection(cid) for cid in ids)))

            await wait_for(lambda: _equals(records(), 2), what="both records")

            os.kill(pid, signal.SIGSTOP)
            stopped = True
            # The instance key expires, the worker takes the gateway for dead and cleans up.
            await wait_for(lambda: _equals(records(), 0), 10, what="the gateway_lost cleanup")
            assert await redis.exists(names.gateway_instance(instance_of(gw))) == 0
            os.kill(pid, signal.SIGCONT)
            stopped = False

            # One user speaks, the other's socket only answers the gateway's pings: the next
            # flush after either finds no record. Each wait is bounded as a whole: app pings
            # keep arriving, so no single receive times out.
            await ws.send_str(chat("anyone there?", id=1))
            for sock in (ws, quiet):
                async with asyncio.timeout(timeout(10)):
                    assert await close_of(sock, 10) == (1008, "stale")

            await wait_for(
                lambda: gw.log().count("disconnected (1008 stale)") == 2, 10, what="both left"
            )
            # The gateway's leave path announced nothing more: the worker's gateway_lost was the
            # one terminal event. A marker published after the leaves bounds the wait.
            await redis.publish(names.EVENTS, b'{"type": "marker"}')
            await wait_for(lambda: any(e["type"] == "marker" for e in events.json()))
            for cid in ids:
                mine = [
                    (e["type"], e["reason"]) for e in events.json() if e.get("connection_id") == cid
                ]
                assert mine == [("connected", ""), ("evicted", "gateway_lost")]
            # The gateway is alive again and serves new connections normally.
            token = create_session(traffic_cop.url, "again")
            async with http.ws_connect(ws_url(gw, token)) as again:
                new = (await recv(again))["connection_id"]
                await again.send_str(chat("hello", id=2))
                assert (await recv(again))["status"] == "queued"
                assert await redis.exists(names.connection(new))
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        worker.stop()
        assert gw.stop() == 0


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
