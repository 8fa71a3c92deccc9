"""The gateway end to end: real redis-server, real Traffic Cop, real gateway process.

One module-scoped stack (a private redis-server, Traffic Cop, one gateway) serves every test
here; tests use their own user ids, so they do not see each other's connections. Tests that
need other settings start their own gateway (tests/test_gateway_limits.py,
tests/test_gateway_resilience.py).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from shared.protocol import DEFAULT_CHANNELS
from tests.gateway_util import (
    AgentListener,
    RedisServer,
    chat,
    close_of,
    instance_of,
    recv,
    registry_traces,
    start_gateway,
    start_traffic_cop,
    wait_for_log,
    ws_url,
)
from tests.helpers import (
    TRAFFIC_COP_KEY,
    ServiceProcess,
    create_session,
    stream_data,
    timeout,
    wait_for,
)

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@dataclass
class Stack:
    redis_url: str
    traffic_cop: ServiceProcess
    gateway: ServiceProcess

    @property
    def instance(self) -> str:
        return instance_of(self.gateway)

    def token(self, user_id: str) -> str:
        return create_session(self.traffic_cop.url, user_id)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    server = RedisServer().start()
    traffic_cop = start_traffic_cop(server.url)
    gateway = None
    try:
        gateway = start_gateway(server.url, traffic_cop.url)
        yield Stack(server.url, traffic_cop, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        traffic_cop.stop()
        server.cleanup()


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_message_reaches_the_agent_channel_with_every_field(stack, redis, http):
    token = stack.token("alice")
    async with (
        AgentListener(redis, "pillar:content") as agent,
        http.ws_connect(ws_url(stack.gateway, token)) as ws,
    ):
        welcome = await recv(ws)
        assert welcome["type"] == "welcome"
        assert welcome["user_id"] == "alice"
        assert re.fullmatch(r"ws_alice_[0-9a-f]{8}", welcome["connection_id"])
        assert welcome["channels"] == list(DEFAULT_CHANNELS)
        assert welcome["heartbeat_interval"] == 30
        cid = welcome["connection_id"]
        record = await redis.hgetall(names.connection(cid))
        assert record[b"user_id"] == b"alice"
        assert record[b"gateway_instance"] == stack.instance.encode()

        envelope = {
            "id": "c-1",
            "channel": "pillar:content",
            "intent": "query",
            "payload": {
                "message": "what is new?",
                "conversation_id": "conv-9",
                "metadata": {"a": 1},
            },
        }
        await ws.send_str(orjson.dumps(envelope).decode())
        ack = await recv(ws)
        assert ack["type"] == "ack"
        assert ack["id"] == "c-1"
        assert ack["status"] == "published"
        assert ack["message_id"].startswith("msg_")

        await wait_for(lambda: agent.messages, 5, what="the agent message")
        (message,) = agent.messages
        assert set(message) == {
            "message_id",
            "connection_id",
            "user_id",
            "gateway_instance",
            "message",
            "timestamp",
            "traceparent",
        }
        assert message["message_id"] == ack["message_id"]
        assert message["connection_id"] == cid
        assert message["user_id"] == "alice"
        assert message["gateway_instance"] == stack.instance
        assert message["message"] == envelope
        stamp = datetime.fromisoformat(message["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() is not None and abs(stamp.timestamp() - time.time()) < 60
        assert TRACEPARENT.match(message["traceparent"])

        # The first use of a channel reaches the channel index with the next liveness flush.
        await wait_for(
            lambda: redis.sismember(names.channel_connections("pillar:content"), cid),
            5,
            what="channel index",
        )


async def test_channel_and_intent_default_to_guide_and_chat_and_queue_without_an_agent(
    stack, redis, http
):
    token = stack.token("bob")
    async with http.ws_connect(ws_url(stack.gateway, token)) as ws:
        await recv(ws)
        await ws.send_str(orjson.dumps({"id": 7, "payload": {"message": "anyone?"}}).decode())
        ack = await recv(ws)
        # No agent listens on guide in this test: the message waits in the bounded queue.
        assert ack == {"type": "ack", "id": 7, "message_id": ack["message_id"], "status": "queued"}
        queued = [orjson.loads(m) for m in await stream_data(redis, "guide")]
        mine = [m for m in queued if m["message_id"] == ack["message_id"]]
        assert mine and mine[0]["message"] == {
            "channel": "guide",
            "intent": "chat",
            "payload": {"message": "anyone?"},
            "id": 7,
        }


async def test_bearer_header_carries_the_token_too(stack, http):
    token = stack.token("carol")
    async with http.ws_connect(
        ws_url(stack.gateway), headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        assert (await recv(ws))["user_id"] == "carol"


@pytest.mark.parametrize(
    "query", ["?session_token=not-a-token", "", "?session_token="], ids=["bad", "missing", "empty"]
)
async def test_invalid_or_missing_token_closes_4401(stack, http, query):
    async with http.ws_connect(ws_url(stack.gateway) + query) as ws:
        code, reason = await close_of(ws)
    assert code == 4401
    assert reason


async def test_a_revoked_token_is_refused_at_connect(stack, http):
    token = stack.token("dave")
    await _revoke(stack, token)
    async with http.ws_connect(ws_url(stack.gateway, token)) as ws:
        assert (await close_of(ws))[0] == 4401


async def _revoke(stack: Stack, token: str) -> None:
    headers = {"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}
    async with (
        aiohttp.ClientSession(headers=headers) as tc,
        tc.delete(f"{stack.traffic_cop.url}/v1/sessions/{token}") as r,
    ):
        assert r.status == 204


async def test_revocation_closes_every_socket_of_the_session_within_a_second(stack, redis, http):
    token = stack.token("erin")
    other = stack.token("erin")  # a second session of the same user stays open
    async with (
        http.ws_connect(ws_url(stack.gateway, token)) as ws1,
        http.ws_connect(ws_url(stack.gateway, token)) as ws2,
        http.ws_connect(ws_url(stack.gateway, other)) as ws3,
    ):
        ids = [(await recv(w))["connection_id"] for w in (ws1, ws2, ws3)]
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}) as tc,
            tc.delete(f"{stack.traffic_cop.url}/v1/sessions/{token}") as r,
        ):
            assert r.status == 204
        started = time.monotonic()
        results = await asyncio.gather(close_of(ws1, 1), close_of(ws2, 1))
        assert time.monotonic() - started < timeout(1)
        assert list(results) == [(4401, "session revoked"), (4401, "session revoked")]
        for cid in ids[:2]:
            await wait_for(
                functools.partial(_gone, redis, cid, "erin", stack.instance),
                5,
                what=f"{cid} unregistered",
            )
        # The other session is untouched.
        await ws3.send_str(chat(id="still-here"))
        assert (await recv(ws3))["type"] == "ack"


async def _gone(redis: Redis, cid: str, user_id: str, instance: str) -> bool:
    return not await registry_traces(redis, cid, user_id, instance)


async def test_the_registry_holds_nothing_once_clients_leave(stack, redis, http):
    tokens = [stack.token(f"frank{i}") for i in range(3)]
    ids = []
    for i, token in enumerate(tokens):
        async with http.ws_connect(ws_url(stack.gateway, token)) as ws:
            cid = (await recv(ws))["connection_id"]
            ids.append((cid, f"frank{i}"))
            await ws.send_str(chat(id=1, channel="pillar:insights"))
            # Nobody listens on pillar:insights here: the message waits in the agent queue.
            ack = await recv(ws)
            assert (ack["type"], ack["id"], ack["status"]) == ("ack", 1, "queued")
            await wait_for(
                functools.partial(
                    redis.sismember, names.channel_connections("pillar:insights"), cid
                ),
                5,
            )
            assert await registry_traces(redis, cid, f"frank{i}", stack.instance)
    for cid, user in ids:
        await wait_for(functools.partial(_gone, redis, cid, user, stack.instance), 5, what=cid)


async def test_bad_origin_is_refused_with_403_and_local_or_same_origin_pass(stack, http):
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(ws_url(stack.gateway, "x"), origin="https://evil.example")
    assert refused.value.status == 403
    async with http.get(stack.gateway.url + "/ws", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403
        body = await r.json()
        assert body["error"]["code"] == "forbidden"
    token = stack.token("gina")
    for origin in ("http://localhost:3000", stack.gateway.url, "http://127.0.0.1:1"):
        async with http.ws_connect(ws_url(stack.gateway, token), origin=origin) as ws:
            assert (await recv(ws))["type"] == "welcome"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_envelope"),
        ('{"id": "e1", "payload": "text"}', "invalid_envelope"),
        ('{"id": "e1", "payload": {"message": "x"}, "extra": 1}', "invalid_envelope"),
        ('{"id": "e1", "channel": "nope", "payload": {"message": "x"}}', "unknown_channel"),
        ('{"id": "e1", "intent": "dance", "payload": {"message": "x"}}', "unknown_intent"),
    ],
)
async def test_a_refused_frame_gets_an_error_and_the_socket_stays_open(stack, http, frame, code):
    token = stack.token("hank")
    async with http.ws_connect(ws_url(stack.gateway, token)) as ws:
        await recv(ws)
        await ws.send_str(frame)
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["code"] == code
        assert error["message"]
        if '"e1"' in frame:
            assert error["id"] == "e1"
        await ws.send_str(chat(id="after"))
        ack = await recv(ws)
        assert (ack["type"], ack["id"]) == ("ack", "after")


async def test_binary_frames_are_refused_with_an_error(stack, http):
    async with http.ws_connect(ws_url(stack.gateway, stack.token("ivan"))) as ws:
        await recv(ws)
        await ws.send_bytes(b'{"payload": {"message": "x"}}')
        error = await recv(ws)
        assert (error["type"], error["code"]) == ("error", "invalid_envelope")
        assert "binary" in error["message"]


async def test_an_oversized_frame_closes_1009(stack, http):
    async with http.ws_connect(ws_url(stack.gateway, stack.token("judy"))) as ws:
        await recv(ws)
        await ws.send_str(chat("x" * 70_000))
        assert (await close_of(ws))[0] == 1009


async def test_app_pong_is_liveness_only(stack, redis, http):
    async with http.ws_connect(ws_url(stack.gateway, stack.token("kate"))) as ws:
        cid = (await recv(ws))["connection_id"]
        registered = float(await redis.hget(names.connection(cid), "last_heartbeat"))
        first = await redis.zscore(names.LAST_SEEN, cid)
        await ws.send_str('{"type": "pong"}')

        async def moved() -> bool:
            beat = await redis.hget(names.connection(cid), "last_heartbeat")
            score = await redis.zscore(names.LAST_SEEN, cid)
            return float(beat) > registered and score is not None and score > first

        # The pong reaches Redis with the next liveness flush: the record and the last-seen
        # score move forward.
        await wait_for(moved, 5, what="the pong's liveness in Redis")
        # Any JSON object with "type": "pong" is a pong, however long: no answer either.
        await ws.send_str(orjson.dumps({"type": "pong", "timestamp": 1.5, "x": "y" * 200}).decode())
        await ws.send_str(chat(id="next"))
        # The first answer is the ack of the next message: the pongs got none.
        assert (await recv(ws))["id"] == "next"


async def test_answers_come_in_the_order_the_messages_came(stack, http):
    async with http.ws_connect(ws_url(stack.gateway, stack.token("kyle"))) as ws:
        await recv(ws)
        # Without ids the client can only match answers by order: the ack of the first
        # (valid) message must come before the error of the second, although the error is
        # known at once and the ack waits for Redis.
        await ws.send_str(chat("first, valid"))
        await ws.send_str(chat("second, invalid", channel="nope"))
        answers = [await recv(ws), await recv(ws)]
        assert [(a["type"], a["id"]) for a in answers] == [("ack", None), ("error", None)]
        assert answers[1]["code"] == "unknown_channel"
        frames = [
            chat("a"),
            "{broken",
            chat("b"),
            chat("c", intent="dance"),
            chat("d"),
            '{"type": "pong"}',
            "[]",
        ]
        for frame in frames:
            await ws.send_str(frame)
        got = [await recv(ws) for _ in range(6)]
        assert [(a["type"], a.get("code")) for a in got] == [
            ("ack", None),
            ("error", "invalid_json"),
            ("ack", None),
            ("error", "unknown_intent"),
            ("ack", None),
            ("error", "invalid_envelope"),
        ]


async def test_an_expired_session_is_closed_4401(stack, http):
    token = create_session(stack.traffic_cop.url, "ken", ttl_seconds=1)
    async with http.ws_connect(ws_url(stack.gateway, token)) as ws:
        assert (await recv(ws))["type"] == "welcome"
        assert await close_of(ws, 5) == (4401, "session expired")


async def test_the_session_metadata_is_in_the_registry_record(stack, redis, http):
    headers = {"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}
    body = {"user_id": "lena", "metadata": {"tenant": "t1", "roles": ["a"]}}
    async with http.post(stack.traffic_cop.url + "/v1/sessions", json=body, headers=headers) as r:
        assert r.status == 201
        token = (await r.json())["session_token"]
    async with http.ws_connect(ws_url(stack.gateway, token)) as ws:
        cid = (await recv(ws))["connection_id"]
        stored = await redis.hget(names.connection(cid), "metadata")
        assert orjson.loads(stored) == {"tenant": "t1", "roles": ["a"]}


async def test_deliveries_to_the_connection_and_channel_broadcasts_arrive_verbatim(
    stack, redis, http
):
    async with http.ws_connect(ws_url(stack.gateway, stack.token("leo"))) as ws:
        cid = (await recv(ws))["connection_id"]
        text = '{"type":"response","agent_type":"guide","message":"hi leo","n":1}'
        assert await redis.publish(names.connection_messages(cid), text) == 1
        msg = await ws.receive(timeout=timeout(5))
        assert msg.data == text
        # A broadcast reaches connections that used the channel.
        await ws.send_str(chat(id=1, channel="pillar:operations"))
        await recv(ws)
        await redis.publish(names.channel_broadcast("pillar:operations"), '{"type":"news"}')
        assert await recv(ws) == {"type": "news"}


async def test_the_control_channel_closes_a_socket_with_the_code_asked(stack, redis, http):
    async with http.ws_connect(ws_url(stack.gateway, stack.token("mia"))) as ws:
        cid = (await recv(ws))["connection_id"]
        command = {"op": "close", "connection_id": cid, "code": 4000, "reason": "bye"}
        assert (
            await redis.publish(names.gateway_control(stack.instance), orjson.dumps(command)) == 1
        )
        assert await close_of(ws) == (4000, "bye")
    await wait_for(lambda: _gone(redis, cid, "mia", stack.instance), 5)
    # The gateway's log names the code it sent, not the one the client echoed.
    await wait_for_log(stack.gateway, f'"disconnected (4000 bye)","connection_id":"{cid}"')


async def test_the_instance_announces_itself(stack, redis):
    assert await redis.sismember(names.GATEWAYS, stack.instance)
    ttl = await redis.pttl(names.gateway_instance(stack.instance))
    assert 0 < ttl <= 3000


async def test_legacy_paths_and_unknown_paths_answer_json_404(stack, http):
    for path in ("/api/ws/guide", "/api/ws/liaison", "/api/ws/agent", "/nope"):
        async with http.get(stack.gateway.url + path) as r:
            assert r.status == 404, path
            assert (await r.json())["error"]["code"] == "not_found"


async def test_operational_routes(stack, http):
    async with http.get(stack.gateway.url + "/ready") as r:
        assert r.status == 200
        checks = (await r.json())["checks"]
        assert {"redis", "traffic_cop", "pubsub"} <= set(checks)
        assert set(checks.values()) == {"ok"}
    async with http.get(stack.gateway.url + "/health") as r:
        assert r.status == 200
    async with http.get(stack.gateway.url + "/health/websocket-gateway") as r:
        body = await r.json()
        assert body["status"] == "ok" and body["instance"] == stack.instance
    async with http.get(stack.gateway.url + "/health/websocket-gateway/detailed") as r:
        body = await r.json()
        assert r.status == 200
        assert {"redis", "traffic_cop", "pubsub"} <= set(body["dependencies"])
        assert set(body["dependencies"].values()) == {"ok"}
        for field in ("connections", "messages_in", "messages_out", "uptime_seconds", "instance"):
            assert field in body
    async with http.get(stack.gateway.url + "/metrics") as r:
        text = await r.text()
        for metric in (
            "postoffice_gateway_connections ",
            "postoffice_gateway_frames_in_total",
            "postoffice_gateway_acks_total",
            "postoffice_gateway_closes_total",
            "postoffice_gateway_publish_batch_size_bucket",
        ):
            assert metric in text, metric


async def test_the_chat_page_is_served(stack, http):
    async with http.get(stack.gateway.url + "/?session_token=abc") as r:
        assert r.status == 200
        page = await r.text()
        assert 'data-ws-path="/ws"' in page
    async with http.get(stack.gateway.url + "/static/app.js") as r:
        assert r.status == 200
        assert "session_token" in await r.text()
