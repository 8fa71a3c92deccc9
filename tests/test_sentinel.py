"""Redis high availability through Sentinel, with real processes: a primary, a replica and three
``redis-sentinel`` on loopback ports. The primary is killed with SIGKILL mid-stream of writes;
the client (and a real service process) serve again on the promoted replica.

Counts: accepted (the write returned), failed (it raised: explicitly refused), lost (accepted
but missing on the new primary: the replication window; 0 expected on loopback).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from redis.exceptions import RedisError

from shared.redis_client import make_redis, parse_sentinel, sentinel_target
from shared.settings import SettingsError, load
from shared.traffic_cop_client import TrafficCopClient
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, create_session, timeout, wait_for
from tests.sentinel_util import MASTER, SentinelSet

#: A failover takes down-after (1 s) plus an election and a promotion: a few seconds.
FAILOVER_BOUND = 20.0


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    group = SentinelSet().start()
    yield group
    group.stop()


def test_sentinel_settings_and_target() -> None:
    from services.traffic_cop_stub.settings import PREFIX
    from services.traffic_cop_stub.settings import TrafficCopSettings as Settings

    settings = load(
        Settings,
        PREFIX,
        {
            "REDIS_SENTINELS": "127.0.0.1:26379, 127.0.0.1:26380",
            "REDIS_SENTINEL_MASTER": "mymaster",
            "REDIS_URL": "redis://:s3cret@ignored:1/2",
        },
    )
    target = parse_sentinel(settings.redis_target)
    assert target.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert (target.master, target.db, target.password) == ("mymaster", 2, "s3cret")
    assert load(Settings, PREFIX, {}).redis_target == "redis://127.0.0.1:6379/0"
    with pytest.raises(SettingsError, match="go together"):
        load(Settings, PREFIX, {"REDIS_SENTINELS": "127.0.0.1:26379"})
    with pytest.raises(SettingsError, match="go together"):
        load(Settings, PREFIX, {"REDIS_SENTINEL_MASTER": "m"})
    with pytest.raises(SettingsError, match="not host:port"):
        load(Settings, PREFIX, {"REDIS_SENTINELS": "nohost", "REDIS_SENTINEL_MASTER": "m"})
    spelled = sentinel_target(("h:1",), "m a", "redis://u:p%40ss@x:1/0", "sp")
    assert parse_sentinel(spelled).password == "p@ss"
    assert parse_sentinel(spelled).sentinel_password == "sp"
    assert parse_sentinel(spelled).master == "m a"
    with pytest.raises(ValueError, match="no master name"):
        parse_sentinel("redis+sentinel://h:1")


async def test_a_client_follows_a_failover_mid_stream_of_writes(
    sentinel_set: SentinelSet,
) -> None:
    target = sentinel_target(sentinel_set.sentinels, MASTER)
    client = make_redis(target, connect_timeout=0.5, socket_timeout=1.0)
    key = "websocket:test:writes"
    accepted: list[int] = []
    failed = 0
    killed_at = recovered_at = 0.0
    try:
        n = 0
        deadline = time.monotonic() + timeout(FAILOVER_BOUND + 10)
        while time.monotonic() < deadline:
            n += 1
            try:
                await client.rpush(key, n)
                accepted.append(n)
                if killed_at and not recovered_at:
                    recovered_at = time.monotonic()
            except RedisError:
                failed += 1
                await asyncio.sleep(0.05)  # a caller backing off, not spinning
            if n == 200:
                sentinel_set.kill_primary()
                killed_at = time.monotonic()
            if recovered_at and time.monotonic() - recovered_at > 1.0:
                break  # a second of writes on the new primary
            await asyncio.sleep(0.005)
        stored = {int(v) for v in await client.lrange(key, 0, -1)}
        lost = [v for v in accepted if v not in stored]
        new_primary = sentinel_set.primary_address()
        print(
            f"sent={n} accepted={len(accepted)} failed={failed} lost={len(lost)} "
            f"failover_seconds={recovered_at - killed_at:.1f} new_primary={new_primary}"
        )
        assert recovered_at, "the client never wrote again after the failover"
        assert recovered_at - killed_at < timeout(FAILOVER_BOUND)
        assert new_primary == sentinel_set.replica_port
        assert failed > 0  # the outage was real and surfaced as errors, not silence
        assert len(accepted) + failed == n
        # Asynchronous replication: what the primary acked but had not sent on is the window.
        # On loopback it is empty; the bound is the writes of the last moment before the kill.
        assert len(lost) <= 5, lost
    finally:
        await client.aclose()


async def test_a_service_on_sentinels_serves_again_after_the_failover(
    sentinel_set: SentinelSet,
) -> None:
    """Traffic Cop configured with REDIS_SENTINELS: sessions made before the kill validate on
    the promoted replica, and new ones can be made, within the failover time."""
    cop = ServiceProcess(
        "services.traffic_cop_stub",
        {
            "REDIS_SENTINELS": ",".join(sentinel_set.sentinels),
            "REDIS_SENTINEL_MASTER": MASTER,
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            "REDIS_EPOCH_CHECK_SECONDS": "0.2",
        },
    )
    cop.env["TRAFFIC_COP_PORT"] = str(cop.port)
    cop.start()
    client = TrafficCopClient(cop.url, TRAFFIC_COP_KEY)
    try:
        before = [create_session(cop.url, f"user{n}") for n in range(5)]
        await asyncio.sleep(0.2)  # replication on loopback is sub-millisecond; margin
        sentinel_set.kill_primary()
        killed = time.monotonic()

        async def serves() -> bool:
            try:
                return await client.validate(before[0]) is not None
            except Exception:
                return False

        await wait_for(serves, FAILOVER_BOUND, interval=0.2, what="traffic cop on the new primary")
        seconds = time.monotonic() - killed
        valid = [await client.validate(token) is not None for token in before]
        after = create_session(cop.url, "late")
        print(f"sessions_before={len(before)} valid_after={sum(valid)} failover={seconds:.1f}s")
        assert valid == [True] * 5
        assert await client.validate(after) is not None
        # The replica had the data (and the epoch): a failover is not a data loss.
        assert "Redis lost its data" not in cop.log()
    finally:
        await client.aclose()
        cop.stop()
