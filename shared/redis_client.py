"""One way to build a Redis client: hiredis parser, explicit pool size, timeouts, retries.

Every service builds its clients here so that pool limits and failure behaviour are the same
everywhere and visible in one place. Retries cover a dropped connection (one reconnect with
jittered, capped backoff); a Redis that stays down surfaces as ``redis.exceptions.ConnectionError``
to the caller, which decides (the gateway opens its circuit breaker, HTTP handlers answer 503).

A timeout is never retried: the command (a publish script, an eviction script) may have run,
and sending a whole pipeline again would publish twice or count an eviction as lost. It
surfaces as ``redis.exceptions.TimeoutError`` to the caller, like an outage.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["make_redis"]


def make_redis(
    url: str,
    *,
    max_connections: int = 64,
    socket_timeout: float | None = 5.0,
    connect_timeout: float = 2.0,
    retries: int = 2,
    name: str | None = None,
    health_check_interval: int = 30,
    pool_timeout: float = 5.0,
) -> Redis:
    """A pooled asyncio client. ``socket_timeout=None`` is for pub/sub connections that block.

    A pub/sub connection read by one task while another sends SUBSCRIBE needs
    ``health_check_interval=0``: the health check's PING would read concurrently with the reader.
    """
    retry = Retry(
        EqualJitterBackoff(cap=1.0, base=0.02), retries, supported_errors=(RedisConnectionError,)
    )
    # A blocking pool: past ``max_connections`` a caller waits (up to ``pool_timeout``) for a
    # connection instead of failing at once with "Too many connections", so a burst of
    # requests larger than the pool queues briefly rather than answering 503.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        socket_keepalive=True,
        health_check_interval=health_check_interval,
        retry=retry,
        retry_on_error=[RedisConnectionError],
        decode_responses=False,
        client_name=name,
    )
    return Redis.from_pool(pool)
