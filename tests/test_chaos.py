"""Chaos: the whole stack as real processes — redis-server (AOF, ``everysec``), Traffic Cop,
the Post Office API, the eviction worker, one gateway and the guide agent — with clients
sending while one part is killed with SIGKILL and started again (or Redis restarted from its
append-only file).

Every case prints and asserts ``sent / acked / answered / refused / lost``:

* sent — chat frames the clients sent;
* acked — ``ack`` frames (``published`` or ``queued``);
* refused — ``error`` frames (explicit refusals the client can act on);
* answered — the guide's ``response`` to an acked message (``in_reply_to`` its message id);
* lost — acked but never answered within the deadline.

Each case is bounded: about a second of traffic around the fault, then a deadline for the
answers still on their way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from tests.api_util import guide_process
from tests.gateway_util import create_sessions, gateway_process
from tests.helpers import (
    TRAFFIC_COP_KEY,
    RedisServer,
    ServiceProcess,
    live_consumers,
    timeout,
    wait_for,
)

CLIENTS = 4
SEND_INTERVAL = 0.1
#: Traffic before the fault and after the recovery, each.
STEADY_SECONDS = 0.6
#: How long the killed part stays down.
DOWN_SECONDS = 0.5


@dataclass
class Counts:
    sent: int = 0
    acked: int = 0
    refused: int = 0
    answered: int = 0
    closed: int = 0
    message_ids: set[str] = field(default_factory=set)
    answers: set[str] = field(default_factory=set)

    @property
    def lost(self) -> int:
        return len(self.message_ids - self.answers)

    def line(self, case: str) -> str:
        return (
            f"{case}: sent={self.sent} acked={self.acked} answered={self.answered} "
            f"refused={self.refused} lost={self.lost} closed={self.closed}"
        )


class Stack:
    def __init__(self, redis_server: RedisServer) -> None:
        self.redis_server = redis_server
        url = redis_server.url
        fast_epoch = {"REDIS_EPOCH_CHECK_SECONDS": "0.5"}
        self.cop = ServiceProcess(
            "services.traffic_cop_stub",
            {"REDIS_URL": url, "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY, **fast_epoch},
        )
        self.cop.env["TRAFFIC_COP_PORT"] = str(self.cop.port)
        self.gateway = gateway_process(url, self.cop.url, **fast_epoch)
        self.api = ServiceProcess(
            "services.post_office_api",
            {
                "REDIS_URL": url,
                "GATEWAY_URLS": self.gateway.url,
                "TRAFFIC_COP_URL": self.cop.url,
                "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.5",
                "POST_OFFICE_PUBSUB_BACKOFF_BASE_SECONDS": "0.02",
                "POST_OFFICE_PUBSUB_BACKOFF_CAP_SECONDS": "0.2",
                **fast_epoch,
            },
        )
        self.api.env["POST_OFFICE_PORT"] = str(self.api.port)
        self.worker = ServiceProcess(
            "services.eviction_worker",
            {
                "REDIS_URL": url,
                "TRAFFIC_COP_URL": self.cop.url,
                "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                "EVICTION_INTERVAL_SECONDS": "0.2",
                "EVICTION_ERROR_BACKOFF_CAP_SECONDS": "0.5",
                **fast_epoch,
            },
        )
        self.worker.env["EVICTION_PORT"] = str(self.worker.port)
        self.agent = guide_process(
            self.api.url,
            GUIDE_AGENT_DELIVERY_DEADLINE_SECONDS=str(timeout(20)),
            GUIDE_AGENT_RETRY_BASE_SECONDS="0.05",
            GUIDE_AGENT_RETRY_CAP_SECONDS="0.5",
        )
        self.redis = Redis.from_url(url)

    def services(self) -> list[ServiceProcess]:
        return [self.cop, self.api, self.worker, self.gateway]

    async def start(self) -> None:
        for service in self.services():
            service.start()
        self.agent.start(wait_ready=False)
        await self.agent_listening()

    async def agent_listening(self, since: float | None = None) -> None:
        """The guide consumes its group again (its consumer said it is live since ``since``)."""

        async def listening() -> bool:
            with contextlib.suppress(Exception):
                return await live_consumers(self.redis, "guide", since) >= 1
            return False

        await wait_for(listening, 20, interval=0.05, what="the guide agent consuming")

    async def stop(self) -> None:
        self.agent.stop()
        for service in reversed(self.services()):
            service.stop()
        await self.redis.aclose()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    server = RedisServer(aof=True).start()
    chaos = Stack(server)
    try:
        await chaos.start()
        yield chaos
    finally:
        await chaos.stop()
        server.cleanup()


async def _client(
    http: aiohttp.ClientSession, url: str, n: int, counts: Counts, stop: asyncio.Event
) -> None:
    ws = await http.ws_connect(url)
    pending: dict[str, None] = {}
    done = asyncio.Event()

    async def read() -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frame = orjson.loads(msg.data)
            kind = frame.get("type")
            if kind == "ping":
                await ws.send_str('{"type": "pong"}')
            elif kind == "ack":
                counts.acked += 1
                counts.message_ids.add(frame["message_id"])
                pending.pop(frame.get("id", ""), None)
            elif kind == "error":
                counts.refused += 1
            elif kind == "response" and frame.get("in_reply_to") in counts.message_ids:
                reply_to = frame["in_reply_to"]
                counts.answered += reply_to not in counts.answers
                counts.answers.add(reply_to)
        if not done.is_set():  # the server closed it, not this client at the end
            counts.closed += 1

    reader = asyncio.create_task(read())
    try:
        seq = 0
        while not stop.is_set() and not ws.closed:
            seq += 1
            frame_id = f"c{n}-{seq}"
            pending[frame_id] = None
            await ws.send_str(
                orjson.dumps(
                    {"channel": "guide", "payload": {"message": f"m {frame_id}"}, "id": frame_id}
                ).decode()
            )
            counts.sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SEND_INTERVAL)
        # Until every answer is in (or the deadline): the reader counts them.
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: _settled(counts), 20, interval=0.05)
    finally:
        done.set()
        await ws.close()
        reader.cancel()
        await asyncio.wait([reader])


def _settled(counts: Counts) -> bool:
    return counts.sent == counts.acked + counts.refused and not counts.lost


async def run_case(stack: Stack, case: str, fault: Callable[[], Awaitable[Any]]) -> Counts:
    counts = Counts()
    stop = asyncio.Event()
    tokens = await create_sessions(stack.cop.url, [f"chaos{n}" for n in range(CLIENTS)])
    base = stack.gateway.url.replace("http://", "ws://")
    async with aiohttp.ClientSession() as http:
        clients = [
            asyncio.create_task(_client(http, f"{base}/ws?session_token={token}", n, counts, stop))
            for n, token in enumerate(tokens)
        ]
        await asyncio.sleep(STEADY_SECONDS)
        await fault()
        await asyncio.sleep(STEADY_SECONDS)
        stop.set()
        await asyncio.gather(*clients)
    print(counts.line(case))
    return counts


async def _down_and_up(service: ServiceProcess, stack: Stack, wait_ready: bool = True) -> None:
    service.kill()
    await asyncio.sleep(DOWN_SECONDS)
    service.start(wait_ready=wait_ready)


@pytest.mark.parametrize("part", ["agent", "api"])
async def test_kill_9_of_the_agent_or_the_api(stack: Stack, part: str) -> None:
    """While no agent consumes (the agent or the API it streams through is dead) messages wait
    in the guide stream and reach it once it is back; what the dead process held unacked (the
    agent's unanswered messages, the API's unwritten events) stays pending for the agent's
    consumer, which gets it again when it reconnects; the agent retries answers the API could
    not take. Nothing is lost."""
    service = stack.agent if part == "agent" else stack.api

    async def fault() -> None:
        since = time.time()
        await _down_and_up(service, stack, wait_ready=part == "api")
        await stack.agent_listening(since)

    counts = await run_case(stack, part, fault)
    assert counts.sent == counts.acked + counts.refused and counts.refused == 0
    assert counts.closed == 0
    assert counts.lost == 0, counts.line(part)


async def test_kill_9_of_the_worker(stack: Stack) -> None:
    counts = await run_case(stack, "worker", lambda: _down_and_up(stack.worker, stack))
    assert (counts.sent, counts.refused, counts.lost, counts.closed) == (counts.acked, 0, 0, 0)


async def test_kill_9_of_traffic_cop(stack: Stack) -> None:
    """Open sockets were authenticated at connect: they go on; a new connection during the
    outage is refused with an explicit HTTP status, never left hanging."""
    refused_upgrades: list[str] = []
    (late_token,) = await create_sessions(stack.cop.url, ["late"])

    async def fault() -> None:
        stack.cop.kill()
        async with aiohttp.ClientSession() as http:
            try:
                url = f"{stack.gateway.url}/ws?session_token={late_token}"
                async with http.ws_connect(url) as ws:
                    msg = await ws.receive(timeout(5))
                    refused_upgrades.append(f"{msg.type.name} {msg.data} {msg.extra or ''}")
            except aiohttp.WSServerHandshakeError as exc:
                refused_upgrades.append(f"HTTP {exc.status}")
        await asyncio.sleep(DOWN_SECONDS)
        stack.cop.start()

    counts = await run_case(stack, "traffic_cop", fault)
    print(f"traffic_cop: a new connection during the outage got {refused_upgrades}")
    assert (counts.sent, counts.refused, counts.lost, counts.closed) == (counts.acked, 0, 0, 0)
    assert len(refused_upgrades) == 1, refused_upgrades
    assert refused_upgrades[0].startswith(("HTTP 503", "CLOSE 1013")), refused_upgrades


async def test_redis_restarted_from_its_aof(stack: Stack) -> None:
    async def fault() -> None:
        stack.redis_server.stop(signal.SIGKILL)
        await asyncio.sleep(DOWN_SECONDS)
        stack.redis_server.start()
        await stack.agent_listening()

    counts = await run_case(stack, "redis_aof", fault)
    assert counts.sent == counts.acked + counts.refused
    assert counts.closed == 0
    # The gateway held what it accepted while Redis was away and handed it over after; the
    # agent retried its answers until the API could publish them again, and until the gateway
    # had re-subscribed (the API answers 503, not 410, to a live gateway that did not receive).
    # kill -9 of Redis loses nothing of its AOF even with everysec: written data sits in the
    # page cache; only a machine crash loses up to the last second.
    assert counts.lost == 0, counts.line("redis_aof")
    assert "Redis lost its data" not in stack.cop.log()  # the AOF kept the epoch
