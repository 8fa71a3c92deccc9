"""One eviction pass in-process (:class:`services.eviction_worker.worker.Evictor`), against a
real redis-server and, where Traffic Cop is involved, a real Traffic Cop process.

What a running worker process does with these passes (the loop, several copies, SIGTERM,
readiness) is in ``test_eviction_worker.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.eviction_worker.app import traffic_cop_reporter
from services.eviction_worker.reporter import TrafficCopReporter
from services.eviction_worker.settings import PREFIX, EvictionSettings
from services.eviction_worker.worker import Evictor
from shared import redis_names as names
from shared.registry import Registry
from shared.settings import load
from shared.streams import Streams
from shared.traffic_cop_client import TrafficCopClient
from tests.eviction_util import Subscriber, gateway_alive, gone, register, stale_time, traces
from tests.helpers import TRAFFIC_COP_KEY, RedisServer, ServiceProcess, timeout, wait_for


def metric_value(name: str, **labels: str) -> float:
    """A sample of this process' Prometheus registry (the pass runs in-process)."""
    value = REGISTRY.get_sample_value(name, labels)
    return -1.0 if value is None else value


MAX_IDLE = 30.0


def settings(
    redis_url: str, traffic_cop_url: str = "http://127.0.0.1:1", **env: str
) -> EvictionSettings:
    return load(
        EvictionSettings,
        PREFIX,
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": traffic_cop_url,
            "MAX_IDLE_SECONDS": str(MAX_IDLE),
            **env,
        },
    )


@pytest.fixture
async def registry(redis: Redis) -> Registry:
    return Registry(redis, record_ttl=3600)


@pytest.fixture
async def traffic_cop_client(traffic_cop: ServiceProcess) -> AsyncIterator[TrafficCopClient]:
    client = TrafficCopClient(traffic_cop.url, TRAFFIC_COP_KEY, timeout=timeout(5))
    yield client
    await client.aclose()


async def test_stale_connections_are_evicted_and_fresh_ones_kept(
    redis: Redis,
    redis_url: str,
    registry: Registry,
    traffic_cop: ServiceProcess,
    traffic_cop_client: TrafficCopClient,
) -> None:
    await gateway_alive(redis, "gw-a")
    await gateway_alive(redis, "gw-b")
    stale: dict[str, tuple[str, str]] = {}
    fresh: dict[str, tuple[str, str]] = {}
    now = time.time()
    for i in range(6):
        user, gateway = f"alice{i}", ("gw-a", "gw-b")[i % 2]
        session = await traffic_cop_client.create_session(user)
        seen = stale_time(MAX_IDLE) if i < 4 else now
        cid = await register(
            registry,
            user,
            gateway,
            seen,
            session_id=session["session_id"],
            channels=("guide", "pillar:content"),
        )
        assert await traffic_cop_client.register_connection(
            cid, session["session_id"], user, gateway
        )
        (stale if i < 4 else fresh)[cid] = (user, gateway)

    control = [names.gateway_control("gw-a"), names.gateway_control("gw-b")]
    async with Subscriber(redis_url, names.EVENTS, *control) as sub:
        async with traffic_cop_reporter(
            settings(redis_url, traffic_cop.url), timeout(10)
        ) as reporter:
            summary = await Evictor.from_settings(
                redis, settings(redis_url, traffic_cop.url), reporter
            ).run_pass()
            assert await reporter.flush(timeout(10))
            assert reporter.summary()["unregistered"] == 4

        assert summary.evicted == {"idle": 4, "gateway_lost": 0}
        assert summary.stale_found == 4 and summary.complete
        await wait_for(lambda: len(sub.received) >= 8, what="4 events and 4 close commands")

        events = sub.json(names.EVENTS)
        assert sorted(e["connection_id"] for e in events) == sorted(stale)
        for e in events:
            assert e["type"] == "evicted" and e["reason"] == "idle"
            assert (e["user_id"], e["gateway_instance"]) == stale[e["connection_id"]]
        for channel in control:
            gateway = channel.split(":")[2]
            closes = sub.json(channel)
            assert sorted(c["connection_id"] for c in closes) == sorted(
                cid for cid, (_, gw) in stale.items() if gw == gateway
            )
            assert all(
                c
                == {
                    "op": "close",
                    "connection_id": c["connection_id"],
                    "code": 1008,
                    "reason": "idle",
                }
                for c in closes
            )

    for cid, (user, gateway) in stale.items():
        assert gone(await traces(redis, cid, user, gateway, ("guide", "pillar:content")))
        assert not await redis.exists(names.session_of_connection(cid))
    for cid, (user, gateway) in fresh.items():
        t = await traces(redis, cid, user, gateway, ("guide", "pillar:content"))
        assert (
            t["record"]
            and t["last_seen"]
            and t["user_index"]
            and t["gateway_index"]
            and all(t["channel_index"])
        )
        assert await redis.exists(names.session_of_connection(cid))

    # A second pass finds nothing to do and announces nothing.
    async with Subscriber(redis_url, names.EVENTS) as sub:
        again = await Evictor.from_settings(redis, settings(redis_url)).run_pass()
        assert again.stale_found == 0 and again.evicted == {"idle": 0, "gateway_lost": 0}
        assert again.round_trips == 4  # stale page, gateways, their liveness, queue lengths
        await redis.publish(names.EVENTS, b'{"type": "marker"}')
        await wait_for(lambda: sub.received, what="the marker")
        assert sub.json() == [{"type": "marker"}]


class TouchedMidPass(Evictor):
    """A pass during which the gateway reports activity for some connections after their ids
    were read stale and before the claim: the race the script's re-check exists for."""

    touch: dict[str, float]
    gateway: Registry  # the gateway's registry (the worker's writes no records)

    async def _unregister(self, summary, ids, **kwargs):  # type: ignore[no-untyped-def]
        if self.touch:
            await self.gateway.touch(self.touch)
            self.touch = {}
        return await super()._unregister(summary, ids, **kwargs)


async def test_a_connection_seen_after_it_was_read_stale_is_not_evicted(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    at = stale_time(MAX_IDLE)
    ids = [await register(registry, f"bob{i}", "gw-a", at) for i in range(3)]
    evictor = TouchedMidPass.from_settings(redis, settings(redis_url))
    assert isinstance(evictor, TouchedMidPass)
    evictor.touch = {ids[1]: time.time()}
    evictor.gateway = registry
    async with Subscriber(redis_url, names.EVENTS) as sub:
        summary = await evictor.run_pass()
        assert summary.stale_found == 3
        assert summary.evicted["idle"] == 2 and summary.still_alive == 1
        await wait_for(lambda: len(sub.received) >= 2)
        assert sorted(e["connection_id"] for e in sub.json()) == sorted([ids[0], ids[2]])
    t = await traces(redis, ids[1], "bob1", "gw-a")
    assert t["record"] and t["user_index"] and t["gateway_index"] and t["last_seen"] > at


async def test_pass_limit_leaves_the_rest_for_the_next_pass(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    at = stale_time(MAX_IDLE)
    for i in range(25):
        await register(registry, f"carol{i}", "gw-a", at + i)
    evictor = Evictor.from_settings(
        redis, settings(redis_url, EVICTION_PASS_LIMIT="10", EVICTION_BATCH_SIZE="4")
    )
    first = await evictor.run_pass()
    assert first.evicted["idle"] == 10 and not first.complete
    assert await redis.zcard(names.LAST_SEEN) == 15
    # Oldest first: the survivors are the 15 seen last.
    assert await redis.zcount(names.LAST_SEEN, "-inf", at + 9.5) == 0
    second, third = await evictor.run_pass(), await evictor.run_pass()
    assert (second.evicted["idle"], second.complete) == (10, False)
    assert (third.evicted["idle"], third.complete) == (5, True)
    assert await redis.zcard(names.LAST_SEEN) == 0


async def test_a_dead_gateway_that_came_back_is_not_forgotten(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    """The instance restarts with the same id after the worker found it dead and before the
    cleanup scripts run: its records (the new process's, as far as anyone can tell) stay, and
    so does its bookkeeping."""
    now = time.time()
    await gateway_alive(redis, "gw-back")
    await redis.delete(names.gateway_instance("gw-back"))
    kept = await register(registry, "dave", "gw-back", now)

    class ComesBack(Evictor):
        async def _unregister(self, summary, ids, **kwargs):  # type: ignore[no-untyped-def]
            await gateway_alive(self.redis, "gw-back")
            return await super()._unregister(summary, ids, **kwargs)

    async with Subscriber(redis_url, names.EVENTS) as sub:
        summary = await ComesBack.from_settings(redis, settings(redis_url)).run_pass()
        assert summary.evicted["gateway_lost"] == 0 and summary.dead_gateways == []
        assert summary.gateway_back == 1
        await redis.publish(names.EVENTS, b'{"type": "marker"}')
        await wait_for(lambda: sub.received, what="the marker")
        assert sub.json() == [{"type": "marker"}]
    t = await traces(redis, kept, "dave", "gw-back")
    assert t["record"] and t["last_seen"] and t["user_index"] and t["gateway_index"]
    assert await redis.sismember(names.GATEWAYS, "gw-back")


async def test_a_gateway_coming_back_between_pages_keeps_the_later_pages(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    """Pages removed before the instance came back are gone (they were the dead process's);
    from the moment its liveness key exists, nothing of it is touched."""
    now = time.time()
    await gateway_alive(redis, "gw-flap")
    await redis.delete(names.gateway_instance("gw-flap"))
    ids = [await register(registry, f"eve{i}", "gw-flap", now) for i in range(12)]

    class BackAfterFirstEviction(Evictor):
        pages = 0

        async def _unregister(self, summary, ids, **kwargs):  # type: ignore[no-untyped-def]
            self.pages += 1
            results = await super()._unregister(summary, ids, **kwargs)
            if 1 in results:
                await gateway_alive(self.redis, "gw-flap")
            return results

    # SSCAN's COUNT is a hint: a small set comes back in one page. Enough members for a
    # hashtable-encoded set, and a COUNT of 1, give several pages.
    await redis.sadd(names.gateway_connections("gw-flap"), *[f"filler{i}" for i in range(200)])
    evictor = BackAfterFirstEviction.from_settings(
        redis, settings(redis_url, EVICTION_BATCH_SIZE="1")
    )
    assert isinstance(evictor, BackAfterFirstEviction)
    summary = await evictor.run_pass()
    assert evictor.pages >= 2
    assert summary.gateway_back >= 1 and summary.dead_gateways == []
    removed = [
        cid for i, cid in enumerate(ids) if gone(await traces(redis, cid, f"eve{i}", "gw-flap"))
    ]
    assert removed and summary.evicted["gateway_lost"] == len(removed)
    kept = [cid for cid in ids if cid not in removed]
    assert kept, "every record went although the gateway came back"
    for i, cid in enumerate(ids):
        if cid in kept:
            t = await traces(redis, cid, f"eve{i}", "gw-flap")
            assert t["record"] and t["user_index"] and t["gateway_index"] and t["last_seen"]
    assert await redis.sismember(names.GATEWAYS, "gw-flap")


async def test_a_dead_gateways_records_go_when_it_stays_dead(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    now = time.time()
    await gateway_alive(redis, "gw-gone")
    await redis.delete(names.gateway_instance("gw-gone"))
    ids = [await register(registry, f"fay{i}", "gw-gone", now) for i in range(3)]
    summary = await Evictor.from_settings(redis, settings(redis_url)).run_pass()
    assert summary.evicted["gateway_lost"] == 3 and summary.dead_gateways == ["gw-gone"]
    assert summary.gateway_back == 0
    for i, cid in enumerate(ids):
        assert gone(await traces(redis, cid, f"fay{i}", "gw-gone"))
    assert not await redis.sismember(names.GATEWAYS, "gw-gone")


async def test_a_stop_request_ends_the_pass_after_the_page_in_flight(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    """SIGTERM sets the stop event: the page in flight finishes, no further page is taken."""
    at = stale_time(MAX_IDLE)
    for i in range(12):
        await register(registry, f"kim{i}", "gw-a", at + i)

    class StoppedMidPass(Evictor):
        async def _unregister(self, summary, ids, **kwargs):  # type: ignore[no-untyped-def]
            self.stop.set()
            return await super()._unregister(summary, ids, **kwargs)

    evictor = StoppedMidPass.from_settings(redis, settings(redis_url, EVICTION_BATCH_SIZE="5"))
    summary = await evictor.run_pass()
    assert (summary.evicted["idle"], summary.complete) == (5, False)
    assert await redis.zcard(names.LAST_SEEN) == 7


async def test_after_a_redis_outage_idle_eviction_waits_for_the_gateways(
    private_redis: RedisServer,
) -> None:
    """While Redis was away the gateways could neither write last-seen times nor refresh their
    liveness keys: once it answers again, idle eviction and dead-gateway cleanup both wait out
    the grace period, or a Redis blip would evict every live connection."""
    grace = timeout(1.0)
    client = Redis.from_url(private_redis.url)
    evictor = Evictor.from_settings(
        client,
        settings(private_redis.url, EVICTION_RECOVERY_GRACE_SECONDS=str(grace)),
    )
    assert evictor.recovery_grace_seconds == grace
    task = asyncio.create_task(evictor.run(0.02, error_backoff_cap=0.1))
    try:
        await wait_for(lambda: evictor.last_summary is not None, what="a first pass")
        private_redis.stop()
        await wait_for(lambda: evictor.last_error is not None, what="a failed pass")
        private_redis.start()  # same port, empty
        registry = Registry(client, 3600)
        idle = await register(registry, "gus", "gw-live", stale_time(MAX_IDLE))
        await gateway_alive(client, "gw-live")
        await gateway_alive(client, "gw-dead")
        await client.delete(names.gateway_instance("gw-dead"))
        orphan = await register(registry, "hal", "gw-dead", time.time())
        registered = time.time()

        def deferred_pass_after_registering() -> bool:
            summary = evictor.last_summary
            return bool(summary and summary.started_at > registered and summary.idle_deferred)

        await wait_for(deferred_pass_after_registering, what="a pass inside the grace")
        summary = evictor.last_summary
        assert summary is not None and summary.stale_found == 0 and not summary.dead_gateways
        assert (await traces(client, idle, "gus", "gw-live"))["record"]
        assert (await traces(client, orphan, "hal", "gw-dead"))["record"]

        await wait_for(
            lambda: _gone(client, idle), seconds=grace + 5, what="idle eviction after the grace"
        )
        await wait_for(lambda: _forgotten(client, "gw-dead"), what="the dead gateway cleaned up")
        assert gone(await traces(client, orphan, "hal", "gw-dead"))
        assert evictor.last_error is None
    finally:
        evictor.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout(5))
        await client.aclose()


async def _gone(client: Redis, cid: str) -> bool:
    return not await client.exists(names.connection(cid))


async def _forgotten(client: Redis, instance: str) -> bool:
    return not await client.sismember(names.GATEWAYS, instance)


async def test_dropped_reports_are_logged_at_most_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A long Traffic Cop outage can drop a whole backlog: one log line per second with a count,
    not one per report."""
    client = TrafficCopClient("http://127.0.0.1:9", TRAFFIC_COP_KEY, timeout=timeout(1))
    try:
        reporter = TrafficCopReporter(client, concurrency=1, limit=10)
        with caplog.at_level(logging.WARNING, logger="services.eviction_worker.reporter"):
            reporter.submit(f"ws_u_{i:08x}" for i in range(10_010))
        assert reporter.dropped == 10_000 and reporter.pending == 10
        lines = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]  # 2: a second boundary
        assert "(1 so far)" in lines[0].getMessage()
    finally:
        await client.aclose()


# -- streams: reclaim, dead letters, stale consumers, trimming ---------------------------------


async def _publish(registry: Registry, channel: str, n: int, prefix: str = "m") -> list[bytes]:
    data = [f"{prefix}{i}".encode() for i in range(n)]
    await registry.run_scripts([registry.publish_or_queue_call(channel, d, 10_000) for d in data])
    return data


async def _read(redis: Redis, channel: str, group: str, consumer: str) -> list[bytes]:
    """What the consumer gets with XREADGROUP > (also marks it live in Redis)."""
    raw = await redis.xreadgroup(group, consumer, {names.stream(channel): ">"}, count=1000)
    return [f[b"data"] for _i, f in raw[0][1]] if raw else []


async def _holders(redis: Redis, channel: str, group: str) -> list[tuple[str, int]]:
    rows = await redis.xpending_range(names.stream(channel), group, "-", "+", 1000)
    return [(r["consumer"].decode(), r["times_delivered"]) for r in rows]


async def test_unacked_messages_go_to_a_live_consumer_then_to_the_dead_letters(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    channel, group = "pillar:insights", "insights"
    await Streams(redis).ensure_group(channel, group)
    sent = await _publish(registry, channel, 3)
    assert await _read(redis, channel, group, "dies") == sent  # read, never acked
    evictor = Evictor.from_settings(
        redis, settings(redis_url, ACK_TIMEOUT_SECONDS="0.05", MAX_DELIVERIES="2")
    )
    await Streams(redis).heartbeat(channel, group, "lives")  # live, holds nothing

    async def reclaimed() -> int:
        return (await evictor.run_pass()).reclaimed[channel]

    assert await wait_for(reclaimed, what="a pass reclaims") == 3
    # Handed to the live consumer holding the fewest, delivery count carried on.
    assert await _holders(redis, channel, group) == [("lives", 2)] * 3
    assert metric_value("postoffice_stream_redeliveries_total", channel=channel, group=group) >= 3

    async def dead() -> int:
        await Streams(redis).heartbeat(channel, group, "lives")  # stays live, never acks
        return (await evictor.run_pass()).dead_lettered[channel]

    assert await wait_for(dead, what="dead-lettered") == 3
    assert await _holders(redis, channel, group) == []  # acked into the dead letters
    letters = await Streams(redis).dead_letters(channel)
    assert [(d.data, d.group, d.deliveries, d.reason) for d in letters] == [
        (m, group, 2, "max_deliveries") for m in sent
    ]
    # Re-queued: appended to the stream again, gone from the dead letters.
    new_ids = await Streams(redis).requeue(channel, [letters[0].id, "1-1"])
    assert new_ids[0] is not None and new_ids[1] is None
    assert await redis.xlen(names.dead_letters(channel)) == 2
    assert await _read(redis, channel, group, "lives") == [sent[0]]


async def test_nothing_is_reclaimed_without_a_live_consumer(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    channel, group = "guide", "guide"
    await Streams(redis).ensure_group(channel, group)
    await _publish(registry, channel, 2)
    await _read(redis, channel, group, "gone")
    evictor = Evictor.from_settings(
        redis,
        settings(redis_url, ACK_TIMEOUT_SECONDS="0.01", EVICTION_CONSUMER_LIVE_SECONDS="0.01"),
    )
    # "gone" is the only consumer; once it is not live, nobody can take its messages.
    await wait_for(lambda: _idle_past(redis, channel, group, 20), what="consumer idle")
    assert (await evictor.run_pass()).reclaimed[channel] == 0
    assert await _holders(redis, channel, group) == [("gone", 1)] * 2


async def _idle_past(redis: Redis, channel: str, group: str, ms: int) -> bool:
    consumers = await redis.xinfo_consumers(names.stream(channel), group)
    return all(c["idle"] > ms for c in consumers)


async def test_two_workers_at_once_hand_each_message_over_once(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    channel, group = "pillar:content", "content"
    await Streams(redis).ensure_group(channel, group)
    await _publish(registry, channel, 300)
    assert len(await _read(redis, channel, group, "dies")) == 300
    await Streams(redis).heartbeat(channel, group, "lives")
    env = {"ACK_TIMEOUT_SECONDS": "0.05", "EVICTION_RECLAIM_BATCH": "7"}
    workers = [Evictor.from_settings(redis, settings(redis_url, **env)) for _ in range(2)]
    await wait_for(lambda: _idle_past(redis, channel, group, 60), what="entries idle")
    summaries = await asyncio.gather(*(w.run_pass() for w in workers))
    assert sum(s.reclaimed[channel] for s in summaries) == 300
    assert await _holders(redis, channel, group) == [("lives", 2)] * 300


async def test_trim_keeps_everything_a_group_has_not_acked(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    channel = "guide"
    await _publish(registry, channel, 5)
    evictor = Evictor.from_settings(redis, settings(redis_url))
    # No group: nobody acked anything, nothing goes.
    assert (await evictor.run_pass()).trimmed[channel] == 0
    streams = Streams(redis)
    for group in ("fast", "slow"):
        await streams.ensure_group(channel, group)
    fast = await redis.xreadgroup("fast", "f", {names.stream(channel): ">"}, count=10)
    ids = [i for i, _f in fast[0][1]]
    await streams.ack(channel, "fast", ids)
    slow = await redis.xreadgroup("slow", "s", {names.stream(channel): ">"}, count=2)
    await streams.ack(channel, "slow", [slow[0][1][0][0]])  # acked the 1st, holds the 2nd
    # The slow group holds the 2nd entry: only the 1st may go.
    assert (await evictor.run_pass()).trimmed[channel] == 1
    assert [i for i, _f in await redis.xrange(names.stream(channel))] == ids[1:]
    await streams.ack(channel, "slow", [slow[0][1][1][0]])
    rest = await redis.xreadgroup("slow", "s", {names.stream(channel): ">"}, count=10)
    await streams.ack(channel, "slow", [i for i, _f in rest[0][1]])
    # Everything acked by both: trimmed down to the last delivered entry.
    assert (await evictor.run_pass()).trimmed[channel] == 3
    assert await redis.xlen(names.stream(channel)) == 1


async def test_stale_consumers_are_removed_unless_they_hold_messages(
    redis: Redis, redis_url: str, registry: Registry
) -> None:
    channel, group = "guide", "guide"
    await Streams(redis).ensure_group(channel, group)
    await _publish(registry, channel, 1)
    await _read(redis, channel, group, "holds")
    await Streams(redis).heartbeat(channel, group, "empty")
    evictor = Evictor.from_settings(
        redis,
        settings(
            redis_url,
            EVICTION_CONSUMER_STALE_SECONDS="0.01",
            EVICTION_CONSUMER_LIVE_SECONDS="0.01",
        ),
    )
    await wait_for(lambda: _idle_past(redis, channel, group, 20), what="consumers idle")
    assert (await evictor.run_pass()).consumers_removed == 1
    names_left = [c["name"] for c in await redis.xinfo_consumers(names.stream(channel), group)]
    assert names_left == [b"holds"]
    assert metric_value("postoffice_stream_group_pending", channel=channel, group=group) == 1
    assert metric_value("postoffice_stream_length", channel=channel) == 1
    assert (
        metric_value("postoffice_stream_oldest_pending_age_seconds", channel=channel, group=group)
        > 0
    )
