from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from tests.helpers import TRAFFIC_COP_KEY, RedisServer, ServiceProcess


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives real Chromium")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session; tests flush it after themselves."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """A private redis-server with its AOF (fsync always): stopped and started again it comes
    back with its data, as Redis does in make run and compose. (An empty restart is Redis
    losing its data, which closes every socket 4401 "session lost":
    tests/test_redis_data_loss.py.)"""
    server = RedisServer(aof=True, fsync="always").start()
    yield server
    server.cleanup()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and start again on the same port
    (outages, restarts) without disturbing the session's shared one."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    yield redis_server.url
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def traffic_cop(redis_url: str) -> Iterator[ServiceProcess]:
    """A real Traffic Cop process on a free port, against the test Redis."""
    service = ServiceProcess(
        "services.traffic_cop_stub",
        {"REDIS_URL": redis_url, "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY},
    )
    service.env["TRAFFIC_COP_PORT"] = str(service.port)
    service.start()
    yield service
    service.stop()
