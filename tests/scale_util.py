"""Helpers of the horizontal-scale tests (tests/test_scale.py): a whole stack of real processes
(redis-server, Traffic Cop, three gateways, the Post Office API) started together, clients that
remember which gateway holds them, and a recorder of ``websocket:events`` with a fence.

Every wait has a deadline (``helpers.timeout``)."""

from __future__ import annotations

import asyncio
import functools
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from shared import redis_names as names
from tests.eviction_util import Subscriber, worker_process
from tests.gateway_util import gateway_process, instance_of, recv, ws_url
from tests.helpers import (
    TRAFFIC_COP_KEY,
    RedisServer,
    ServiceProcess,
    timeout,
    wait_for,
    wait_for_sync,
)

#: The gateways leave idle eviction to the worker: their own idle check and their heartbeat
#: (app pings, and aiohttp's protocol pings, which drop a peer that does not pong after 1.5
#: intervals) are far longer than any test. The instance TTL is short, so a killed gateway is
#: noticed quickly, and scaled, so a loaded machine does not take a slow gateway for a dead one.
GATEWAY_ENV = {
    "GATEWAY_HEARTBEAT_INTERVAL": "300",
    "GATEWAY_MAX_IDLE_SECONDS": "600",
    "GATEWAY_INSTANCE_TTL_SECONDS": str(timeout(1.5)),
    "GATEWAY_LIVENESS_FLUSH_SECONDS": "0.05",
    "GATEWAY_SESSION_CHECK_SECONDS": "300",
}

#: Every worker of these tests passes often; each test sets its own MAX_IDLE_SECONDS.
WORKER_INTERVAL = 0.1

API_KEY = "dev-smart_city"


def _ready(service: ServiceProcess) -> bool:
    if service.proc is not None and service.proc.poll() is not None:
        raise AssertionError(
            f"{service.module} exited with {service.proc.returncode}:\n{service.log()[-4000:]}"
        )
    try:
        with urllib.request.urlopen(service.url + service.ready_path, timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_together(*services: ServiceProcess) -> None:
    """Start every process at once, then wait until each answers ``/ready``; on failure, stop
    them all and show the log of the one that failed."""
    for service in services:
        service.start(wait_ready=False)
    for service in services:
        try:
            wait_for_sync(
                functools.partial(_ready, service),
                20,
                interval=0.05,
                what=f"{service.module} on {service.port} ready",
            )
        except AssertionError as exc:
            log = service.log()[-4000:]
            for other in services:
                other.stop()
            raise AssertionError(f"{exc}\n{service.module}'s log:\n{log}") from None


class Stack:
    """redis-server, Traffic Cop, three gateways and the API: one per test module."""

    def __init__(self) -> None:
        self.redis_server = RedisServer().start()
        self.redis_url = self.redis_server.url
        self.traffic_cop = ServiceProcess(
            "services.traffic_cop_stub",
            {"REDIS_URL": self.redis_url, "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY},
        )
        self.traffic_cop.env["TRAFFIC_COP_PORT"] = str(self.traffic_cop.port)
        self._generation = 0
        self.gateways = [self._gateway(i) for i in range(3)]
        self.api = ServiceProcess(
            "services.post_office_api",
            {
                "REDIS_URL": self.redis_url,
                "GATEWAY_URLS": ",".join(g.url for g in self.gateways),
                "TRAFFIC_COP_URL": self.traffic_cop.url,
                "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                "POST_OFFICE_SHUTDOWN_TIMEOUT": str(timeout(3)),
            },
        )
        self.api.env["POST_OFFICE_PORT"] = str(self.api.port)
        try:
            start_together(self.traffic_cop, *self.gateways, self.api)
        except BaseException:
            self.redis_server.cleanup()
            raise

    def _gateway(self, index: int) -> ServiceProcess:
        suffix = f"-r{self._generation}" if self._generation else ""
        return gateway_process(
            self.redis_url,
            self.traffic_cop.url,
            GATEWAY_INSTANCE_ID=f"gw-{index}{suffix}",
            **GATEWAY_ENV,
        )

    def replace_dead_gateways(self) -> None:
        """A gateway a test killed is replaced by a fresh process with a new instance id."""
        dead = [i for i, g in enumerate(self.gateways) if g.proc is None]
        if not dead:
            return
        self._generation += 1
        fresh = {i: self._gateway(i) for i in dead}
        start_together(*fresh.values())
        for i, gateway in fresh.items():
            self.gateways[i] = gateway

    def worker(self, max_idle: float, **env: str) -> ServiceProcess:
        """An eviction worker (not started) evicting after ``max_idle`` seconds."""
        settings = {
            "EVICTION_MAX_IDLE_SECONDS": str(max_idle),
            "EVICTION_INTERVAL_SECONDS": str(WORKER_INTERVAL),
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            **env,
        }
        return worker_process(self.redis_url, self.traffic_cop.url, **settings)

    def stop(self) -> None:
        for service in (self.api, *self.gateways, self.traffic_cop):
            service.stop()
        self.redis_server.cleanup()


@dataclass
class Client:
    """One WebSocket client and what its welcome said."""

    ws: aiohttp.ClientWebSocketResponse
    id: str
    user: str
    gateway: ServiceProcess
    instance: str


@dataclass
class Clients:
    """Every client a test opened; all closed at the end (``async with``)."""

    http: aiohttp.ClientSession
    opened: list[Client] = field(default_factory=list)

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.ws.close() for c in self.opened), return_exceptions=True)

    async def connect(
        self, gateway: ServiceProcess, token: str, *, autoping: bool = True
    ) -> Client:
        """A client on ``gateway``, past its welcome. ``autoping=False``: it never answers a
        protocol ping (and sends nothing unless the test makes it)."""
        ws = await self.http.ws_connect(
            ws_url(gateway, token),
            autoping=autoping,
            timeout=aiohttp.ClientWSTimeout(ws_close=timeout(2)),
        )
        try:
            welcome = await recv(ws)
        except BaseException:
            await ws.close()
            raise
        assert welcome["type"] == "welcome", welcome
        client = Client(
            ws, welcome["connection_id"], welcome["user_id"], gateway, instance_of(gateway)
        )
        self.opened.append(client)
        return client

    async def connect_many(
        self, places: list[tuple[ServiceProcess, str]], *, autoping: bool = True
    ) -> list[Client]:
        """Clients on (gateway, token) places, connected concurrently; all or a failure."""
        results = await asyncio.gather(
            *(self.connect(g, t, autoping=autoping) for g, t in places), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Client)]


async def frames_until(ws: aiohttp.ClientWebSocketResponse, fence: Any) -> list[Any]:
    """Every frame before ``fence`` (app pings skipped): what arrived, in order."""
    got: list[Any] = []
    while True:
        frame = await recv(ws)
        if frame == fence:
            return got
        got.append(frame)


async def send_chat(client: Client, channel: str, message_id: str) -> dict[str, Any]:
    """Send one chat message on ``channel``; its answer frame (ack or error)."""
    await client.ws.send_str(
        orjson.dumps(
            {"channel": channel, "intent": "chat", "payload": {"message": "hi"}, "id": message_id}
        ).decode()
    )
    frame: dict[str, Any] = await recv(client.ws)
    return frame


class Api:
    """The Post Office API's delivery calls, as the smart_city realm."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    async def post(self, path: str, message: Any) -> tuple[int, Any]:
        async with self.http.post(
            self.url + path, json={"message": message}, headers=self.headers
        ) as r:
            return r.status, await r.json()

    async def to_connection(self, cid: str, message: Any) -> tuple[int, Any]:
        return await self.post(f"/v1/connections/{cid}/messages", message)

    async def to_user(self, user: str, message: Any) -> tuple[int, Any]:
        return await self.post(f"/v1/users/{user}/messages", message)

    async def broadcast(self, channel: str, message: Any) -> tuple[int, Any]:
        return await self.post(f"/v1/channels/{channel}/broadcast", message)


class Events(Subscriber):
    """Records ``websocket:events``; :meth:`fence` makes "no more events" checkable without
    waiting a fixed time: an event published before the fence arrives before it."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url, names.EVENTS)

    async def __aenter__(self) -> Events:
        await super().__aenter__()
        return self

    async def fence(self, redis: Redis) -> None:
        marker = {"type": "test-fence", "id": uuid.uuid4().hex}
        await redis.publish(names.EVENTS, orjson.dumps(marker))
        await wait_for(lambda: marker in self.json(), 5, what="the fence on websocket:events")

    def of(self, cid: str) -> list[dict[str, Any]]:
        return [e for e in self.json() if e.get("connection_id") == cid]

    def terminal_counts(self) -> Counter[tuple[str, str, str]]:
        """(connection id, type, reason) of every terminal event, counted."""
        return Counter(
            (e["connection_id"], e["type"], e.get("reason", ""))
            for e in self.json()
            if e.get("type") in ("evicted", "disconnected")
        )


def left_gateway(gateway: ServiceProcess, cid: str) -> bool:
    """The gateway finished leaving ``cid`` (its unregister done: the last log line of it)."""
    return any(cid in line and "disconnected (" in line for line in gateway.log().splitlines())


__all__ = [
    "GATEWAY_ENV",
    "WORKER_INTERVAL",
    "Api",
    "Client",
    "Clients",
    "Events",
    "Stack",
    "frames_until",
    "left_gateway",
    "send_chat",
    "start_together",
]
