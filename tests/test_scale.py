"""Horizontal scale, end to end: three gateway processes, the Post Office API, Traffic Cop and
eviction workers, all real processes on one private redis-server.

* delivery to a connection, a user and a channel reaches the right sockets on every gateway,
  exactly once, through the API and straight through Redis;
* the eviction WORKER (not the gateway's own idle check) evicts a silent client on another
  process: 1008 "idle", registry cleaned, exactly one ``evicted`` event; a live one stays;
* ``kill -9`` of a gateway: the worker removes its connections (``gateway_lost``) once its
  instance key expires; clients on the other gateways do not notice;
* revoking a session closes its sockets on every gateway with 4401 within a second;
* two workers racing over ~30 idle clients: every eviction announced and closed exactly once.

The stack is started once per module (the gateways leave idle eviction to the worker, see
``scale_util.GATEWAY_ENV``); each test starts its own workers, and a killed gateway is replaced
before the next test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from shared import redis_names as names
from tests.eviction_util import get_text, metric
from tests.gateway_util import close_of, create_sessions, registry_traces
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, timeout, wait_for
from tests.scale_util import (
    WORKER_INTERVAL,
    Api,
    Client,
    Clients,
    Events,
    Stack,
    frames_until,
    left_gateway,
    send_chat,
    start_together,
)


@pytest.fixture(scope="module")
def module_stack() -> Iterator[Stack]:
    stack = Stack()
    yield stack
    stack.stop()


@pytest.fixture
def stack(module_stack: Stack) -> Stack:
    module_stack.replace_dead_gateways()
    return module_stack


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def events(stack: Stack, redis: Redis) -> AsyncIterator[Events]:
    async with Events(stack.redis_url) as recorder:
        await recorder.fence(redis)  # subscribed for sure: nothing later is missed
        yield recorder


@pytest.fixture
def workers() -> Iterator[list[ServiceProcess]]:
    """Workers a test starts; stopped at its end."""
    started: list[ServiceProcess] = []
    yield started
    for worker in started:
        worker.stop()


async def traces_gone(redis: Redis, clients: list[Client]) -> bool:
    for c in clients:
        if await registry_traces(redis, c.id, c.user, c.instance):
            return False
    return True


async def test_delivery_reaches_every_gateway_exactly_once(
    stack: Stack, redis: Redis, http: aiohttp.ClientSession
) -> None:
    gw = stack.gateways
    api = Api(http, stack.api.url)
    users = ["alice", "bob", "carol"]
    tokens = dict(zip(users, await create_sessions(stack.traffic_cop.url, users), strict=True))
    async with Clients(http) as clients:
        # Every user on two gateways, two clients on every gateway.
        placement = [("alice", 0), ("alice", 1), ("bob", 1), ("bob", 2), ("carol", 2), ("carol", 0)]
        conns = [await clients.connect(gw[g], tokens[u]) for u, g in placement]
        # pillar:insights is used by one client per gateway; the others use another channel.
        insights = [conns[0], conns[2], conns[3]]
        for i, c in enumerate(conns):
            channel = "pillar:insights" if c in insights else "pillar:operations"
            ack = await send_chat(c, channel, f"m{i}")
            assert ack["type"] == "ack" and ack["id"] == f"m{i}", ack

        expected: dict[str, list[object]] = {c.id: [] for c in conns}
        for c in conns:
            message = {"kind": "direct", "to": c.id}
            assert await api.to_connection(c.id, message) == (202, {"delivered": 1})
            expected[c.id].append(message)
        for user in users:
            message = {"kind": "user", "to": user}
            status, body = await api.to_user(user, message)
            assert status == 202 and body["delivered"] == 2 and body["connections"] == 2, body
            for c in conns:
                if c.user == user:
                    expected[c.id].append(message)
        broadcast = {"kind": "broadcast", "channel": "pillar:insights"}
        status, body = await api.broadcast("pillar:insights", broadcast)
        assert status == 202 and body["gateways"] == 3, body
        for c in insights:
            expected[c.id].append(broadcast)
        for c in conns:
            # Straight through Redis, as an agent without the API would.
            message = {"kind": "redis", "to": c.id}
            receivers = await redis.publish(names.connection_messages(c.id), orjson.dumps(message))
            assert receivers == 1, f"{c.id}: {receivers} gateways subscribed"
            expected[c.id].append(message)

        # A fence after everything: what a socket got before it is all it will ever get.
        for c in conns:
            assert await api.to_connection(c.id, {"fence": c.id}) == (202, {"delivered": 1})
        got = await asyncio.gather(*(frames_until(c.ws, {"fence": c.id}) for c in conns))
        for c, frames in zip(conns, got, strict=True):
            assert frames == expected[c.id], f"{c.id} on {c.instance}"


async def test_worker_evicts_a_silent_client_on_a_gateway_and_spares_a_live_one(
    stack: Stack,
    redis: Redis,
    http: aiohttp.ClientSession,
    events: Events,
    workers: list[ServiceProcess],
) -> None:
    max_idle = timeout(1.0)
    worker = stack.worker(max_idle)
    workers.append(worker)
    start_together(worker)
    gateway = stack.gateways[1]
    silent_token, live_token = await create_sessions(stack.traffic_cop.url, ["sid", "liv"])
    async with Clients(http) as clients:
        live = await clients.connect(gateway, live_token)

        async def keep_talking() -> None:
            # The live client's own rhythm (not a wait): an app pong five times per idle bound.
            while True:
                await live.ws.send_str('{"type": "pong"}')
                await asyncio.sleep(max_idle / 5)

        talker = asyncio.create_task(keep_talking())
        try:
            silent = await clients.connect(gateway, silent_token, autoping=False)
            welcomed = time.monotonic()
            # The bound: the idle limit, one worker interval, the liveness flush, slack.
            bound = 1.0 + WORKER_INTERVAL + 0.05 + 1.0
            code, reason = await close_of(silent.ws, bound)
            took = time.monotonic() - welcomed
            assert (code, reason) == (1008, "idle")
            assert max_idle * 0.5 <= took <= timeout(bound), took

            await wait_for(
                lambda: traces_gone(redis, [silent]), 5, what="the silent client's records gone"
            )
            # The gateway has finished with it (its own unregister found nothing left to
            # announce); then a fence: every event about it has arrived.
            await wait_for(lambda: left_gateway(gateway, silent.id), 5, what="gateway left it")
            await events.fence(redis)
            terminal = [e for e in events.of(silent.id) if e["type"] != "connected"]
            assert [(e["type"], e["reason"], e["gateway_instance"]) for e in terminal] == [
                ("evicted", "idle", silent.instance)
            ], terminal

            # The live client outlived the same idle bound, on the same gateway.
            assert not live.ws.closed
            assert await redis.exists(names.connection(live.id)) == 1
            assert [e["type"] for e in events.of(live.id)] == ["connected"]
            ack = await send_chat(live, "guide", "still-here")
            assert ack["type"] == "ack" and ack["id"] == "still-here", ack
        finally:
            talker.cancel()
            await asyncio.gather(talker, return_exceptions=True)
    status = get_text(worker.url + "/metrics")
    assert metric(status, "postoffice_eviction_evictions_total", 'reason="idle"') == 1


async def test_kill_9_of_a_gateway_is_cleaned_and_the_others_carry_on(
    stack: Stack,
    redis: Redis,
    http: aiohttp.ClientSession,
    events: Events,
    workers: list[ServiceProcess],
) -> None:
    worker = stack.worker(600)
    workers.append(worker)
    start_together(worker)
    api = Api(http, stack.api.url)
    users = [f"k{i}" for i in range(6)]
    tokens = await create_sessions(stack.traffic_cop.url, users)
    async with Clients(http) as clients:
        conns = [
            await clients.connect(stack.gateways[i % 3], token) for i, token in enumerate(tokens)
        ]
        doomed_gateway = stack.gateways[2]
        doomed = [c for c in conns if c.gateway is doomed_gateway]
        survivors = [c for c in conns if c.gateway is not doomed_gateway]
        dead_instance = doomed[0].instance
        assert len(doomed) == 2 and len(survivors) == 4

        doomed_gateway.kill()
        # Instance TTL (its key was refreshed at most then), one worker interval, slack.
        bound = 1.5 + WORKER_INTERVAL + 2.0
        await wait_for(
            lambda: traces_gone(redis, doomed), bound, what="the dead gateway's records gone"
        )

        async def forgotten() -> bool:
            return not await redis.sismember(names.GATEWAYS, dead_instance) and not (
                await redis.exists(names.gateway_connections(dead_instance))
            )

        await wait_for(forgotten, 5, what="the dead instance forgotten")
        await events.fence(redis)
        for c in doomed:
            terminal = [e for e in events.of(c.id) if e["type"] != "connected"]
            assert [(e["type"], e["reason"], e["gateway_instance"]) for e in terminal] == [
                ("evicted", "gateway_lost", dead_instance)
            ], terminal
            status, body = await api.to_connection(c.id, {"late": True})
            assert status == 410, body

        # The other gateways' clients noticed nothing: no event, deliveries and acks as before.
        for c in survivors:
            assert [e["type"] for e in events.of(c.id)] == ["connected"]
            assert await api.to_connection(c.id, {"after": c.id}) == (202, {"delivered": 1})
        for i, c in enumerate(survivors):
            assert await frames_until(c.ws, {"after": c.id}) == []
            ack = await send_chat(c, "guide", f"after-{i}")
            assert ack["type"] == "ack" and ack["id"] == f"after-{i}", ack
            assert not c.ws.closed
        # The killed gateway's clients lost their socket (no close frame: nobody sent one).
        for c in doomed:
            code, _ = await close_of(c.ws)
            assert code != 1000, code


async def test_revoking_a_session_closes_it_on_every_gateway(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    api = Api(http, stack.api.url)
    revoked_token, kept_token = await create_sessions(stack.traffic_cop.url, ["rita", "rita"])
    async with Clients(http) as clients:
        revoked = [await clients.connect(g, revoked_token) for g in stack.gateways]
        kept = [await clients.connect(g, kept_token) for g in stack.gateways]
        closed_at: dict[str, float] = {}

        async def closing(c: Client) -> tuple[int | None, str]:
            result = await close_of(c.ws, 10)
            closed_at[c.id] = time.monotonic()
            return result

        readers = [asyncio.create_task(closing(c)) for c in revoked]
        async with http.delete(
            f"{stack.traffic_cop.url}/v1/sessions/{revoked_token}",
            headers={"Authorization": f"Bearer {TRAFFIC_COP_KEY}"},
        ) as r:
            assert r.status == 204, await r.text()
        revoked_at = time.monotonic()
        closes = await asyncio.gather(*readers)
        assert closes == [(4401, "session revoked")] * 3
        for c in revoked:
            assert closed_at[c.id] - revoked_at <= timeout(1), (c.instance, closed_at, revoked_at)

        # The same user's other session is untouched on every gateway.
        for i, c in enumerate(kept):
            assert await api.to_connection(c.id, {"fence": c.id}) == (202, {"delivered": 1})
            assert await frames_until(c.ws, {"fence": c.id}) == []
            ack = await send_chat(c, "guide", f"k{i}")
            assert ack["type"] == "ack", ack


async def test_two_workers_evict_thirty_idle_clients_each_exactly_once(
    stack: Stack,
    redis: Redis,
    http: aiohttp.ClientSession,
    events: Events,
    workers: list[ServiceProcess],
) -> None:
    max_idle = timeout(1.0)
    # Both pass as often as they can, one id per page and one page in flight, so a pass over
    # the 30 stale ids is 30 round trips and the two passes overlap: each worker evicts some and
    # loses races for others (its already_gone count), as measured while writing this test.
    pair = [
        stack.worker(
            max_idle,
            EVICTION_INTERVAL_SECONDS="0.02",
            EVICTION_BATCH_SIZE="1",
            EVICTION_CONCURRENCY="1",
        )
        for _ in range(2)
    ]
    workers.extend(pair)
    start_together(*pair)
    users = [f"idle{i}" for i in range(30)]
    tokens = await create_sessions(stack.traffic_cop.url, users)
    async with Clients(http) as clients:
        idle = await clients.connect_many(
            [(stack.gateways[i % 3], token) for i, token in enumerate(tokens)], autoping=False
        )
        bound = 1.0 + WORKER_INTERVAL + 0.05 + 2.0
        closes = await asyncio.gather(*(close_of(c.ws, bound) for c in idle))
        assert closes == [(1008, "idle")] * 30

        await wait_for(lambda: traces_gone(redis, idle), 5, what="every idle record gone")
        await wait_for(
            lambda: all(left_gateway(c.gateway, c.id) for c in idle), 5, what="gateways left all"
        )
        await events.fence(redis)
        ids = {c.id for c in idle}
        counts = {k: n for k, n in events.terminal_counts().items() if k[0] in ids}
        assert counts == {(c.id, "evicted", "idle"): 1 for c in idle}, counts

    texts = [get_text(w.url + "/metrics") for w in pair]
    evicted = [metric(t, "postoffice_eviction_evictions_total", 'reason="idle"') for t in texts]
    lost = [metric(t, "postoffice_eviction_already_gone_total") for t in texts]
    assert sum(evicted) == 30, (evicted, lost)
    # They did race: both claimed some, or one found ids the other had just taken.
    assert min(evicted) > 0 or sum(lost) > 0, (evicted, lost)
