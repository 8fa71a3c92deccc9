"""Many connections at once: every message acked, observed exactly once, in order per connection."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from tests.gateway_util import (
    AgentListener,
    RedisServer,
    chat,
    create_sessions,
    recv,
    start_gateway,
    start_traffic_cop,
    ws_url,
)
from tests.helpers import ServiceProcess, wait_for

CONNECTIONS = 200
MESSAGES = 50


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, ServiceProcess, ServiceProcess]]:
    server = RedisServer().start()
    traffic_cop = start_traffic_cop(server.url)
    gateway = None
    try:
        gateway = start_gateway(server.url, traffic_cop.url)
        yield server.url, traffic_cop, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        traffic_cop.stop()
        server.cleanup()


async def test_200_connections_sending_50_messages_each(stack):
    redis_url, traffic_cop, gateway = stack
    tokens = await create_sessions(traffic_cop.url, [f"load{i}" for i in range(CONNECTIONS)])
    redis = Redis.from_url(redis_url)
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with (
            AgentListener(redis, "guide") as agent,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            sockets = await asyncio.gather(*(http.ws_connect(ws_url(gateway, t)) for t in tokens))
            try:
                ids = [(await recv(ws))["connection_id"] for ws in sockets]

                async def run(ws: aiohttp.ClientWebSocketResponse) -> dict[int, str]:
                    for n in range(MESSAGES):
                        await ws.send_str(chat(f"m{n}", id=n))
                    acks: dict[int, str] = {}
                    while len(acks) < MESSAGES:
                        frame = await recv(ws, 20)
                        assert frame["type"] == "ack", frame
                        assert frame["status"] == "published"
                        assert frame["id"] not in acks
                        acks[frame["id"]] = frame["message_id"]
                    return acks

                acked = await asyncio.gather(*(run(ws) for ws in sockets))
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))

            total = CONNECTIONS * MESSAGES
            # Every message was published before its ack was sent, so a marker published now
            # reaches the agent after all of them: once it arrived, nothing else is on its way
            # and a duplicate would show in the count.
            await redis.publish(names.agent_channel("guide"), orjson.dumps({"marker": True}))
            await wait_for(
                lambda: any(m.get("marker") for m in agent.messages), 20, what="the marker"
            )
            observed = [m for m in agent.messages if not m.get("marker")]
            assert len(observed) == total
            seen: defaultdict[str, list[int]] = defaultdict(list)
            for message in observed:
                seen[message["connection_id"]].append(message["message"]["id"])
            assert set(seen) == set(ids)
            for cid in ids:
                assert seen[cid] == list(range(MESSAGES)), cid  # all, once each, in order
            message_ids = {m["message_id"] for m in observed}
            assert len(message_ids) == total
            assert message_ids == {mid for acks in acked for mid in acks.values()}
    finally:
        await redis.aclose()
