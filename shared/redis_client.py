"""One way to build a Redis client: hiredis parser, explicit pool size, timeouts, retries.

Every service builds its clients here so that pool limits and failure behaviour are the same
everywhere and visible in one place. Retries cover a dropped connection (one reconnect with
jittered, capped backoff); a Redis that stays down surfaces as ``redis.exceptions.ConnectionError``
to the caller, which decides (the gateway opens its circuit breaker, HTTP handlers answer 503).

A timeout is never retried: the command (a publish script, an eviction script) may have run,
and sending a whole pipeline again would publish twice or count an eviction as lost. It
surfaces as ``redis.exceptions.TimeoutError`` to the caller, like an outage.

**Where Redis is** is one string, the *target*, that :func:`make_redis` takes:

* a plain Redis URL, ``redis://[[user]:password@]host:port/db`` (``REDIS_URL``);
* a Sentinel target, ``redis+sentinel://[[user]:password@]host:port[,host:port...]/master/db``
  (built by :func:`sentinel_target` from ``REDIS_SENTINELS`` and ``REDIS_SENTINEL_MASTER``):
  the client asks the sentinels, through redis-py's ``redis.asyncio.sentinel``, where the
  primary of ``master`` is, and asks again whenever a connection to it fails or the server it
  reached answers as a replica (``READONLY``) — that is how it follows a failover. The
  credentials are the primary's; ``?sentinel_password=...`` authenticates to the sentinels.

A string keeps every caller unchanged: whatever passed ``REDIS_URL`` passes the settings'
``redis_target`` instead, pub/sub connections included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["SENTINEL_SCHEME", "SentinelTarget", "make_redis", "parse_sentinel", "sentinel_target"]

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` target."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def sentinel_target(
    sentinels: tuple[str, ...], master: str, url: str = "", sentinel_password: str = ""
) -> str:
    """The target string for ``sentinels`` (``host:port`` each) and ``master``; ``url``, a
    plain Redis URL, gives the primary's credentials and database number (its host and port
    are not used)."""
    parts = urlsplit(url) if url else None
    # The URL's user info as written (percent-encoded, as REDIS_URL wants it).
    auth = (
        parts.netloc.rpartition("@")[0] + "@" if parts is not None and "@" in parts.netloc else ""
    )
    db = (parts.path.lstrip("/") or "0") if parts is not None else "0"
    query = f"?sentinel_password={quote(sentinel_password, safe='')}" if sentinel_password else ""
    hosts = ",".join(sentinels)
    return f"{SENTINEL_SCHEME}://{auth}{hosts}/{quote(master, safe='')}/{db}{query}"


def parse_sentinel(target: str) -> SentinelTarget:
    """Parse a ``redis+sentinel://`` target; ``ValueError`` naming what is wrong."""
    parts = urlsplit(target)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// target")
    hosts = parts.netloc.rpartition("@")[2]
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"sentinel {item!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("no master name (redis+sentinel://host:port/<master>/<db>)")
    db = path[1] if len(path) > 1 else "0"
    if not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    query = parse_qs(parts.query)
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master=unquote(path[0]),
        db=int(db),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that, like the plain one, makes a caller past
    ``max_connections`` wait for a connection rather than fail at once; closing it closes the
    connections to the sentinels too (the client's ``aclose()`` closes its pool)."""

    async def aclose(self) -> None:
        await super().aclose()
        for client in self.sentinel_manager.sentinels:
            await client.aclose()


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
    """A pooled asyncio client for ``url``, a Redis URL or a ``redis+sentinel://`` target.
    ``socket_timeout=None`` is for pub/sub connections that block.

    A pub/sub connection read by one task while another sends SUBSCRIBE needs
    ``health_check_interval=0``: the health check's PING would read concurrently with the reader.
    """
    retry = Retry(
        EqualJitterBackoff(cap=1.0, base=0.02), retries, supported_errors=(RedisConnectionError,)
    )
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": pool_timeout,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": health_check_interval,
        "retry": retry,
        "retry_on_error": [RedisConnectionError],
        "decode_responses": False,
        "client_name": name,
    }
    if url.startswith(SENTINEL_SCHEME + "://"):
        target = parse_sentinel(url)
        # The sentinels answer small questions: short timeouts, so a dead one is skipped fast.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.sentinels,
            sentinel_kwargs={
                "socket_timeout": connect_timeout,
                "socket_connect_timeout": connect_timeout,
                "password": target.sentinel_password,
            },
        )
        pool: BlockingConnectionPool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
            target.master,
            sentinel,
            db=target.db,
            username=target.username,
            password=target.password,
            **options,
        )
        return Redis.from_pool(pool)
    # A blocking pool: past ``max_connections`` a caller waits (up to ``pool_timeout``) for a
    # connection instead of failing at once with "Too many connections", so a burst of
    # requests larger than the pool queues briefly rather than answering 503.
    return Redis.from_pool(BlockingConnectionPool.from_url(url, **options))
