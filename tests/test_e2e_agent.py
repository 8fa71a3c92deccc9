"""End to end: Traffic Cop, two gateways, the Post Office API and the guide agent, all real
processes on one real redis-server.

A WebSocket client on gateway A asks the guide and gets its answer (client → gateway →
websocket:guide → API SSE → agent → API → websocket:connection:<id>:messages → gateway →
client); an agent's send_to_connection reaches a client on gateway B; 410 once it has left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from post_office_client import Gone, NotFound, PostOfficeClient
from tests.helpers import (
    TRAFFIC_COP_KEY,
    ServiceProcess,
    create_session,
    live_consumers,
    timeout,
    wait_for,
)


def gateway(redis_url: str, traffic_cop: ServiceProcess, instance: str) -> ServiceProcess:
    service = ServiceProcess(
        "services.gateway",
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": traffic_cop.url,
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            "GATEWAY_INSTANCE_ID": instance,
            "GATEWAY_HEARTBEAT_INTERVAL": "5",
            "GATEWAY_SHUTDOWN_TIMEOUT": str(timeout(3)),
        },
    )
    service.env["GATEWAY_PORT"] = str(service.port)
    return service


@pytest.fixture
def stack(redis_url: str, traffic_cop: ServiceProcess) -> Iterator[dict[str, ServiceProcess]]:
    started: dict[str, ServiceProcess] = {}
    try:
        started["gw_a"] = gateway(redis_url, traffic_cop, "gw-a").start()
        started["gw_b"] = gateway(redis_url, traffic_cop, "gw-b").start()
        api = ServiceProcess(
            "services.post_office_api",
            {
                "REDIS_URL": redis_url,
                "GATEWAY_URLS": started["gw_a"].url,
                "TRAFFIC_COP_URL": traffic_cop.url,
                "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.5",
            },
        )
        api.env["POST_OFFICE_PORT"] = str(api.port)
        started["api"] = api.start()
        started["agent"] = ServiceProcess(
            "agents.guide",
            {"POST_OFFICE_URL": api.url, "GUIDE_AGENT_BACKOFF_CAP_SECONDS": "0.2"},
        ).start(wait_ready=False)
        started["traffic_cop"] = traffic_cop
        yield started
    finally:
        for name in ("agent", "api", "gw_b", "gw_a"):
            if name in started:
                started[name].stop()


async def next_frame(ws: aiohttp.ClientWebSocketResponse, kind: str | None = None) -> Any:
    """The next JSON frame (of ``kind`` when given), answering app pings on the way."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout(10))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame = orjson.loads(msg.data)
        if isinstance(frame, dict) and frame.get("type") == "ping":
            await ws.send_str('{"type": "pong"}')
            continue
        if kind is None or (isinstance(frame, dict) and frame.get("type") == kind):
            return frame


async def test_client_agent_round_trip_across_two_gateways(
    stack: dict[str, ServiceProcess], redis: Redis
) -> None:
    traffic_cop, gw_b, api = stack["traffic_cop"], stack["gw_b"], stack["api"]

    await wait_for(lambda: live_consumers(redis), 15, what="guide agent consuming via the API")
    alice_token = create_session(traffic_cop.url, "alice")
    bob_token = create_session(traffic_cop.url, "bob")
    async with (
        aiohttp.ClientSession() as http,
        PostOfficeClient(api.url, "dev-smart_city") as po,
    ):
        # Alice finds her gateway through the API, as a browser app would.
        endpoint = await po.websocket_endpoint(alice_token)
        async with http.ws_connect(endpoint.websocket_url) as alice:
            welcome = await next_frame(alice, "welcome")
            assert welcome["user_id"] == "alice"
            await alice.send_str(
                orjson.dumps(
                    {
                        "channel": "guide",
                        "intent": "chat",
                        "payload": {"message": "hello"},
                        "id": "1",
                    }
                ).decode()
            )
            ack = await next_frame(alice, "ack")
            assert ack["id"] == "1" and ack["status"] == "published"
            response = await next_frame(alice, "response")
            assert response == {
                "type": "response",
                "agent_type": "guide",
                "in_reply_to": ack["message_id"],
                "message": "You said: hello",
            }

        # Bob on the second gateway; an agent delivers to him through the API.
        async with http.ws_connect(
            f"ws://127.0.0.1:{gw_b.port}/ws?session_token={bob_token}"
        ) as bob:
            welcome = await next_frame(bob, "welcome")
            bob_id = welcome["connection_id"]
            record = await po.get_connection(bob_id)
            assert record["gateway_instance"] == "gw-b"
            frame = {"type": "notice", "text": "from an agent"}
            assert await po.send_to_connection(bob_id, frame) == 1
            assert await next_frame(bob) == frame
            await bob.close()

        async def bob_gone() -> bool:
            try:
                await po.get_connection(bob_id)
            except NotFound:
                return True
            return False

        await wait_for(bob_gone, 10, what="bob's record removed after he left")
        with pytest.raises(Gone):
            await po.send_to_connection(bob_id, frame)
