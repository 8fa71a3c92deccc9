"""shared/pubsub.py, the one pub/sub multiplexer, against a real redis-server: faults are
injected (CLIENT KILL, redis stopped, SIGSTOP, a reader that dies of a bug) and every test
counts what was published, delivered and lost."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from shared.pubsub import Hub, PubSubUnavailable
from shared.service import SERVICE, base_app
from tests.helpers import RedisServer, timeout, wait_for

_names = iter(range(1_000_000))


def _hub(url: str, **kw: Any) -> Hub:
    # A fresh client name per hub: the metrics are labelled by it.
    return Hub(url, name=f"test-pubsub-{next(_names)}", backoff_base=0.01, backoff_cap=0.05, **kw)


def _metric(name: str, hub: Hub) -> float:
    return REGISTRY.get_sample_value(name, {"client": hub.name}) or 0.0


@pytest.fixture
async def running(redis_url: str) -> AsyncIterator[Hub]:
    hub = _hub(redis_url)
    reader = asyncio.create_task(hub.run())
    await wait_for(lambda: hub.connected, what="hub connected")
    yield hub
    reader.cancel()
    await asyncio.wait([reader])
    assert reader.cancelled()  # CancelledError propagated: the reader did not swallow it
    await hub.aclose()


async def _numsub(redis: Redis, channel: str) -> int:
    counts = dict(await redis.pubsub_numsub(channel))
    return int(counts.get(channel.encode(), 0))


async def test_subscribe_returns_once_confirmed_and_unsubscribe_stops_delivery(
    running: Hub, redis: Redis
) -> None:
    got: list[bytes] = []
    await running.subscribe("a", got.append)
    assert running.is_subscribed("a") and running.channel_count == 1
    # Confirmed: a publish right after subscribe() returns already counts this process.
    assert await redis.publish("a", b"1") == 1
    await wait_for(lambda: got == [b"1"], what="delivery")
    await running.unsubscribe("a", confirmed=True)
    assert await _numsub(redis, "a") == 0
    assert await redis.publish("a", b"2") == 0
    assert not running.is_subscribed("a") and running.channel_count == 0


async def test_resubscribes_after_the_connection_is_killed(running: Hub, redis: Redis) -> None:
    resubscribed = asyncio.Event()
    running.on_resubscribed(resubscribed.set)
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    for channel, received in got.items():
        await running.subscribe(channel, received.append)
    sent = 0
    for n in range(5):
        sent += await redis.publish("a", b"before-%d" % n)
    await wait_for(lambda: len(got["a"]) == 5, what="deliveries before the kill")
    reconnects = _metric("postoffice_pubsub_reconnects_total", running)

    killed = await redis.client_kill_filter(_type="pubsub")
    assert killed == 1  # the one pub/sub connection of the process
    # Published right after the kill: Redis counts no receiver (lost, and the publisher is
    # told so) unless the hub was already back, and then it is delivered.
    during = await redis.publish("b", b"during")
    await asyncio.wait_for(resubscribed.wait(), timeout(5))
    assert running.connected and running.reconnects == 1
    assert _metric("postoffice_pubsub_reconnects_total", running) == reconnects + 1
    assert await _numsub(redis, "a") == 1 and await _numsub(redis, "b") == 1
    for n in range(5):
        sent += await redis.publish("b", b"after-%d" % n)
    await wait_for(lambda: len(got["b"]) == 5 + during, what="deliveries after resubscription")
    assert sent == 10 and during in (0, 1)
    assert got["b"][:during] == [b"during"] * during
    assert got["a"] == [b"before-%d" % n for n in range(5)]
    assert got["b"][-5:] == [b"after-%d" % n for n in range(5)]


async def test_a_raising_handler_does_not_kill_the_reader(running: Hub, redis: Redis) -> None:
    got: list[bytes] = []

    def handler(data: bytes) -> None:
        if data == b"boom":
            raise ValueError("a handler bug")
        got.append(data)

    await running.subscribe("h", handler)
    errors = _metric("postoffice_pubsub_handler_errors_total", running)
    for data in (b"1", b"boom", b"2", b"boom", b"3"):
        assert await redis.publish("h", data) == 1
    await wait_for(lambda: len(got) == 3, what="the messages after the failures")
    assert got == [b"1", b"2", b"3"]
    assert _metric("postoffice_pubsub_handler_errors_total", running) == errors + 2
    assert running.connected and running.restarts == 0 and running.reconnects == 0


class _BuggyHub(Hub):
    """Fault injection: a reader that dies of a bug, on a given message or at connect."""

    broken_connect = False

    def _dispatch(self, reply: dict[str, object]) -> None:
        if reply.get("data") == b"crash":
            raise RuntimeError("injected reader bug")
        super()._dispatch(reply)

    async def _connect(self, pubsub: Any) -> None:
        if self.broken_connect:
            raise RuntimeError("injected connect bug")
        await super()._connect(pubsub)


async def test_a_reader_that_dies_is_restarted_counted_and_shown_in_ready(
    aiohttp_client: Any, redis_url: str, redis: Redis
) -> None:
    hub = _BuggyHub(redis_url, name="test-pubsub-buggy", backoff_base=0.01, backoff_cap=0.05)
    app = base_app("pubsub-test", "t1")
    app[SERVICE].add_check("pubsub", hub.check)
    client = await aiohttp_client(app)
    reader = asyncio.create_task(hub.run())
    try:
        await wait_for(lambda: hub.connected, what="hub connected")
        resubscribed = asyncio.Event()
        hub.on_resubscribed(resubscribed.set)
        got: list[bytes] = []
        await hub.subscribe("r", got.append)
        restarts = _metric("postoffice_pubsub_listener_restarts_total", hub)
        assert await redis.publish("r", b"crash") == 1
        await wait_for(lambda: hub.restarts == 1, what="the reader died")
        await asyncio.wait_for(resubscribed.wait(), timeout(5))
        assert not reader.done()  # the supervisor loop restarted it
        assert _metric("postoffice_pubsub_listener_restarts_total", hub) == restarts + 1
        assert await redis.publish("r", b"after") == 1
        await wait_for(lambda: got == [b"after"], what="delivery after the restart")

        # A reader that keeps dying is never connected: /ready says so, with the count.
        hub.broken_connect = True
        await redis.client_kill_filter(_type="pubsub")
        await wait_for(lambda: hub.restarts >= 3, what="restarts while broken")
        assert not hub.connected and not reader.done()
        assert _metric("postoffice_pubsub_connected", hub) == 0
        ready = await client.get("/ready")
        assert ready.status == 503
        failing = (await ready.json())["failing"]
        assert "pubsub" in failing and "reader restarts" in failing["pubsub"]
        hub.broken_connect = False
        await wait_for(lambda: hub.connected, what="reconnected once fixed")
        assert (await client.get("/ready")).status == 200
        assert _metric("postoffice_pubsub_connected", hub) == 1
        assert await redis.publish("r", b"fixed") == 1
        await wait_for(lambda: got == [b"after", b"fixed"], what="delivery once fixed")
    finally:
        reader.cancel()
        await asyncio.wait([reader])
        await hub.aclose()


async def test_ready_fails_while_redis_is_down_and_recovers(
    aiohttp_client: Any, private_redis: RedisServer
) -> None:
    hub = _hub(private_redis.url)
    app: web.Application = base_app("pubsub-test", "t2")
    app[SERVICE].add_check("pubsub", hub.check)
    client = await aiohttp_client(app)
    reader = asyncio.create_task(hub.run())
    redis = Redis.from_url(private_redis.url)
    try:
        got: list[bytes] = []
        await wait_for(lambda: hub.connected, what="hub connected")
        await hub.subscribe("d", got.append)
        assert (await client.get("/ready")).status == 200
        private_redis.stop()
        await wait_for(lambda: not hub.connected, what="the loss noticed")
        ready = await client.get("/ready")
        assert ready.status == 503 and "pubsub" in (await ready.json())["failing"]
        with pytest.raises(PubSubUnavailable):
            await hub.subscribe("e", got.append)  # fails fast while down, not after a timeout
        assert hub.channel_count == 1  # "e" was not kept; "d" is still wanted
        private_redis.start()  # same port, empty: the hub subscribes "d" again by itself
        await wait_for(lambda: hub.is_subscribed("d"), seconds=10, what="resubscribed")
        assert (await client.get("/ready")).status == 200
        assert await redis.publish("d", b"back") == 1
        await wait_for(lambda: got == [b"back"], what="delivery after the restart")
        assert hub.reconnects >= 1
    finally:
        reader.cancel()
        await asyncio.wait([reader])
        await hub.aclose()
        await redis.aclose()


async def test_subscribe_raises_when_redis_does_not_confirm_in_time(
    private_redis: RedisServer,
) -> None:
    hub = _hub(private_redis.url, confirm_timeout=timeout(0.3))
    reader = asyncio.create_task(hub.run())
    redis = Redis.from_url(private_redis.url)
    assert private_redis.proc is not None
    pid = private_redis.proc.pid
    try:
        await wait_for(lambda: hub.connected, what="hub connected")
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(PubSubUnavailable, match="TimeoutError"):
                await hub.subscribe("late", lambda data: None)
            assert hub.channel_count == 0  # forgotten: nobody is told it is subscribed
        finally:
            os.kill(pid, signal.SIGCONT)
        # The SUBSCRIBE and the UNSUBSCRIBE that undid it are answered in order: not left behind.
        await wait_for(lambda: _numsub_is(redis, "late", 0), what="no leftover subscription")
        assert hub.connected and not hub.is_subscribed("late")
        await hub.subscribe("late", lambda data: None)  # and it works once Redis answers
        assert await redis.publish("late", b"x") == 1
    finally:
        reader.cancel()
        await asyncio.wait([reader])
        await hub.aclose()
        await redis.aclose()


async def _numsub_is(redis: Redis, channel: str, n: int) -> bool:
    return await _numsub(redis, channel) == n


async def test_unsubscribe_then_subscribe_race_reports_the_final_state(
    running: Hub, redis: Redis
) -> None:
    """An UNSUBSCRIBE in flight when the channel is subscribed again: subscribe() returns only
    on the reply to its own SUBSCRIBE, and the channel stays live."""
    got: list[bytes] = []
    await running.subscribe("x", got.append)
    async with running.lock:  # both commands queue behind the lock, then go out in order
        leaving = asyncio.create_task(running.unsubscribe("x", confirmed=True))
        await asyncio.sleep(0)
        joining = asyncio.create_task(running.subscribe("x", got.append))
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(leaving, joining), timeout(5))
    assert running.is_subscribed("x") and await _numsub(redis, "x") == 1
    assert await redis.publish("x", b"still") == 1
    await wait_for(lambda: got == [b"still"], what="delivery after the race")


async def test_messages_before_the_unsubscribe_confirmation_still_reach_the_handler(
    running: Hub, redis: Redis
) -> None:
    """PUBLISH counted this process until Redis confirmed the UNSUBSCRIBE: nothing it counted
    is dropped on the floor."""
    got: list[bytes] = []
    await running.subscribe("u", got.append)
    counted = 0
    async with running.lock:  # the UNSUBSCRIBE waits; meanwhile Redis still counts us
        leaving = asyncio.create_task(running.unsubscribe("u", confirmed=True))
        await asyncio.sleep(0)
        for n in range(3):
            counted += await redis.publish("u", b"%d" % n)
    await asyncio.wait_for(leaving, timeout(5))
    assert counted == 3 and got == [b"0", b"1", b"2"]
    assert await redis.publish("u", b"late") == 0


async def test_many_channels_resubscribe_in_chunks(running: Hub, redis: Redis) -> None:
    resubscribed = asyncio.Event()
    running.on_resubscribed(resubscribed.set)
    got: list[bytes] = []
    channels = [f"many:{n}" for n in range(2500)]  # more than one SUBSCRIBE chunk
    await running.subscribe(channels[0], got.append)
    for channel in channels[1:]:
        running.watch(channel, got.append)  # not sent now: subscribed on the next connection
    assert running.channel_count == 2500 and not running.is_subscribed(channels[1])
    assert await redis.client_kill_filter(_type="pubsub") == 1
    await asyncio.wait_for(resubscribed.wait(), timeout(10))
    assert all(running.is_subscribed(c) for c in channels)
    assert await redis.publish(channels[-1], b"last") == 1
    await wait_for(lambda: got == [b"last"], what="delivery on the last chunk")
