"""Every limit of the gateway, and what happens past it; each test starts a gateway with tiny
settings against one module-scoped redis-server and Traffic Cop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from tests.gateway_util import (
    Base,
    chat,
    client_of,
    close_of,
    gateway_process,
    health_detail,
    instance_of,
    recv,
    redis_and_traffic_cop,
    registry_traces,
    small_receive_buffer_connector,
    start_gateway,
    start_traffic_cop,
    ws_url,
)
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, create_session, timeout, wait_for

base = pytest.fixture(scope="module")(redis_and_traffic_cop)
redis = pytest.fixture(client_of)


@pytest.fixture
def gateways(base: Base) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


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
        await ws.send_str(chat(id=3))
        error = await recv(ws)
        assert (error["type"], error["code"], error["id"]) == ("error", "rate_limited", 3)
        # A rate-limited frame longer than 1 KiB is not parsed: its error cannot echo the id.
        await ws.send_str(chat("x" * 2000, id=4))
        error = await recv(ws)
        assert (error["type"], error["code"], error["id"]) == ("error", "rate_limited", None)
        await ws.send_str(chat(id=5))
        assert await close_of(ws) == (4429, "rate limit exceeded")


async def test_pongs_are_free_within_their_allowance_then_cost_a_token(base, gateways):
    gw = gateway(
        base,
        gateways,
        GATEWAY_RATE_LIMIT_PER_SECOND="0.001",
        GATEWAY_RATE_LIMIT_BURST="3",
        GATEWAY_RATE_LIMIT_CLOSE_AFTER="3",
        GATEWAY_PONG_RATE_PER_SECOND="0.001",
        GATEWAY_PONG_BURST="2",
    )
    pong = '{"type": "pong"}'
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, base.token("po"))) as ws:
        await recv(ws)
        for _ in range(2):
            await ws.send_str(pong)  # free: the pong allowance
        for i in (1, 2):
            await ws.send_str(chat(id=i))
            assert (await recv(ws))["id"] == i  # two of the three tokens are still there
        await ws.send_str(pong)  # past the allowance: it takes the last token
        await ws.send_str(chat(id=3))
        error = await recv(ws)
        assert (error["type"], error["code"], error["id"]) == ("error", "rate_limited", 3)
        # Over the limit a pong is never answered, but it counts towards 4429.
        await ws.send_str(pong)
        await ws.send_str(pong)
        assert await close_of(ws) == (4429, "rate limit exceeded")


async def test_a_full_agent_queue_answers_unavailable(base, gateways, redis):
    gw = gateway(base, gateways, GATEWAY_STREAM_MAX_PENDING="1")
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, base.token("qb"))) as ws:
        await recv(ws)
        await ws.send_str(chat(id="a", channel="pillar:business_outcomes"))
        assert (await recv(ws))["status"] == "queued"
        await ws.send_str(chat(id="b", channel="pillar:business_outcomes"))
        error = await recv(ws)
        assert (error["type"], error["code"], error["id"]) == ("error", "unavailable", "b")
        assert await redis.xlen(names.stream("pillar:business_outcomes")) == 1
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
            return bool(delivered[-1] == 0)  # nobody subscribed any more: the gateway let go

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


async def test_a_client_that_answers_no_ping_is_evicted_1008_not_dropped(base, gateways, redis):
    # The gateway pings at the protocol level and with app pings every heartbeat; a client that
    # answers neither is evicted by the idle contract (1008 "idle", an evicted event), never
    # dropped with 1006 after one missed pong as aiohttp's own heartbeat would.
    heartbeat, idle = timeout(0.1), timeout(0.6)
    gw = gateway(
        base,
        gateways,
        GATEWAY_MAX_IDLE_SECONDS=str(idle),
        GATEWAY_HEARTBEAT_INTERVAL=str(heartbeat),
    )
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(gw, base.token("mute")), autoping=False) as ws,
    ):
        kinds: list[aiohttp.WSMsgType] = []
        while True:
            msg = await ws.receive(timeout=timeout(5))
            kinds.append(msg.type)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                assert (msg.data, msg.extra) == (1008, "idle")
                break
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.PING), msg
        assert aiohttp.WSMsgType.PING in kinds, "protocol pings are sent every heartbeat"
        assert kinds.count(aiohttp.WSMsgType.TEXT) >= 2  # welcome, then app pings


async def test_pings_keep_a_silent_client_alive(base, gateways):
    # Protocol pongs (answered by the client library) count as liveness, and the app ping
    # arrives every heartbeat interval, as the welcome frame announces.
    heartbeat, idle = timeout(0.1), timeout(0.4)
    gw = gateway(
        base,
        gateways,
        GATEWAY_MAX_IDLE_SECONDS=str(idle),
        GATEWAY_HEARTBEAT_INTERVAL=str(heartbeat),
    )
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(gw, base.token("alive"))) as ws,
    ):
        welcome = await recv(ws)
        assert welcome["heartbeat_interval"] == pytest.approx(heartbeat)
        pings = 0
        until = time.monotonic() + 3 * idle  # three idle bounds
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


async def test_capacity_limits_per_instance_and_per_session(base, gateways):
    gw = gateway(
        base, gateways, GATEWAY_MAX_CONNECTIONS="3", GATEWAY_MAX_CONNECTIONS_PER_SESSION="2"
    )
    shared_token = base.token("cap")
    async with aiohttp.ClientSession() as http:
        first = [await http.ws_connect(ws_url(gw, shared_token)) for _ in range(2)]
        for ws in first:
            assert (await recv(ws))["type"] == "welcome"
        async with http.ws_connect(ws_url(gw, shared_token)) as third:
            assert await close_of(third) == (4429, "too many connections for this session")
        other = await http.ws_connect(ws_url(gw, base.token("cap2")))
        assert (await recv(other))["type"] == "welcome"
        # Three sockets held: the next is closed before its token is even looked at.
        async with http.ws_connect(ws_url(gw, "not-a-token")) as fourth:
            assert await close_of(fourth) == (1013, "overloaded")
        for ws in [*first, other]:
            await ws.close()
        await wait_for(lambda: _sockets(gw, 0), 5, what="the gateway to let go of the sockets")
        # A refused token is remembered (by hash) for a few seconds: Traffic Cop is asked once.
        for _ in range(3):
            async with http.ws_connect(ws_url(gw, "bad-token")) as ws:
                assert await close_of(ws) == (4401, "invalid or expired session")
        async with http.get(gw.url + "/metrics") as r:
            text = await r.text()
        assert 'postoffice_gateway_connections_refused_total{reason="invalid_token"} 1.0' in text
        assert (
            'postoffice_gateway_connections_refused_total{reason="invalid_token_cached"} 2.0'
            in text
        )


async def test_the_send_queue_byte_budget_closes_1013(base, gateways, redis):
    gw = gateway(base, gateways, GATEWAY_SEND_QUEUE_BYTES="2048")
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, base.token("bb"))) as ws:
        cid = (await recv(ws))["connection_id"]
        small = orjson.dumps({"type": "note", "data": "x" * 1000}).decode()
        await redis.publish(names.connection_messages(cid), small)
        assert (await recv(ws))["type"] == "note"  # within the budget
        big = orjson.dumps({"type": "bulk", "data": "x" * 3000}).decode()
        await redis.publish(names.connection_messages(cid), big)
        assert await close_of(ws) == (1013, "too slow")


async def test_a_close_first_flushes_what_is_queued_acks_included(base, gateways, redis):
    gw = gateway(
        base,
        gateways,
        GATEWAY_SEND_QUEUE_BYTES="134217728",
        GATEWAY_SEND_QUEUE_FRAMES="100000",
        # Long enough for this client to read megabytes through its tiny receive buffer.
        GATEWAY_CLOSE_FLUSH_SECONDS=str(timeout(5)),
    )
    frame = orjson.dumps({"type": "bulk", "data": "x" * 16_000}).decode()
    async with (
        aiohttp.ClientSession(connector=small_receive_buffer_connector()) as http,
        http.ws_connect(ws_url(gw, base.token("flush"))) as ws,
    ):
        cid = (await recv(ws))["connection_id"]
        published = 0

        async def backed_up() -> bool:
            # The client reads nothing for now: deliveries fill the kernel's buffers, then
            # wait in the gateway's send queue.
            nonlocal published
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(50):
                    pipe.publish(names.connection_messages(cid), frame)
                published += sum(await pipe.execute())
            return bool((await health_detail(gw))["frames_queued"] > 0)

        await wait_for(backed_up, 20, interval=0, what="frames waiting in the send queue")
        before = await redis.xlen(names.stream("guide"))
        for i in range(5):
            await ws.send_str(chat(id=i))
        # No agent listens on guide: taken means queued. The acks wait behind the deliveries.
        await wait_for(
            lambda: _queued_at_least(redis, before + 5), 5, what="all five messages taken"
        )
        command = {"op": "close", "connection_id": cid, "code": 4000, "reason": "bye"}
        await redis.publish(names.gateway_control(instance_of(gw)), orjson.dumps(command))
        bulk, acks = 0, []
        while True:
            msg = await ws.receive(timeout=timeout(10))
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = orjson.loads(msg.data)
            if data["type"] == "bulk":
                bulk += 1
            elif data["type"] == "ack":
                acks.append(data["id"])
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4000, "bye")
        assert bulk == published
        assert acks == [0, 1, 2, 3, 4]


async def _queued_at_least(redis: Redis, count: int) -> bool:
    return bool(await redis.xlen(names.stream("guide")) >= count)


async def test_a_revocation_lost_while_pubsub_reconnects_still_closes(base, gateways, redis):
    # A slow pub/sub reconnect (at least half a scaled second): the revocation is published
    # while the gateway is not subscribed, so only the check after the resubscription can
    # see it.
    gw = gateway(
        base,
        gateways,
        GATEWAY_PUBSUB_BACKOFF_BASE_SECONDS=str(timeout(1)),
        GATEWAY_PUBSUB_BACKOFF_CAP_SECONDS=str(timeout(1)),
    )
    token = base.token("lost")
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, token)) as ws:
        cid = (await recv(ws))["connection_id"]
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await _revoke(http, base.traffic_cop.url, token)
        assert await close_of(ws, 5) == (4401, "session revoked")
    assert "session check: session revoked, closing" in gw.log()
    await wait_for(lambda: _absent(redis, cid, "lost", instance_of(gw)), 5)


async def test_the_periodic_session_check_closes_sessions_gone_from_redis(base, gateways, redis):
    gw = gateway(base, gateways, GATEWAY_SESSION_CHECK_SECONDS="0.2")
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(gw, base.token("gone"))) as gone,
        http.ws_connect(ws_url(gw, base.token("kept"))) as kept,
    ):
        cid = (await recv(gone))["connection_id"]
        await recv(kept)
        session_id = (await redis.hget(names.connection(cid), "session_id")).decode()
        # What a revocation whose message never arrived leaves behind: no session in Redis.
        await redis.delete(names.session_by_id(session_id))
        assert await close_of(gone, 5) == (4401, "session revoked")
        await kept.send_str(chat(id="ok"))
        assert (await recv(kept))["id"] == "ok"


async def _revoke(http: aiohttp.ClientSession, traffic_cop_url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}
    async with http.delete(f"{traffic_cop_url}/v1/sessions/{token}", headers=headers) as r:
        assert r.status == 204


async def test_an_unregister_traffic_cop_missed_is_retried(base, gateways, redis):
    traffic_cop = start_traffic_cop(base.redis_url)
    try:
        gw = gateway(
            base,
            gateways,
            TRAFFIC_COP_URL=traffic_cop.url,
            GATEWAY_TRAFFIC_COP_TIMEOUT_SECONDS="1",
            GATEWAY_UNREGISTER_RETRY_BASE_SECONDS="0.1",
            GATEWAY_UNREGISTER_RETRY_ATTEMPTS="20",
        )
        token = create_session(traffic_cop.url, "retry")
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(ws_url(gw, token))
            cid = (await recv(ws))["connection_id"]
            assert await redis.exists(names.session_of_connection(cid))
            traffic_cop.stop()
            await ws.close()  # leaving while Traffic Cop is down: its unregister fails
            await wait_for(lambda: _pending(gw, 1), 10, what="the unregister waiting for a retry")
            assert await redis.exists(names.session_of_connection(cid))
            traffic_cop.start()
            await wait_for(
                lambda: _gone_from_traffic_cop(redis, cid), 20, what="the retried unregister"
            )
            await wait_for(lambda: _pending(gw, 0), 5)
    finally:
        traffic_cop.stop()


async def _sockets(gw: ServiceProcess, count: int) -> bool:
    return bool((await health_detail(gw))["sockets"] == count)


async def _pending(gw: ServiceProcess, count: int) -> bool:
    return bool((await health_detail(gw))["unregisters_pending"] == count)


async def _gone_from_traffic_cop(redis: Redis, cid: str) -> bool:
    return not await redis.exists(names.session_of_connection(cid))
