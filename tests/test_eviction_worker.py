"""The eviction worker as real processes (``python -m services.eviction_worker``) against a real
redis-server: the pass loop, several copies at once, dead gateways, queue drain, run-once mode,
SIGTERM, readiness and Consul registration, and a Traffic Cop that is down.

Passes themselves are tested in-process in ``test_eviction_pass.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable

from redis.asyncio import Redis

from shared import redis_names as names
from shared.registry import PublishResult, Registry
from shared.streams import Streams
from shared.traffic_cop_client import TrafficCopClient
from tests.consul_api import ConsulServer
from tests.eviction_util import (
    FAST,
    Subscriber,
    gateway_alive,
    get_json,
    get_text,
    gone,
    metric,
    register,
    register_many,
    stale_time,
    traces,
    worker_process,
)
from tests.helpers import (
    ROOT,
    TRAFFIC_COP_KEY,
    RedisServer,
    ServiceProcess,
    free_port,
    timeout,
    wait_for,
    wait_for_sync,
)

NOWHERE = "http://127.0.0.1:9"  # a Traffic Cop that never answers (discard port, nothing listens)


def run_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.eviction_worker"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **FAST, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout(30),
        check=False,
    )


async def test_run_once_prints_a_json_summary_and_exits_0(redis: Redis, redis_url: str) -> None:
    registry = Registry(redis, 3600)
    await gateway_alive(redis, "gw-a")
    stale = [await register(registry, f"erin{i}", "gw-a", stale_time(60)) for i in range(3)]
    fresh = await register(registry, "frank", "gw-a", time.time())
    done = run_once(
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": NOWHERE,
            "MAX_IDLE_SECONDS": "60",
            "EVICTION_RUN_ONCE": "true",
            "EVICTION_SHUTDOWN_TIMEOUT": "0.2",
        }
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["evicted"] == {"idle": 3, "gateway_lost": 0} and summary["complete"]
    # Traffic Cop did not answer within the bound: the reports are counted, not lost silently.
    assert summary["traffic_cop"]["pending"] + summary["traffic_cop"]["dropped"] == 3
    for i, cid in enumerate(stale):
        assert gone(await traces(redis, cid, f"erin{i}", "gw-a"))
    assert (await traces(redis, fresh, "frank", "gw-a"))["record"]


def test_bad_settings_stop_the_worker_with_a_message() -> None:
    done = run_once({"EVICTION_BATCH_SIZ": "10"})
    assert done.returncode == 2 and "EVICTION_BATCH_SIZ" in done.stderr
    done = run_once({"EVICTION_BATCH_SIZE": "0"})
    assert done.returncode == 2 and "EVICTION_BATCH_SIZE=0" in done.stderr


def test_run_once_with_redis_down_exits_1() -> None:
    done = run_once({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "EVICTION_RUN_ONCE": "1"})
    assert done.returncode == 1 and "eviction pass failed" in done.stderr


async def test_a_dead_gateways_records_are_removed(redis: Redis, redis_url: str) -> None:
    registry = Registry(redis, 3600)
    now = time.time()
    await gateway_alive(redis, "gw-dead", ttl_ms=300)
    await gateway_alive(redis, "gw-live")
    dead = [await register(registry, f"gina{i}", "gw-dead", now) for i in range(5)]
    live = [await register(registry, f"hank{i}", "gw-live", now) for i in range(3)]
    worker = worker_process(redis_url, NOWHERE, MAX_IDLE_SECONDS="300")
    async with Subscriber(redis_url, names.EVENTS) as sub:
        worker.start()
        try:
            # The liveness key expires 0.3 s in; the worker notices on its next pass.
            await wait_for(lambda: len(sub.received) >= 5, seconds=5, what="5 gateway_lost events")
            await wait_for(
                lambda: _not(redis.sismember(names.GATEWAYS, "gw-dead")), what="gw-dead forgotten"
            )
            status, body = get_json(worker.url + "/status")
            assert status == 200 and body["last_error"] is None
            text = get_text(worker.url + "/metrics")
            assert metric(text, "postoffice_eviction_dead_gateways_cleaned_total") == 1
            assert metric(text, "postoffice_eviction_evictions_total", 'reason="gateway_lost"') == 5
        finally:
            assert worker.stop() == 0
        events = sub.json()
    assert sorted(e["connection_id"] for e in events) == sorted(dead)
    assert all(e["type"] == "evicted" and e["reason"] == "gateway_lost" for e in events)
    started = [line for line in worker.log().splitlines() if "started: a pass every" in line]
    assert len(started) == 1 and "connections idle after 300.0s" in started[0]
    for i, cid in enumerate(dead):
        assert gone(await traces(redis, cid, f"gina{i}", "gw-dead"))
    assert not await redis.exists(names.gateway_connections("gw-dead"))
    for i, cid in enumerate(live):
        assert not gone(await traces(redis, cid, f"hank{i}", "gw-live"))
    assert await redis.sismember(names.GATEWAYS, "gw-live")


async def _not(awaitable: object) -> bool:
    return not await awaitable  # type: ignore[misc]


async def test_two_workers_announce_every_eviction_exactly_once(
    redis: Redis, redis_url: str
) -> None:
    """Two processes race over the same 500 connections as they turn stale together."""
    count = 500
    await gateway_alive(redis, "gw-a")
    # Two ids per page and one page in flight make a pass over the 500 a chain of 250 round
    # trips, while the other worker starts a pass every 10 ms: the passes overlap, so both
    # workers claim ids from the same pages.
    workers = [
        worker_process(
            redis_url,
            NOWHERE,
            MAX_IDLE_SECONDS="1",
            EVICTION_BATCH_SIZE="2",
            EVICTION_CONCURRENCY="1",
            EVICTION_INTERVAL_SECONDS="0.01",
        )
        for _ in range(2)
    ]
    async with Subscriber(redis_url, names.EVENTS, names.gateway_control("gw-a")) as sub:
        for w in workers:
            w.start()
        try:
            ids = await register_many(redis, count, "gw-a", time.time())
            await wait_for(
                lambda: len(sub.received) >= 2 * count, seconds=15, what="500 events and closes"
            )
            await wait_for(lambda: _not(redis.zcard(names.LAST_SEEN)), what="index empty")
            texts = [get_text(w.url + "/metrics") for w in workers]
        finally:
            codes = [w.stop() for w in workers]
        # Anything announced twice would have arrived by now too (both workers are stopped).
        await redis.publish(names.EVENTS, b'{"type": "marker"}')
        await wait_for(lambda: sub.received[-1][1] == b'{"type": "marker"}', what="the marker")
        events = [e for e in sub.json(names.EVENTS) if e["type"] != "marker"]
        closes = sub.json(names.gateway_control("gw-a"))
    assert codes == [0, 0]
    by_id = Counter(e["connection_id"] for e in events)
    assert set(by_id) == set(ids) and set(by_id.values()) == {1}
    assert all(e["type"] == "evicted" and e["reason"] == "idle" for e in events)
    assert Counter(c["connection_id"] for c in closes) == Counter(ids)
    per_worker = [metric(t, "postoffice_eviction_evictions_total", 'reason="idle"') for t in texts]
    lost = [metric(t, "postoffice_eviction_already_gone_total") for t in texts]
    assert sum(per_worker) == count, (per_worker, lost)
    # They did race: both claimed some, or one found ids the other had just taken.
    assert min(per_worker) > 0 or sum(lost) > 0, (per_worker, lost)


async def test_messages_accepted_before_any_agent_are_delivered_and_reclaimed(
    redis: Redis, redis_url: str
) -> None:
    """Accepted while no agent listens -> delivered, in order, when one comes; what a consumer
    that died held goes to a live one; acked history is trimmed. A real worker process."""
    registry = Registry(redis, 3600)
    streams = Streams(redis)
    channel, group = "guide", "guide"
    worker = worker_process(redis_url, NOWHERE, ACK_TIMEOUT_SECONDS="0.2").start()
    try:
        queued = [json.dumps({"n": i}).encode() for i in range(20)]
        for data in queued:
            assert await registry.publish_or_queue(channel, data, 1000) == PublishResult.QUEUED
        # Nobody reads: passes go by and trim nothing.
        passes = _passes(worker)
        await wait_for(lambda: _passes(worker) >= passes + 3, what="three more passes")
        assert await redis.xlen(names.stream(channel)) == 20
        # The first agent's group starts at 0: everything, in order.
        await streams.ensure_group(channel, group)
        got = await streams.read_new(channel, group, "dies", 100, 0)
        assert [e.data for e in got] == queued
        await streams.ack(channel, group, [e.id for e in got[:10]])  # then it dies

        async def handed() -> list[bytes]:
            await streams.heartbeat(channel, group, "lives")
            step = await streams.consume_step(channel, group, "lives", 100, [])
            return [e.data for e in step.unsent]

        assert await wait_for(handed, what="reclaimed by the worker") == queued[10:]
        await streams.ack(channel, group, [e.id for e in got[10:]])
        await wait_for(
            lambda: _at_most(redis.xlen(names.stream(channel)), 1), what="acked history trimmed"
        )
        text = get_text(worker.url + "/metrics")
        labels = 'channel="guide",group="guide"'
        assert metric(text, "postoffice_stream_redeliveries_total", labels) == 10
    finally:
        assert worker.stop() == 0


async def _at_most(value: Awaitable[int], n: int) -> bool:
    return await value <= n


async def test_sigterm_exits_0_and_deregisters_from_consul(redis_url: str) -> None:
    consul = ConsulServer(min_interval=0.05, plan_names=True).start()
    try:
        worker = worker_process(
            redis_url, NOWHERE, CONSUL_URL=consul.url, EVICTION_INSTANCE_ID="w1"
        )
        worker.start()
        try:
            wait_for_sync(
                lambda: consul.agent is not None and consul.agent.services, what="registered"
            )
            assert consul.agent is not None
            (service,) = consul.agent.services.values()
            assert (service.name, service.port) == ("eviction-worker", worker.port)
            status, body = get_json(worker.url + "/health")
            assert status == 200 and body["service"] == "eviction-worker"
            assert get_json(worker.url + "/ready")[0] == 200
            text = get_text(worker.url + "/metrics")
            assert "postoffice_eviction_pass_duration_seconds_bucket" in text
            assert metric(text, "postoffice_eviction_pass_duration_seconds_count") >= 1
        finally:
            started = time.monotonic()
            code = worker.stop()
        assert code == 0, worker.log()[-3000:]
        assert time.monotonic() - started < timeout(5)
        assert not consul.agent.services
    finally:
        consul.stop()


async def test_ready_names_redis_while_it_is_down_and_evictions_resume() -> None:
    server = RedisServer().start()
    # A short recovery grace: idle eviction waits it out after the outage (that wait is tested
    # in-process in test_eviction_pass.py).
    worker = worker_process(
        server.url, NOWHERE, MAX_IDLE_SECONDS="60", EVICTION_RECOVERY_GRACE_SECONDS="0.3"
    )
    client = Redis.from_url(server.url)
    try:
        worker.start()
        server.stop()
        status, body = await asyncio.to_thread(get_json, worker.url + "/ready")
        assert status == 503 and "redis" in body["failing"]
        assert (await asyncio.to_thread(get_json, worker.url + "/health"))[0] == 200
        await wait_for(
            lambda: get_json(worker.url + "/status")[1]["last_error"], what="a failed pass reported"
        )
        server.start()  # same port, empty
        cid = await register(Registry(client, 3600), "ivy", "gw-a", stale_time(60))
        await wait_for(lambda: get_json(worker.url + "/ready")[0] == 200, what="ready again")
        await wait_for(
            lambda: _not(client.exists(names.connection(cid))), what="evicted after recovery"
        )
        assert get_json(worker.url + "/status")[1]["last_error"] is None
    finally:
        await client.aclose()
        assert worker.stop() == 0
        server.cleanup()


async def test_traffic_cop_down_does_not_stop_evictions(redis: Redis, redis_url: str) -> None:
    """Evictions go on; reports wait (bounded: past the limit the oldest are dropped) and go out
    once Traffic Cop answers again."""
    port = free_port()
    cop_env = {
        "REDIS_URL": redis_url,
        "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
        "TRAFFIC_COP_PORT": str(port),
    }
    cop = ServiceProcess("services.traffic_cop_stub", cop_env, port=port).start()
    registry = Registry(redis, 3600)
    client = TrafficCopClient(cop.url, TRAFFIC_COP_KEY, timeout=timeout(5))
    ids = []
    try:
        for i in range(5):
            session = await client.create_session(f"jack{i}")
            cid = await register(
                registry, f"jack{i}", "gw-a", time.time(), session_id=session["session_id"]
            )
            assert await client.register_connection(cid, session["session_id"], f"jack{i}", "gw-a")
            ids.append(cid)
    finally:
        await client.aclose()
    assert cop.stop() == 0

    worker = worker_process(
        redis_url, cop.url, MAX_IDLE_SECONDS="60", EVICTION_TRAFFIC_COP_PENDING_LIMIT="3"
    ).start()
    try:
        await redis.zadd(names.LAST_SEEN, dict.fromkeys(ids, stale_time(60)))
        await wait_for(lambda: _not(redis.zcard(names.LAST_SEEN)), what="all 5 evicted")
        await wait_for(
            lambda: get_json(worker.url + "/status")[1]["traffic_cop"]["unavailable_calls"] >= 3,
            what="failed reports",
        )
        tc = get_json(worker.url + "/status")[1]["traffic_cop"]
        assert (tc["dropped"], tc["unregistered"]) == (2, 0)
        cop.start()  # same port, same Redis
        await wait_for(
            lambda: get_json(worker.url + "/status")[1]["traffic_cop"]["unregistered"] == 3,
            seconds=10,
            what="the waiting reports delivered",
        )
        tc = get_json(worker.url + "/status")[1]["traffic_cop"]
        assert (tc["pending"], tc["dropped"]) == (0, 2)
        # The two oldest reports were dropped: Traffic Cop still has those two connections.
        # (A page is in last-seen order, ties broken by id, so the oldest are the lowest ids.)
        left = [cid for cid in ids if await redis.exists(names.session_of_connection(cid))]
        assert sorted(left) == sorted(ids)[:2]
    finally:
        assert worker.stop() == 0
        cop.stop()


def _passes(worker: ServiceProcess) -> float:
    return metric(
        get_text(worker.url + "/metrics"), "postoffice_eviction_pass_duration_seconds_count"
    )
