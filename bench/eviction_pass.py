"""One eviction pass over a large registry: wall time and the Redis commands it costs.

A private redis-server holds ``CONNECTIONS`` registered connections (100,000; ``BENCH_QUICK=1``:
2,000) spread over ``GATEWAYS`` live gateway instances, each with the keys
:meth:`shared.registry.Registry.register` writes. A counting subscriber listens on
``websocket:events`` (the evicted events then cost what they cost in production). Scenarios:

* ``stale_1pct``: 1% of the connections were last seen past ``MAX_IDLE_SECONDS``; one pass of
  the worker's real code (:class:`services.eviction_worker.worker.Evictor`, default batch size
  and concurrency) evicts them. Repeated, re-registering the evicted ones in between.
* ``stale_0pct``: nothing is stale, no gateway is dead, no queue holds anything: the cost the
  worker adds every interval when it has nothing to do.
* ``scan_reference``: what finding stale connections would cost by scanning keys instead
  (``SCAN MATCH websocket:connection:* COUNT 1000`` and a pipelined ``HGET last_heartbeat``
  per key), for comparison only: the worker never does this.

Redis commands come from ``INFO commandstats`` (reset with ``CONFIG RESETSTAT`` before each
measured pass), so they include the commands the Lua scripts run. Traffic Cop reports are left
out (``reporter=None``): they leave the worker in the background and never slow a pass.

Run: ``python -m bench.eviction_pass`` (``BENCH_QUICK=1`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import redis as sync_redis
import uvloop
from redis.asyncio import Redis

from bench.common import quick, write_result
from services.eviction_worker.worker import Evictor
from shared import redis_names as names
from shared.protocol import DEFAULT_CHANNELS
from shared.redis_client import make_redis
from shared.registry import ConnectionRecord
from tests.helpers import RedisServer

MAX_IDLE = 300.0
GATEWAYS = 10
STALE_SHARE = 0.01
#: The whole benchmark stops by itself within this many seconds, whatever the machine.
DEADLINE_SECONDS = 600.0


def _record(i: int, seen: float) -> ConnectionRecord:
    user = f"user{i % (i // 3 + 1) if i else 0}"  # some users hold several connections
    return ConnectionRecord(
        connection_id=f"ws_{user}_{i:08x}",
        user_id=user,
        session_id=f"sess_{i:016x}",
        gateway_instance=f"gw-{i % GATEWAYS}",
        connected_at=seen,
        channels=("guide", "pillar:content") if i % 4 == 0 else ("guide",),
    )


async def _register(redis: Redis, indexes: range, seen_at: dict[int, float]) -> None:
    """The writes of ``Registry.register`` (without its ``connected`` events), pipelined."""
    chunk = 2000
    items = list(indexes)
    for start in range(0, len(items), chunk):
        async with redis.pipeline(transaction=False) as pipe:
            for i in items[start : start + chunk]:
                rec = _record(i, seen_at[i])
                cid = rec.connection_id
                pipe.hset(names.connection(cid), mapping=rec.to_hash(seen_at[i]))  # type: ignore[arg-type]
                pipe.expire(names.connection(cid), int(MAX_IDLE * 2))
                pipe.sadd(names.user_connections(rec.user_id), cid)
                pipe.sadd(names.gateway_connections(rec.gateway_instance), cid)
                pipe.sadd(names.session_connections(rec.session_id), cid)
                for channel in rec.channels:
                    pipe.sadd(names.channel_connections(channel), cid)
                pipe.zadd(names.LAST_SEEN, {cid: seen_at[i]})
            await pipe.execute()


async def _commandstats(redis: Redis) -> dict[str, dict[str, int]]:
    raw = await redis.info("commandstats")
    out: dict[str, dict[str, int]] = {}
    for key, value in raw.items():
        name = key.removeprefix("cmdstat_")
        if name in ("config|resetstat", "info"):
            continue
        out[name] = {"calls": int(value["calls"]), "usec": int(value["usec"])}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["calls"]))


async def _measured(redis: Redis, evictor: Evictor) -> dict[str, Any]:
    await redis.config_resetstat()
    t0 = time.perf_counter()
    summary = await evictor.run_pass()
    wall = time.perf_counter() - t0
    stats = await _commandstats(redis)
    return {
        "wall_ms": round(wall * 1000, 2),
        "evicted": summary.evicted["idle"],
        "stale_found": summary.stale_found,
        "round_trips": summary.round_trips,
        "redis_calls": sum(s["calls"] for s in stats.values()),
        "redis_usec": sum(s["usec"] for s in stats.values()),
        "commands": stats,
    }


async def _scan_reference(redis: Redis, cutoff: float) -> dict[str, Any]:
    await redis.config_resetstat()
    t0 = time.perf_counter()
    stale = 0
    batch: list[bytes] = []

    async def check(keys: list[bytes]) -> int:
        async with redis.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hget(k, "last_heartbeat")
            seen = await pipe.execute()
        return sum(1 for s in seen if s is not None and float(s) <= cutoff)

    async for key in redis.scan_iter(match=names.connection("*"), count=1000):
        if key.endswith(b":messages"):
            continue
        batch.append(key)
        if len(batch) >= 1000:
            stale += await check(batch)
            batch = []
    if batch:
        stale += await check(batch)
    wall = time.perf_counter() - t0
    stats = await _commandstats(redis)
    return {
        "wall_ms": round(wall * 1000, 2),
        "stale_found": stale,
        "redis_calls": sum(s["calls"] for s in stats.values()),
        "redis_usec": sum(s["usec"] for s in stats.values()),
        "commands": stats,
    }


class _EventCounter:
    """Counts ``websocket:events`` messages from a thread with its own blocking client, so the
    events have a subscriber (as in production) without touching the measured event loop."""

    def __init__(self, url: str) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._client = sync_redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(names.EVENTS)
        while (msg := self._pubsub.get_message(timeout=1.0)) is None or msg["type"] != "subscribe":
            pass
        self._thread = threading.Thread(target=self._run, name="events-counter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg is not None:
                self.count += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()
        self._client.close()
        return self.count


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


async def _main() -> None:
    count = 2_000 if quick() else 100_000
    repeats_stale = 1 if quick() else 5
    repeats_idle = 2 if quick() else 7
    stale_n = int(count * STALE_SHARE)
    server = RedisServer().start()
    listener = _EventCounter(server.url)
    redis = make_redis(server.url, max_connections=32)
    rows: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            now = time.time()
            for g in range(GATEWAYS):
                await redis.set(names.gateway_instance(f"gw-{g}"), "1", ex=3600)
                await redis.sadd(names.GATEWAYS, f"gw-{g}")
            # Evenly spread stale connections, as idle clients would be.
            stale_idx = range(0, count, count // stale_n)[:stale_n]
            seen = {i: now - 5 * (i % 30) for i in range(count)}  # up to half MAX_IDLE ago
            t0 = time.perf_counter()
            await _register(redis, range(count), seen)
            load_s = time.perf_counter() - t0
            evictor = Evictor(redis, max_idle_seconds=MAX_IDLE, channels=DEFAULT_CHANNELS)
            warm = await evictor.run_pass()  # loads the scripts, opens the pool
            if warm.stale_found:
                raise RuntimeError("the fresh registry already has stale connections")

            for rep in range(repeats_stale):
                old = time.time() - MAX_IDLE - 60
                await _register(redis, stale_idx, {i: old - i * 1e-3 for i in stale_idx})
                row = {"scenario": "stale_1pct", "repeat": rep, **await _measured(redis, evictor)}
                if row["evicted"] != stale_n:
                    raise RuntimeError(f"evicted {row['evicted']}, expected {stale_n}")
                rows.append(row)
            # The stale ones are gone now; bring them back fresh so the idle pass sees `count`.
            await _register(redis, stale_idx, {i: time.time() for i in stale_idx})
            for rep in range(repeats_idle):
                row = {"scenario": "stale_0pct", "repeat": rep, **await _measured(redis, evictor)}
                if row["stale_found"]:
                    raise RuntimeError("the idle pass found stale connections")
                rows.append(row)
            row = {
                "scenario": "scan_reference",
                "repeat": 0,
                **await _scan_reference(redis, time.time() - MAX_IDLE),
            }
            rows.append(row)
            keys = await redis.dbsize()
    finally:
        await redis.aclose()
        events = listener.stop()
        server.cleanup()

    stale_rows = [r for r in rows if r["scenario"] == "stale_1pct"]
    idle_rows = [r for r in rows if r["scenario"] == "stale_0pct"]
    scan = rows[-1]
    summary = [
        f"eviction pass over {count:,} connections ({keys:,} keys, {GATEWAYS} gateways; "
        f"registry written in {load_s:.1f}s; {events:,} evicted events observed):",
        f"  1% stale ({stale_n:,}): median {_median(stale_rows, 'wall_ms'):.1f} ms wall over "
        f"{len(stale_rows)} passes, {stale_rows[-1]['round_trips']} round trips, "
        f"{stale_rows[-1]['redis_calls']:,} Redis commands "
        f"({stale_rows[-1]['redis_calls'] / stale_n:.1f} per eviction), "
        f"{_median(stale_rows, 'redis_usec') / 1000:.1f} ms Redis CPU",
        "    per command: "
        + ", ".join(f"{k} {v['calls']:,}" for k, v in stale_rows[-1]["commands"].items()),
        f"  0% stale (idle cost): median {_median(idle_rows, 'wall_ms'):.2f} ms wall over "
        f"{len(idle_rows)} passes, {idle_rows[-1]['round_trips']} round trips, "
        f"{idle_rows[-1]['redis_calls']} Redis commands, "
        f"{_median(idle_rows, 'redis_usec'):.0f} us Redis CPU",
        "    per command: "
        + ", ".join(f"{k} {v['calls']:,}" for k, v in idle_rows[-1]["commands"].items()),
        f"  reference, finding stale ones by SCAN + HGET instead: {scan['wall_ms']:.0f} ms wall, "
        f"{scan['redis_calls']:,} Redis commands, {scan['redis_usec'] / 1000:.1f} ms Redis CPU "
        f"(found {scan['stale_found']:,})",
    ]
    write_result(
        "eviction_pass",
        {
            "connections": count,
            "gateways": GATEWAYS,
            "stale_share": STALE_SHARE,
            "max_idle_seconds": MAX_IDLE,
            "batch_size": evictor.batch_size,
            "concurrency": evictor.concurrency,
            "channels_drained": len(DEFAULT_CHANNELS),
            "events_subscribers": 1,
        },
        rows,
        summary,
    )


def main() -> None:
    uvloop.run(_main())


if __name__ == "__main__":
    main()
