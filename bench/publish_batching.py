"""Publishing agent messages: pipelined batches versus awaiting each PUBLISH.

The gateway hands every accepted client message to one batched publisher per process, which
sends them as pipelines of ``publish_or_queue`` scripts (:mod:`shared.registry`). This compares
that with the obvious alternatives, on a private redis-server with one subscriber process on
the channel's tap (so the script answers "published", as in production). Each script run
appends the message to the channel's stream too (XADD), so these figures include it; the
stream is emptied between variants (in production the eviction worker trims what the groups
acked, which keeps the stream short and the script on its XLEN fast path), and the bound is
set high enough that no variant reaches it. ``redis_usec_per_call`` is Redis' own CPU time
per script run (``INFO commandstats``, evalsha, the commands it runs included),
``redis_usec_per_message`` Redis' CPU time of the whole variant divided by the messages.

* ``publish_await_each``: ``await redis.publish(...)`` one after another;
* ``script_await_each``: ``await registry.publish_or_queue(...)`` one after another;
* ``script_concurrent_<C>``: C tasks, each awaiting its own script call over the pool — what a
  gateway gets when every socket handler awaits its own publish;
* ``script_pipeline_<B>``: batches of B scripts per pipeline round trip — the gateway's way.

Run: ``python -m bench.publish_batching`` (``BENCH_QUICK=1`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from redis.asyncio import Redis

from bench.common import CountingSubscriber, latency_summary, quick, write_result
from shared import redis_names as names
from shared.protocol import ClientEnvelope, agent_message, new_message_id
from shared.redis_client import make_redis
from shared.registry import PublishResult, Registry
from tests.helpers import RedisServer

CHANNEL = "guide"
#: STREAM_MAX_PENDING for the benchmark: above what any variant appends.
QUEUE_BOUND = 1_000_000
#: The whole benchmark stops by itself within this many seconds, whatever the machine.
DEADLINE_SECONDS = 240.0


def _payload(i: int) -> bytes:
    envelope = ClientEnvelope(
        channel=CHANNEL,
        intent="chat",
        payload={"message": f"benchmark message {i} " + "x" * 120, "conversation_id": "bench"},
        id=f"c{i}",
    )
    return agent_message(
        envelope,
        message_id=new_message_id(),
        connection_id="ws_bench_0000abcd",
        user_id="bench",
        gateway_instance="gw-bench",
    ).to_bytes()


async def _publish_await_each(redis: Redis, registry: Registry, data: list[bytes]) -> list[float]:
    channel = names.agent_channel(CHANNEL)
    lat = []
    for item in data:
        t0 = time.perf_counter()
        await redis.publish(channel, item)
        lat.append(time.perf_counter() - t0)
    return lat


async def _script_await_each(redis: Redis, registry: Registry, data: list[bytes]) -> list[float]:
    lat = []
    for item in data:
        t0 = time.perf_counter()
        result = await registry.publish_or_queue(CHANNEL, item, QUEUE_BOUND)
        lat.append(time.perf_counter() - t0)
        if result != PublishResult.PUBLISHED:
            raise RuntimeError(f"expected published, got {result}")
    return lat


def _script_concurrent(
    tasks: int,
) -> Callable[[Redis, Registry, list[bytes]], Awaitable[list[float]]]:
    async def run(redis: Redis, registry: Registry, data: list[bytes]) -> list[float]:
        lat: list[float] = []

        async def worker(part: list[bytes]) -> None:
            for item in part:
                t0 = time.perf_counter()
                await registry.publish_or_queue(CHANNEL, item, QUEUE_BOUND)
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(data[i::tasks]) for i in range(tasks)))
        return lat

    return run


def _script_pipeline(
    batch: int,
) -> Callable[[Redis, Registry, list[bytes]], Awaitable[list[float]]]:
    async def run(redis: Redis, registry: Registry, data: list[bytes]) -> list[float]:
        lat = []
        for start in range(0, len(data), batch):
            chunk = data[start : start + batch]
            t0 = time.perf_counter()
            results = await registry.run_scripts(
                [registry.publish_or_queue_call(CHANNEL, item, QUEUE_BOUND) for item in chunk]
            )
            took = time.perf_counter() - t0
            if any(int(r) != PublishResult.PUBLISHED for r in results):
                raise RuntimeError("a pipelined script did not publish")
            # Every message in a batch waits for the whole round trip.
            lat.extend([took] * len(chunk))
        return lat

    return run


async def _measure(
    redis_url: str,
    name: str,
    fn: Callable[[Redis, Registry, list[bytes]], Awaitable[list[float]]],
    count: int,
) -> dict[str, Any]:
    redis = make_redis(redis_url, max_connections=256)
    registry = Registry(redis, record_ttl=60)
    try:
        data = [_payload(i) for i in range(count)]
        # Warm up: load the scripts and open pooled connections outside the timed part.
        await fn(redis, registry, data[: min(200, count)])
        await redis.delete(names.stream(CHANNEL))
        subscriber = CountingSubscriber(redis_url, names.agent_channel(CHANNEL))
        try:
            await redis.config_resetstat()
            t0 = time.perf_counter()
            lat = await fn(redis, registry, data)
            elapsed = time.perf_counter() - t0
            stats = await redis.info("commandstats")
        finally:
            observed = subscriber.stop()
        script = stats.get("cmdstat_evalsha", {})
        # A script's time includes the commands it runs, which commandstats also counts on
        # their own: with scripts, their time alone; without, every command's.
        usec = (
            float(script["usec"])
            if script
            else sum(
                float(v.get("usec", 0))
                for k, v in stats.items()
                if k.startswith("cmdstat_") and k not in ("cmdstat_config", "cmdstat_info")
            )
        )
        return {
            "variant": name,
            "messages": count,
            "seconds": round(elapsed, 3),
            "messages_per_second": round(count / elapsed),
            "subscriber_received": int(observed["count"]),
            "redis_usec_per_call": round(float(script.get("usec_per_call", 0.0)), 2),
            "redis_usec_per_message": round(usec / count, 2),
            **latency_summary(lat),
        }
    finally:
        await redis.aclose()


async def _main() -> None:
    count = 500 if quick() else 20_000
    variants: list[tuple[str, Callable[[Redis, Registry, list[bytes]], Awaitable[list[float]]]]] = [
        ("publish_await_each", _publish_await_each),
        ("script_await_each", _script_await_each),
        ("script_concurrent_100", _script_concurrent(100)),
        ("script_pipeline_16", _script_pipeline(16)),
        ("script_pipeline_64", _script_pipeline(64)),
        ("script_pipeline_256", _script_pipeline(256)),
    ]
    server = RedisServer().start()
    # The subscriber keeps the script on its "published" path; without it every message would
    # be queued (and the queue bound hit), which is a different benchmark.
    keeper = CountingSubscriber(server.url, names.agent_channel(CHANNEL))
    rows = []
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            for name, fn in variants:
                rows.append(await _measure(server.url, name, fn, count))
    finally:
        keeper.stop()
        server.cleanup()
    base = next(r for r in rows if r["variant"] == "publish_await_each")["messages_per_second"]
    summary = [f"publish batching ({count} messages of ~{len(_payload(0))} bytes, one subscriber):"]
    for r in rows:
        summary.append(
            f"  {r['variant']:<24} {r['messages_per_second']:>8,} msg/s  "
            f"x{r['messages_per_second'] / base:4.1f}  "
            f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
            f"redis {r['redis_usec_per_message']:.2f} us/msg"
        )
    write_result(
        "publish_batching",
        {"messages": count, "payload_bytes": len(_payload(0)), "stream_max_pending": QUEUE_BOUND},
        rows,
        summary,
    )


def main() -> None:
    uvloop.run(_main())


if __name__ == "__main__":
    main()
