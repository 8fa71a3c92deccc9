"""Durable agent delivery end to end, all real processes: redis-server, Traffic Cop, a gateway,
the Post Office API, the eviction worker and guide agent replicas sharing one consumer group.

Each test counts what clients sent, what the gateway acked or refused, what was answered
(and how often) and what was lost, and asserts the counts.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from post_office_client import GroupConsumer, GroupMessage, PostOfficeClient
from shared import redis_names as names
from tests.api_util import guide_process
from tests.gateway_util import chat, create_sessions, recv, start_gateway, ws_url
from tests.helpers import ServiceProcess, live_consumers, timeout, wait_for

CHANNEL = GROUP = "guide"
#: The API's per-consumer in-flight limit in these tests: what a dead replica can hold.
IN_FLIGHT = 8
ACK_TIMEOUT = "1"


@dataclass
class Stack:
    redis_url: str
    traffic_cop: ServiceProcess
    gateway: ServiceProcess
    api: ServiceProcess
    worker: ServiceProcess
    agents: dict[str, ServiceProcess] = field(default_factory=dict)

    def agent(self, name: str, **env: str) -> ServiceProcess:
        proc = guide_process(
            self.api.url,
            GUIDE_AGENT_CONSUMER=name,
            GUIDE_AGENT_IDLE_TIMEOUT_SECONDS=str(timeout(3)),
            GUIDE_AGENT_DELIVERY_DEADLINE_SECONDS=str(timeout(10)),
            **env,
        ).start(wait_ready=False)
        self.agents[name] = proc
        return proc


@pytest.fixture
def stack(redis_url: str, traffic_cop: ServiceProcess) -> Iterator[Stack]:
    started: list[ServiceProcess] = []
    agents: Any = ()
    try:
        gateway = start_gateway(
            redis_url,
            traffic_cop.url,
            GATEWAY_RATE_LIMIT_PER_SECOND="100000",
            GATEWAY_RATE_LIMIT_BURST="100000",
            GATEWAY_STREAM_MAX_PENDING="100000",
        )
        started.append(gateway)
        api = ServiceProcess(
            "services.post_office_api",
            {
                "REDIS_URL": redis_url,
                "POST_OFFICE_TRAFFIC_COP_URL": "",
                "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.2",
                "POST_OFFICE_GROUP_BLOCK_SECONDS": "0.2",
                "POST_OFFICE_GROUP_MAX_IN_FLIGHT": str(IN_FLIGHT),
                "POST_OFFICE_RATE_LIMIT_PER_SECOND": "0",
            },
        )
        api.env["POST_OFFICE_PORT"] = str(api.port)
        started.append(api.start())
        worker = ServiceProcess(
            "services.eviction_worker",
            {
                "REDIS_URL": redis_url,
                "TRAFFIC_COP_URL": traffic_cop.url,
                "EVICTION_INTERVAL_SECONDS": "0.1",
                "ACK_TIMEOUT_SECONDS": ACK_TIMEOUT,
                "MAX_DELIVERIES": "3",
                "EVICTION_CONSUMER_LIVE_SECONDS": "2",
            },
        )
        worker.env["EVICTION_PORT"] = str(worker.port)
        started.append(worker.start())
        s = Stack(redis_url, traffic_cop, gateway, api, worker)
        agents = s.agents.values()
        yield s
    finally:
        for proc in agents:
            proc.stop()
        for proc in reversed(started):
            proc.stop()


@dataclass
class Tally:
    sent: int = 0
    acked: dict[str, str] = field(default_factory=dict)  # client id -> message_id
    refused: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)  # message_id -> times answered
    order: dict[int, list[str]] = field(default_factory=dict)  # connection -> answers in order

    def lost(self) -> set[str]:
        return set(self.acked.values()) - set(self.answers)

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.answers.values())


async def run_clients(
    stack: Stack, connections: int, per_connection: int, tally: Tally, done: asyncio.Event
) -> list[asyncio.Task[None]]:
    """Open the connections, send every message, and keep reading acks and answers into
    ``tally`` until ``done`` is set (the returned tasks end then)."""
    tokens = await create_sessions(stack.traffic_cop.url, [f"u{n}" for n in range(connections)])
    session = aiohttp.ClientSession()

    async def client(n: int, token: str) -> None:
        tally.order[n] = []
        async with session.ws_connect(ws_url(stack.gateway, token)) as ws:
            await recv(ws)  # welcome
            for i in range(per_connection):
                await ws.send_str(chat(f"c{n} m{i}", id=f"{n}:{i}"))
                tally.sent += 1
            while not done.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except TimeoutError:
                    continue
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                frame = orjson.loads(msg.data)
                kind = frame.get("type")
                if kind == "ping":
                    await ws.send_str('{"type": "pong"}')
                elif kind == "ack":
                    tally.acked[frame["id"]] = frame["message_id"]
                elif kind == "error":
                    tally.refused.append(frame["id"])
                elif kind == "response":
                    tally.answers[frame["in_reply_to"]] += 1
                    tally.order[n].append(frame["in_reply_to"])

    tasks = [asyncio.create_task(client(n, t)) for n, t in enumerate(tokens)]
    sessions.append(session)
    return tasks


#: The client sessions of the running test, closed by :func:`finish`.
sessions: list[aiohttp.ClientSession] = []


async def finish(done: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    done.set()
    try:
        await asyncio.wait(tasks, timeout=timeout(10))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        while sessions:
            await sessions.pop().close()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def answered_by(agent: ServiceProcess) -> int:
    found = re.findall(r"stopped after (\d+) answer", agent.log())
    assert found, agent.log()[-2000:]
    return int(found[-1])


async def all_answered(tally: Tally, total: int) -> bool:
    return len(tally.acked) + len(tally.refused) == total and not tally.lost()


async def no_pending(redis: Redis) -> bool:
    info = await redis.xpending(names.stream(CHANNEL), GROUP)
    return int(info["pending"]) == 0


async def test_two_replicas_answer_1000_messages_exactly_once_and_share_them(
    stack: Stack, redis: Redis
) -> None:
    a, b = stack.agent("guide-a"), stack.agent("guide-b")
    await wait_for(lambda: _at_least(live_consumers(redis), 2), 20, what="both replicas")
    tally, done = Tally(), asyncio.Event()
    tasks = await run_clients(stack, 10, 100, tally, done)
    try:
        await wait_for(lambda: all_answered(tally, 1000), 120, what="every message answered")
        await wait_for(lambda: no_pending(redis), 10, what="every answer acked")
    finally:
        await finish(done, tasks)
    assert (tally.sent, len(tally.acked), len(tally.refused)) == (1000, 1000, 0)
    assert tally.lost() == set() and tally.duplicates() == 0
    assert set(tally.answers.values()) == {1}
    assert a.stop() == 0 and b.stop() == 0
    shares = answered_by(a), answered_by(b)
    assert sum(shares) == 1000 and min(shares) > 0, shares


async def test_a_replica_killed_mid_stream_loses_nothing(stack: Stack, redis: Redis) -> None:
    a, b = stack.agent("guide-a"), stack.agent("guide-b")
    await wait_for(lambda: _at_least(live_consumers(redis), 2), 20, what="both replicas")
    tally, done = Tally(), asyncio.Event()
    tasks = await run_clients(stack, 10, 100, tally, done)
    try:
        await wait_for(lambda: len(tally.answers) >= 300, 60, what="a third answered")
        a.kill()  # kill -9: what it held is reclaimed after ACK_TIMEOUT_SECONDS
        killed_at = len(tally.answers)
        await wait_for(lambda: all_answered(tally, 1000), 120, what="every message answered")
        await wait_for(lambda: no_pending(redis), 20, what="every answer acked")
    finally:
        await finish(done, tasks)
    print(
        f"sent={tally.sent} acked={len(tally.acked)} refused={len(tally.refused)} "
        f"answered={len(tally.answers)} lost={len(tally.lost())} "
        f"duplicates={tally.duplicates()} answered_before_kill={killed_at}"
    )
    assert (tally.sent, len(tally.acked), len(tally.refused)) == (1000, 1000, 0)
    assert tally.lost() == set()
    # At least once: a duplicate is a message the dead replica answered but did not get
    # acked; it held at most IN_FLIGHT unacked messages.
    assert tally.duplicates() <= IN_FLIGHT, tally.duplicates()
    assert 300 <= killed_at < 1000
    dead = await redis.xlen(names.dead_letters(CHANNEL))
    assert dead == 0
    assert b.stop() == 0
    assert answered_by(b) >= 1000 - killed_at - IN_FLIGHT


async def test_messages_sent_while_no_agent_runs_are_answered_in_order(
    stack: Stack, redis: Redis
) -> None:
    tally, done = Tally(), asyncio.Event()
    tasks = await run_clients(stack, 4, 25, tally, done)
    try:
        await wait_for(lambda: len(tally.acked) == 100, 30, what="all accepted")
        assert set(tally.acked) and not tally.answers  # nobody answers yet
        statuses = await redis.xlen(names.stream(CHANNEL))
        assert statuses == 100
        # One answer at a time: the stream delivers in order, and so the answers come in order
        # (a replica answering concurrently may finish them in any order).
        agent = stack.agent("guide-late", GUIDE_AGENT_MAX_IN_FLIGHT="1")
        await wait_for(lambda: all_answered(tally, 100), 60, what="answered once it came")
    finally:
        await finish(done, tasks)
    assert tally.lost() == set() and tally.duplicates() == 0
    by_id = {mid: cid for cid, mid in tally.acked.items()}
    for n, answers in tally.order.items():
        sent_order = [int(by_id[m].split(":")[1]) for m in answers]
        assert sent_order == sorted(sent_order), (n, sent_order)  # one replica: in order
    assert agent.stop() == 0


async def test_a_message_that_always_fails_reaches_the_dead_letters_and_can_be_requeued(
    stack: Stack, redis: Redis
) -> None:
    seen: list[int] = []
    async with PostOfficeClient(stack.api.url, "dev-smart_city") as po:
        published = await po.publish(CHANNEL, {"poison": True})
        async with GroupConsumer(
            po, CHANNEL, group="poison", consumer="p1", backoff_min=0.05, backoff_max=0.2
        ) as messages:

            async def fail_every_time() -> None:
                async for msg in messages:
                    if msg.message_id == published.message_id:
                        seen.append(msg.deliveries)  # the handler fails: never acked

            reader = asyncio.create_task(fail_every_time())
            try:
                await wait_for(
                    lambda: _dead(redis), 30, what="moved to the dead letters after 3 deliveries"
                )
            finally:
                reader.cancel()
                await asyncio.wait([reader])
        assert seen == [1, 2, 3]
        resp = await po.session.get(
            po.url(f"/v1/channels/{CHANNEL}/dead-letters"), headers=po.headers()
        )
        [letter] = (await resp.json())["dead_letters"]
        assert (letter["group"], letter["deliveries"], letter["reason"]) == (
            "poison",
            3,
            "max_deliveries",
        )
        assert letter["message"]["message_id"] == published.message_id
        resp = await po.session.post(
            po.url(f"/v1/channels/{CHANNEL}/dead-letters/requeue"),
            json={"ids": [letter["id"]]},
            headers=po.headers(),
        )
        assert len((await resp.json())["requeued"]) == 1
        # Fixed: the re-queued message comes once more and is acked.
        async with GroupConsumer(
            po, CHANNEL, group="poison", consumer="p2", backoff_min=0.05, backoff_max=0.2
        ) as messages:
            got = await _first_with(messages, published.message_id)
            assert await got.ack() == 1
    assert await redis.xlen(names.dead_letters(CHANNEL)) == 0
    text = await _metrics(stack.worker)
    assert 'postoffice_stream_dead_lettered_total{channel="guide",group="poison"} 1.0' in text


async def test_past_stream_max_pending_clients_get_unavailable_and_nothing_is_trimmed(
    redis_url: str, traffic_cop: ServiceProcess, redis: Redis
) -> None:
    gateway = start_gateway(redis_url, traffic_cop.url, GATEWAY_STREAM_MAX_PENDING="5")
    worker = ServiceProcess(
        "services.eviction_worker",
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": traffic_cop.url,
            "EVICTION_INTERVAL_SECONDS": "0.05",
        },
    )
    worker.env["EVICTION_PORT"] = str(worker.port)
    worker.start()
    try:
        await redis.xgroup_create(names.stream(CHANNEL), GROUP, id="0", mkstream=True)
        [token] = await create_sessions(traffic_cop.url, ["full"])
        acked, refused = [], []
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gateway, token)) as ws:
            await recv(ws)
            for i in range(8):
                await ws.send_str(chat(f"m{i}", id=i))
                frame = await recv(ws)
                (acked if frame["type"] == "ack" else refused).append((i, frame))
        assert [i for i, _f in acked] == [0, 1, 2, 3, 4]
        assert [(i, f["code"]) for i, f in refused] == [(i, "unavailable") for i in range(5, 8)]
        # Passes go by: nothing unacked is trimmed.
        passes = await _passes(worker)
        await wait_for(lambda: _at_least(_passes(worker), passes + 3), what="three passes")
        held = [
            orjson.loads(f[b"data"])["message_id"]
            for _i, f in await redis.xrange(names.stream(CHANNEL))
        ]
        assert held == [f["message_id"] for _i, f in acked]
        # The agent consumes and acks two: room for two more, and the acked ones are trimmed.
        read = await redis.xreadgroup(GROUP, "g1", {names.stream(CHANNEL): ">"}, count=2)
        await redis.xack(names.stream(CHANNEL), GROUP, *[i for i, _f in read[0][1]])
        await wait_for(
            lambda: _at_most(redis.xlen(names.stream(CHANNEL)), 4), what="acked history trimmed"
        )
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gateway, token)) as ws:
            await recv(ws)
            await ws.send_str(chat("again", id="x"))
            assert (await recv(ws))["type"] == "ack"
    finally:
        worker.stop()
        gateway.stop()


# -- helpers ----------------------------------------------------------------------------------


async def _at_least(value: Any, n: int) -> bool:
    return int(await value) >= n


async def _at_most(value: Any, n: int) -> bool:
    return int(await value) <= n


async def _dead(redis: Redis) -> bool:
    return int(await redis.xlen(names.dead_letters(CHANNEL))) == 1


async def _first_with(messages: GroupConsumer, message_id: str) -> GroupMessage:
    async def first() -> GroupMessage:
        async for msg in messages:
            if msg.message_id == message_id:
                return msg
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(first(), timeout(10))


async def _metrics(service: ServiceProcess) -> str:
    async with aiohttp.ClientSession() as http, http.get(service.url + "/metrics") as r:
        return await r.text()


async def _passes(worker: ServiceProcess) -> int:
    text = await _metrics(worker)
    found = re.search(r"^postoffice_eviction_pass_duration_seconds_count (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0
