"""Every way a connection ends runs the same leave path to its end (issue: close paths that
always finish): unregistered from Redis (record and every index), unsubscribed from its pub/sub
channel (``PUBSUB NUMSUB`` 0), announced once on ``websocket:events``, ``disconnected`` logged —
even when the writer is blocked on a client that stopped reading, or cancelled.

Each case counts what it sent and what it saw, and asserts the counts."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from tests.gateway_util import (
    chat,
    client_of,
    close_of,
    instance_of,
    recv,
    redis_and_traffic_cop,
    registry_traces,
    small_receive_buffer_connector,
    start_gateway,
    ws_url,
)
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, timeout, wait_for

base = pytest.fixture(scope="module")(redis_and_traffic_cop)
redis = pytest.fixture(client_of)


@dataclass
class Events:
    """Every event published on ``websocket:events`` while the test runs."""

    seen: list[dict[str, object]] = field(default_factory=list)

    def of(self, cid: str) -> list[dict[str, object]]:
        """The events that announce ``cid``'s end (its ``connected`` is not one)."""
        return [
            e for e in self.seen if e.get("connection_id") == cid and e.get("type") != "connected"
        ]


@pytest.fixture
async def events(redis: Redis) -> AsyncIterator[Events]:
    out = Events()
    pubsub = redis.pubsub()
    await pubsub.subscribe(names.EVENTS)

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                out.seen.append(orjson.loads(message["data"]))

    task = asyncio.create_task(read())
    yield out
    task.cancel()
    await asyncio.wait([task])
    await pubsub.aclose()


async def _left_cleanly(
    redis: Redis, gw: ServiceProcess, events: Events, cid: str, user: str, event: str
) -> None:
    """The leave ran to its end: nothing of ``cid`` in Redis, nobody subscribed to its
    channel, one ``event`` announced, ``disconnected`` logged."""

    async def done() -> object:
        traces = await registry_traces(redis, cid, user, instance_of(gw))
        [(_, subscribers)] = await redis.pubsub_numsub(names.connection_messages(cid))
        if not traces and subscribers == 0 and len(events.of(cid)) == 1:
            return True
        state.append((traces, subscribers, events.of(cid)))
        return False

    state: list[object] = []
    try:
        await wait_for(done, 10, what=f"{cid} unregistered, unsubscribed and announced")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last (traces, subscribers, events): {state[-1:]}") from None
    [announced] = events.of(cid)
    assert announced["type"] == event, announced
    await wait_for(
        lambda: f'"connection_id":"{cid}"' in gw.log() and _disconnected(gw, cid),
        5,
        what="disconnected in the log",
    )


def _disconnected(gw: ServiceProcess, cid: str) -> bool:
    return any(cid in line and "disconnected (" in line for line in gw.log().splitlines())


async def test_a_reader_that_stops_reading_under_megabytes_is_closed_1013_and_unregistered(
    base, redis, events
):
    # The chaos case: an agent sends 10 MB to a client that reads nothing. The writer blocks
    # on the socket, the send queue fills, the gateway decides 1013 and cancels the writer
    # mid-write; the leave must still unregister, unsubscribe and announce.
    gw = start_gateway(base.redis_url, base.traffic_cop.url)
    try:
        frame = orjson.dumps({"type": "bulk", "data": "x" * 1_000_000}).decode()
        async with (
            aiohttp.ClientSession(connector=small_receive_buffer_connector()) as http,
            http.ws_connect(ws_url(gw, base.token("slow10"))) as ws,
        ):
            cid = (await recv(ws))["connection_id"]
            channel = names.connection_messages(cid)
            sent = delivered = after_close = 0
            for _ in range(10):  # 10 MB
                receivers = await redis.publish(channel, frame)
                sent += 1
                delivered += receivers
            # More than the 4 MiB budget was sent: the gateway must have let go by now, or
            # soon; every publish after that reaches nobody.
            await wait_for(lambda: _numsub_zero(redis, channel), 20, what="the gateway to let go")
            for _ in range(5):
                after_close += await redis.publish(channel, frame)
            assert (sent, after_close) == (10, 0)
            assert delivered >= 5  # at least the budget's worth reached the gateway
        await _left_cleanly(redis, gw, events, cid, "slow10", "disconnected")
        assert "disconnected (1013 too slow)" in gw.log()
    finally:
        gw.stop()


async def _numsub_zero(redis: Redis, channel: str) -> bool:
    [(_, count)] = await redis.pubsub_numsub(channel)
    return bool(count == 0)


@pytest.mark.parametrize(
    ("case", "expected_close", "event"),
    [
        ("revoked", (4401, "session revoked"), "disconnected"),
        ("control_1011", (1011, "bye"), "disconnected"),
        ("control_idle", (1008, "idle"), "evicted"),
        ("rate_limited", (4429, "rate limit exceeded"), "disconnected"),
        ("too_large", (1009, None), "disconnected"),
        ("client_close", (None, None), "disconnected"),
        ("client_gone", (None, None), "disconnected"),
    ],
)
async def test_every_close_runs_the_whole_leave(base, redis, events, case, expected_close, event):
    gw = start_gateway(
        base.redis_url,
        base.traffic_cop.url,
        GATEWAY_RATE_LIMIT_PER_SECOND="0.001",
        GATEWAY_RATE_LIMIT_BURST="2",
        GATEWAY_RATE_LIMIT_CLOSE_AFTER="2",
        GATEWAY_MAX_FRAME_BYTES="1024",
    )
    user = f"close-{case.replace('_', '-')}"
    token = base.token(user)
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(ws_url(gw, token))
            cid = (await recv(ws))["connection_id"]
            await ws.send_str(chat(id=1))
            assert (await recv(ws))["type"] == "ack"
            code: tuple[int | None, str | None] = (None, None)
            if case == "revoked":
                async with http.delete(
                    f"{base.traffic_cop.url}/v1/sessions/{token}",
                    headers={"Authorization": f"Bearer {TRAFFIC_COP_KEY}"},
                ) as r:
                    assert r.status == 204, await r.text()
                code = await close_of(ws)
            elif case.startswith("control_"):
                close_code, reason = (1011, "bye") if case == "control_1011" else (1008, "idle")
                command = {"op": "close", "connection_id": cid, "code": close_code}
                command["reason"] = reason
                await redis.publish(names.gateway_control(instance_of(gw)), orjson.dumps(command))
                code = await close_of(ws)
            elif case == "rate_limited":
                for i in range(2, 6):
                    await ws.send_str(chat(id=i))
                code = await close_of(ws)
            elif case == "too_large":
                await ws.send_str(chat("x" * 2000, id=2))
                got = await close_of(ws)
                code = (got[0], None)
            elif case == "client_close":
                await ws.close()
            elif case == "client_gone":
                # The TCP connection dies without a Close frame.
                transport = ws._response.connection.transport  # type: ignore[union-attr]
                assert transport is not None
                transport.abort()
            if expected_close[0] is not None:
                assert code == expected_close
            if not ws.closed:
                await ws.close()
        await _left_cleanly(redis, gw, events, cid, user, event)
    finally:
        gw.stop()


async def test_a_drain_runs_the_whole_leave_for_every_socket(base, redis, events):
    gw = start_gateway(base.redis_url, base.traffic_cop.url)
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(ws_url(gw, base.token(f"drain{i}"))) for i in range(5)]
        cids = [(await recv(ws))["connection_id"] for ws in sockets]
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGTERM)
        closes = [await close_of(ws, 10) for ws in sockets]
        assert closes == [(1001, "server shutting down")] * 5
    assert gw.proc.wait(timeout=timeout(15)) == 0
    for i, cid in enumerate(cids):
        assert not await registry_traces(redis, cid, f"drain{i}", instance_of(gw))
        [(_, subscribers)] = await redis.pubsub_numsub(names.connection_messages(cid))
        assert subscribers == 0
    await wait_for(lambda: all(len(events.of(cid)) == 1 for cid in cids), 5, what="one event each")
    gw.stop()
