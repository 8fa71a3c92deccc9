"""Helpers for the gateway tests: start real gateway processes, talk to them like a client,
watch agent channels like an agent. Every wait has a deadline (``helpers.timeout``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from shared import redis_names as names
from tests.helpers import (
    TRAFFIC_COP_KEY,
    RedisServer,
    ServiceProcess,
    create_session,
    timeout,
    wait_for,
)

#: Settings every test gateway uses unless a test says otherwise: quick flushes, short waits.
FAST = {
    "GATEWAY_LIVENESS_FLUSH_SECONDS": "0.05",
    "GATEWAY_INSTANCE_TTL_SECONDS": "3",
    "GATEWAY_STARTUP_WAIT_SECONDS": "10",
    "GATEWAY_SHUTDOWN_TIMEOUT": "5",
    "GATEWAY_CLOSE_TIMEOUT": "1",
    "GATEWAY_BREAKER_BACKOFF_BASE_SECONDS": "0.02",
    "GATEWAY_BREAKER_BACKOFF_CAP_SECONDS": "0.2",
    "GATEWAY_PUBSUB_BACKOFF_BASE_SECONDS": "0.02",
    "GATEWAY_PUBSUB_BACKOFF_CAP_SECONDS": "0.2",
    # Tests open hundreds of sockets from 127.0.0.1 at once; tests/test_hostile.py sets the
    # per-address upgrade budget it exercises.
    "GATEWAY_UNAUTH_BURST": "100000",
}


def start_traffic_cop(redis_url: str) -> ServiceProcess:
    service = ServiceProcess(
        "services.traffic_cop_stub",
        {"REDIS_URL": redis_url, "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY},
    )
    service.env["TRAFFIC_COP_PORT"] = str(service.port)
    return service.start()


def gateway_process(redis_url: str, traffic_cop_url: str, **env: str) -> ServiceProcess:
    """A gateway process (not started) on a free port with FAST settings plus ``env``."""
    service = ServiceProcess(
        "services.gateway",
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": traffic_cop_url,
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            **FAST,
            **env,
        },
    )
    service.env["GATEWAY_PORT"] = str(service.port)
    service.env.setdefault("GATEWAY_INSTANCE_ID", f"gw-test-{service.port}")
    return service


def start_gateway(redis_url: str, traffic_cop_url: str, **env: str) -> ServiceProcess:
    return gateway_process(redis_url, traffic_cop_url, **env).start()


def instance_of(gateway: ServiceProcess) -> str:
    return gateway.env["GATEWAY_INSTANCE_ID"]


def ws_url(gateway: ServiceProcess, token: str | None = None) -> str:
    url = gateway.url.replace("http://", "ws://") + "/ws"
    return url if token is None else f"{url}?session_token={token}"


async def create_sessions(traffic_cop_url: str, user_ids: list[str]) -> list[str]:
    """Many sessions at once (``POST /v1/sessions`` concurrently)."""
    headers = {"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}
    # A few at a time: Traffic Cop's Redis pool is bounded.
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:

        async def one(user_id: str) -> str:
            async with http.post(traffic_cop_url + "/v1/sessions", json={"user_id": user_id}) as r:
                assert r.status == 201, await r.text()
                return str((await r.json())["session_token"])

        return list(await asyncio.gather(*(one(u) for u in user_ids)))


async def recv(
    ws: aiohttp.ClientWebSocketResponse, seconds: float = 5, *, skip_pings: bool = True
) -> Any:
    """The next JSON frame (app pings skipped unless asked for)."""
    while True:
        msg = await ws.receive(timeout=timeout(seconds))
        assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
        frame = orjson.loads(msg.data)
        if skip_pings and isinstance(frame, dict) and frame.get("type") == "ping":
            continue
        return frame


async def close_of(
    ws: aiohttp.ClientWebSocketResponse, seconds: float = 5
) -> tuple[int | None, str]:
    """Read until the server closes; the close code and reason."""
    while True:
        msg = await ws.receive(timeout=timeout(seconds))
        if msg.type is aiohttp.WSMsgType.CLOSE:
            # The code of the server's close frame (what a browser reports), not whatever the
            # client's own closing handshake ended with.
            return int(msg.data), msg.extra or ""
        if msg.type in (
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.ERROR,
        ):
            return ws.close_code, ""


def chat(message: str = "hello", id: Any = None, **fields: Any) -> str:
    frame: dict[str, Any] = {"payload": {"message": message}, **fields}
    if id is not None:
        frame["id"] = id
    return orjson.dumps(frame).decode()


class AgentListener:
    """Subscribes to ``websocket:<channel>`` like an agent and keeps what arrives, decoded."""

    def __init__(self, redis: Redis, *channels: str) -> None:
        self.redis = redis
        self.channels = [names.agent_channel(c) for c in channels]
        self.messages: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AgentListener:
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(*self.channels)
        # Wait for the confirmations so nothing published after this returns is missed.
        confirmed = 0
        while confirmed < len(self.channels):
            message = await self._pubsub.get_message(timeout=timeout(5))
            if message and message["type"] == "subscribe":
                confirmed += 1
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message["type"] == "message":
                self.messages.append(orjson.loads(message["data"]))

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def small_receive_buffer_connector() -> aiohttp.TCPConnector:
    """A connector whose sockets have a tiny receive buffer: a client that does not read
    then stops the server's writes quickly (the slow-reader test)."""

    def factory(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return sock

    return aiohttp.TCPConnector(socket_factory=factory)


async def wait_for_log(service: ServiceProcess, text: str, seconds: float = 5) -> None:
    """Until ``text`` appears in the service's log (JSON lines)."""
    await wait_for(lambda: text in service.log(), seconds, what=f"{text!r} in the log")


async def health_detail(gateway: ServiceProcess) -> dict[str, Any]:
    """The gateway's detailed health body (whatever its status: 503 still has the body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.url + "/health/websocket-gateway/detailed") as r,
    ):
        body: dict[str, Any] = await r.json()
        return body


async def registry_traces(
    redis: Redis, connection_id: str, user_id: str, instance: str
) -> list[str]:
    """Every registry key that still mentions ``connection_id`` (empty when fully cleaned)."""
    found: list[str] = []
    if await redis.exists(names.connection(connection_id)):
        found.append(names.connection(connection_id))
    if await redis.sismember(names.user_connections(user_id), connection_id):
        found.append(names.user_connections(user_id))
    if await redis.sismember(names.gateway_connections(instance), connection_id):
        found.append(names.gateway_connections(instance))
    if await redis.zscore(names.LAST_SEEN, connection_id) is not None:
        found.append(names.LAST_SEEN)
    from shared.protocol import DEFAULT_CHANNELS

    for channel in DEFAULT_CHANNELS:
        if await redis.sismember(names.channel_connections(channel), connection_id):
            found.append(names.channel_connections(channel))
    if await redis.exists(names.session_of_connection(connection_id)):
        found.append(names.session_of_connection(connection_id))
    return found


@dataclass
class Base:
    """A module's own redis-server and Traffic Cop, for tests that start gateways of their
    own against them."""

    redis_url: str
    traffic_cop: ServiceProcess

    def token(self, user_id: str) -> str:
        return create_session(self.traffic_cop.url, user_id)


def redis_and_traffic_cop() -> Iterator[Base]:
    """The body of a module-scoped ``base`` fixture: ``base = pytest.fixture(scope="module")(
    redis_and_traffic_cop)``."""
    server = RedisServer().start()
    traffic_cop = start_traffic_cop(server.url)
    try:
        yield Base(server.url, traffic_cop)
    finally:
        traffic_cop.stop()
        server.cleanup()


async def client_of(base: Base) -> AsyncIterator[Redis]:
    """The body of a ``redis`` fixture on ``base``'s server."""
    client = Redis.from_url(base.redis_url)
    yield client
    await client.aclose()


__all__ = [
    "FAST",
    "AgentListener",
    "Base",
    "RedisServer",
    "chat",
    "client_of",
    "close_of",
    "create_sessions",
    "gateway_process",
    "health_detail",
    "instance_of",
    "recv",
    "redis_and_traffic_cop",
    "redis_client",
    "registry_traces",
    "small_receive_buffer_connector",
    "start_gateway",
    "start_traffic_cop",
    "wait_for_log",
    "ws_url",
]
