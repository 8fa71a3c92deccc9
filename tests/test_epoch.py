"""Redis data-loss detection (shared/epoch.py) against a real redis-server killed and restarted
empty or from its AOF, and its wiring in the eviction worker and Traffic Cop (real processes).

Sessions vanished with Redis are invalid: the old token gets 401 ``session_invalid`` and a
connection cannot be registered against it, so the gateways close such sockets with 4401 and
the clients sign in again; a session revoked before the loss stays revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest

from shared import redis_names as names
from shared.epoch import DataLoss, EpochWatch
from shared.traffic_cop_client import TrafficCopClient
from tests.helpers import (
    TRAFFIC_COP_KEY,
    RedisServer,
    ServiceProcess,
    create_session,
    timeout,
    wait_for,
    wait_for_sync,
)


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    server = RedisServer(aof=True, fsync="always").start()
    yield server
    server.cleanup()


@contextlib.asynccontextmanager
async def watching(
    server: RedisServer, name: str
) -> AsyncIterator[tuple[EpochWatch, list[DataLoss]]]:
    from shared.redis_client import make_redis

    client = make_redis(server.url, connect_timeout=0.5, socket_timeout=1.0)
    losses: list[DataLoss] = []

    async def on_loss(loss: DataLoss) -> None:
        losses.append(loss)

    watch = EpochWatch(client, name, on_loss, interval=0.05, retry_base=0.02, retry_cap=0.1)
    task = asyncio.create_task(watch.run())
    try:
        await wait_for(lambda: watch.epoch is not None, 5, what=f"{name} learned the epoch")
        yield watch, losses
    finally:
        task.cancel()
        await asyncio.wait([task])
        await client.aclose()


def restart(server: RedisServer) -> None:
    """kill -9, then start again on the same port and directory."""
    server.stop(signal.SIGKILL)
    server.start()


async def test_an_empty_restart_is_noticed_by_every_watcher_once(
    private_redis: RedisServer,
) -> None:
    async with (
        watching(private_redis, "a") as (a, a_losses),
        watching(private_redis, "b") as (b, b_losses),
    ):
        first = a.epoch
        assert first is not None and b.epoch == first  # SET NX: one epoch for everyone
        restart(private_redis)  # no persistence: it comes back empty
        await wait_for(lambda: len(a_losses) == 1 and len(b_losses) == 1, 10, what="both noticed")
        assert a.epoch == b.epoch != first  # one new epoch, adopted by both
        assert {a_losses[0].previous, b_losses[0].previous} == {first}
        # Whoever came first found the key missing and wrote it; the other saw it changed.
        assert any(loss.missing for loss in a_losses + b_losses)
        await asyncio.sleep(0.3)  # several more checks: the loss is reported once, not again
        assert (len(a_losses), len(b_losses)) == (1, 1)


async def test_a_restart_from_the_aof_and_an_outage_are_no_loss(aof_redis: RedisServer) -> None:
    from shared.redis_client import make_redis

    async with watching(aof_redis, "a") as (watch, losses):
        epoch = watch.epoch
        client = make_redis(aof_redis.url)  # reconnects after the restart
        try:
            await client.set("websocket:test:kept", b"1")
            restart(aof_redis)  # kill -9, then the AOF (fsync always) brings everything back
            assert await client.get("websocket:test:kept") == b"1"
            assert await client.get(names.EPOCH) == (epoch or "").encode()
            # Checks ran across the outage and after the reconnect: no loss reported.
            await asyncio.sleep(0.5)
            assert losses == [] and watch.epoch == epoch
        finally:
            await client.aclose()


async def test_a_failing_callback_does_not_stop_the_watch(private_redis: RedisServer) -> None:
    from shared.redis_client import make_redis

    client = make_redis(private_redis.url)
    calls: list[DataLoss] = []

    async def on_loss(loss: DataLoss) -> None:
        calls.append(loss)
        raise RuntimeError("repair failed")

    watch = EpochWatch(client, "t", on_loss, interval=0.05)
    task = asyncio.create_task(watch.run())
    try:
        await wait_for(lambda: watch.epoch is not None, 5)
        await client.flushall()
        await wait_for(lambda: len(calls) == 1, 5, what="first loss")
        await client.flushall()
        await wait_for(lambda: len(calls) == 2, 5, what="second loss, watch still running")
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.wait([task])
        await client.aclose()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=timeout(2)) as resp:
        return str(resp.read().decode())


def _metric(url: str, service: str) -> float:
    for line in _get(url + "/metrics").splitlines():
        if line.startswith(f'postoffice_redis_data_loss_total{{service="{service}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


FAST_EPOCH = {"REDIS_EPOCH_CHECK_SECONDS": "0.1"}


async def test_traffic_cop_sessions_vanished_with_redis_are_invalid(
    private_redis: RedisServer,
) -> None:
    """Sessions are Traffic Cop's Redis data: after an empty restart the old tokens are
    invalid (401) and connections cannot be registered against them; revoked stays revoked;
    new sessions work. The loss is counted on /metrics and logged."""
    cop = ServiceProcess(
        "services.traffic_cop_stub",
        {"REDIS_URL": private_redis.url, "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY, **FAST_EPOCH},
    )
    cop.env["TRAFFIC_COP_PORT"] = str(cop.port)
    cop.start()
    client = TrafficCopClient(cop.url, TRAFFIC_COP_KEY)
    try:
        live = [create_session(cop.url, f"user{n}") for n in range(3)]
        revoked = create_session(cop.url, "mallory")
        sessions = [await client.validate(token) for token in live]
        assert all(s is not None for s in sessions)
        revoked_session = await client.validate(revoked)
        assert revoked_session is not None
        assert await client.revoke(revoked)
        wait_for_sync(lambda: _metric(cop.url, "traffic-cop") == 0.0, 5)

        restart(private_redis)
        wait_for_sync(lambda: _metric(cop.url, "traffic-cop") == 1.0, 10, what="loss counted")
        assert "Redis lost its data: every session issued before is gone" in cop.log()

        valid_after = [await client.validate(token) for token in live]
        registered = [
            await client.register_connection(
                f"ws_user{n}_0000000{n}", s.session_id, f"user{n}", "gw-1"
            )
            for n, s in enumerate(sessions)
            if s is not None
        ]
        print(
            f"sessions={len(live)} valid_after_loss={sum(v is not None for v in valid_after)} "
            f"registrations_accepted={sum(bool(r) for r in registered)}"
        )
        assert valid_after == [None, None, None]
        assert registered == [False, False, False]
        assert await client.validate(revoked) is None  # revocation stays effective
        fresh = create_session(cop.url, "user0")
        assert await client.validate(fresh) is not None
    finally:
        await client.aclose()
        cop.stop()


async def test_the_eviction_worker_starts_its_grace_on_data_loss(
    private_redis: RedisServer,
) -> None:
    worker = ServiceProcess(
        "services.eviction_worker",
        {
            "REDIS_URL": private_redis.url,
            "EVICTION_INTERVAL_SECONDS": "0.1",
            "EVICTION_RECOVERY_GRACE_SECONDS": "30",
            "EVICTION_TRAFFIC_COP_URL": "http://127.0.0.1:9",
            **FAST_EPOCH,
        },
    )
    worker.env["EVICTION_PORT"] = str(worker.port)
    worker.start()
    try:
        restart(private_redis)
        wait_for_sync(
            lambda: _metric(worker.url, "eviction-worker") == 1.0, 10, what="loss counted"
        )
        wait_for_sync(lambda: "idle eviction resumes in 30.0s" in worker.log(), 10)
        assert "Redis lost its data: idle and dead-gateway cleanup pause" in worker.log()
        status = _get(worker.url + "/status")
        assert '"idle_deferred":true' in status.replace(" ", ""), status
    finally:
        worker.stop()
