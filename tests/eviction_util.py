"""Helpers of the eviction worker's tests: registry state written as a gateway writes it, real
Redis subscribers that record what travels on a channel, and worker processes on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from redis.asyncio import Redis

from shared import redis_names as names
from shared.protocol import new_connection_id
from shared.registry import ConnectionRecord, Registry
from tests.helpers import ServiceProcess, timeout

WORKER = "services.eviction_worker"

#: Settings that make a worker process quick to act and quick to stop in tests.
FAST = {
    "EVICTION_INTERVAL_SECONDS": "0.05",
    "EVICTION_ERROR_BACKOFF_CAP_SECONDS": "0.2",
    "EVICTION_SHUTDOWN_TIMEOUT": "0.5",
    "EVICTION_TRAFFIC_COP_RETRY_BASE_SECONDS": "0.05",
    "EVICTION_TRAFFIC_COP_RETRY_CAP_SECONDS": "0.2",
    "EVICTION_TRAFFIC_COP_TIMEOUT_SECONDS": "1",
    "LOG_LEVEL": "INFO",
}


def worker_process(redis_url: str, traffic_cop_url: str, **env: str) -> ServiceProcess:
    """A worker process (not started) on a free port, with :data:`FAST` settings."""
    proc = ServiceProcess(
        WORKER, {"REDIS_URL": redis_url, "TRAFFIC_COP_URL": traffic_cop_url, **FAST, **env}
    )
    proc.env["EVICTION_PORT"] = str(proc.port)
    return proc


def get_json(url: str) -> tuple[int, Any]:
    """``GET`` answering (status, parsed JSON body), errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout(5)) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=timeout(5)) as r:
        return str(r.read().decode())


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def register(
    registry: Registry,
    user_id: str,
    gateway: str,
    seen_at: float,
    *,
    session_id: str = "sess_0123456789abcdef",
    channels: Iterable[str] = ("guide",),
    connection_id: str | None = None,
) -> str:
    """Register one connection as a gateway does, last seen at ``seen_at``; its id."""
    cid = connection_id or new_connection_id(user_id)
    record = ConnectionRecord(cid, user_id, session_id, gateway, seen_at, tuple(channels))
    await registry.register(record, now=seen_at)
    return cid


async def register_many(
    redis: Redis, count: int, gateway: str, seen_at: float, prefix: str = "u"
) -> list[str]:
    """``count`` connections of distinct users on ``gateway``, written in one pipeline with the
    same keys :meth:`Registry.register` writes (minus the ``connected`` events)."""
    ids = []
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            user = f"{prefix}{i}"
            cid = new_connection_id(user)
            ids.append(cid)
            record = ConnectionRecord(cid, user, f"sess_{i:016x}", gateway, seen_at, ("guide",))
            pipe.hset(names.connection(cid), mapping=record.to_hash(seen_at))  # type: ignore[arg-type]
            pipe.expire(names.connection(cid), 3600)
            pipe.sadd(names.user_connections(user), cid)
            pipe.sadd(names.gateway_connections(gateway), cid)
            pipe.sadd(names.channel_connections("guide"), cid)
            pipe.zadd(names.LAST_SEEN, {cid: seen_at})
        await pipe.execute()
    return ids


async def gateway_alive(redis: Redis, instance: str, ttl_ms: int = 60_000) -> None:
    """Announce a gateway instance as alive, the way a gateway does at start."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(names.gateway_instance(instance), "1", px=ttl_ms)
        pipe.sadd(names.GATEWAYS, instance)
        await pipe.execute()


async def traces(
    redis: Redis, cid: str, user_id: str, gateway: str, channels: Iterable[str] = ("guide",)
) -> dict[str, Any]:
    """Everything the registry keeps about one connection (all empty once it is gone)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.exists(names.connection(cid))
        pipe.zscore(names.LAST_SEEN, cid)
        pipe.sismember(names.user_connections(user_id), cid)
        pipe.sismember(names.gateway_connections(gateway), cid)
        for channel in channels:
            pipe.sismember(names.channel_connections(channel), cid)
        out = await pipe.execute()
    return {
        "record": bool(out[0]),
        "last_seen": out[1],
        "user_index": bool(out[2]),
        "gateway_index": bool(out[3]),
        "channel_index": [bool(x) for x in out[4:]],
    }


def gone(t: Mapping[str, Any]) -> bool:
    return (
        not t["record"]
        and t["last_seen"] is None
        and not t["user_index"]
        and not t["gateway_index"]
        and not any(t["channel_index"])
    )


class Subscriber:
    """A real Redis subscriber recording ``(channel, raw data)`` in arrival order."""

    def __init__(self, redis_url: str, *channels: str) -> None:
        self.redis_url = redis_url
        self.channels = channels
        self.received: list[tuple[str, bytes]] = []
        self._client: Redis | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        self._client = Redis.from_url(self.redis_url)
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(*self.channels)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg["type"] == "message":
                self.received.append((msg["channel"].decode(), msg["data"]))

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        if self._client is not None:
            await self._client.aclose()

    def json(self, channel: str | None = None) -> list[dict[str, Any]]:
        return [orjson.loads(d) for c, d in self.received if channel is None or c == channel]

    def data(self, channel: str) -> list[bytes]:
        return [d for c, d in self.received if c == channel]


def stale_time(max_idle: float) -> float:
    """A last-seen time well past ``max_idle``."""
    return time.time() - max_idle - 100
