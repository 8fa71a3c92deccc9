"""Helpers of the Post Office API tests: settings, a raw SSE reader, a pub/sub listener.

The SSE reader here is deliberately independent of ``post_office_client`` so the server's wire
format is tested on its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from services.post_office_api.settings import ApiSettings
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, timeout

KEYS = {
    "smart_city": "dev-smart_city",
    "experience": "dev-experience",
    "business_enablement": "dev-business_enablement",
}


class ProductionServer(TestServer):
    """aiohttp's test server cancels a handler whose client disconnects; ``web.run_app`` (what
    the service runs) does not. Tests run the way production does."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


def auth(realm: str = "smart_city") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[realm]}"}


def api_settings(redis_url: str, **overrides: Any) -> ApiSettings:
    base = ApiSettings(
        redis_url=redis_url,
        port=0,
        instance_id="api-test",
        traffic_cop_url="",  # no Traffic Cop unless a test starts one
        sse_keepalive_seconds=0.1,
        sse_subscribe_timeout_seconds=timeout(5),
        pubsub_backoff_base_seconds=0.01,
        pubsub_backoff_cap_seconds=0.1,
        shutdown_timeout=timeout(2),
    )
    settings = dataclasses.replace(base, **overrides)
    settings.validate()
    return settings


async def read_event(resp: aiohttp.ClientResponse) -> dict[str, Any] | None:
    """The next SSE event as {"event", "id", "data"}; None at the end of the stream.
    Comments and keep-alives are skipped; ``retry`` alone is not an event."""
    event: dict[str, Any] = {"event": "message", "id": None, "data": None}
    data: list[str] = []
    while True:
        raw = await asyncio.wait_for(resp.content.readline(), timeout(5))
        if not raw:
            return None
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                event["data"] = "\n".join(data)
                return event
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            event[name] = value


async def read_until_subscribed(resp: aiohttp.ClientResponse) -> None:
    """Consume the stream's preamble (``retry`` and the ``: subscribed`` comment)."""
    while True:
        raw = await asyncio.wait_for(resp.content.readline(), timeout(5))
        assert raw, "stream ended before its preamble"
        if raw.startswith(b": subscribed"):
            await resp.content.readline()  # the blank line closing the preamble
            return


class Listener:
    """A real Redis pub/sub subscriber standing in for a gateway's subscription."""

    def __init__(self, redis: Redis) -> None:
        self.pubsub = redis.pubsub()

    async def subscribe(self, *channels: str) -> Listener:
        await self.pubsub.subscribe(*channels)
        for _ in channels:
            reply = await self.pubsub.get_message(timeout=timeout(5))
            assert reply is not None and reply["type"] == "subscribe", reply
        return self

    async def next(self, seconds: float = 5) -> tuple[str, bytes]:
        deadline = asyncio.get_running_loop().time() + timeout(seconds)
        while True:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, "no pub/sub message in time"
            reply = await self.pubsub.get_message(timeout=left)
            if reply is not None and reply["type"] == "message":
                return reply["channel"].decode(), reply["data"]

    async def nothing(self, seconds: float = 0.2) -> None:
        reply = await self.pubsub.get_message(timeout=timeout(seconds))
        assert reply is None, reply

    async def close(self) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]


@asynccontextmanager
async def listening(redis: Redis, *channels: str) -> AsyncIterator[Listener]:
    listener = await Listener(redis).subscribe(*channels)
    try:
        yield listener
    finally:
        await listener.close()


def api_process(redis_url: str, traffic_cop: ServiceProcess, **env: str) -> ServiceProcess:
    """A real ``python -m services.post_office_api`` on a free port (not started yet)."""
    service = ServiceProcess(
        "services.post_office_api",
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": traffic_cop.url,
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            **env,
        },
    )
    service.env["POST_OFFICE_PORT"] = str(service.port)
    return service


async def numsub(redis: Redis, channel: str) -> int:
    result = await redis.pubsub_numsub(channel)
    return int(result[0][1])


def guide_process(api_url: str, **env: str) -> ServiceProcess:
    """The real guide agent (not started) against ``api_url``, with short re-subscribe backoffs
    and a short idle timeout so tests see it recover in seconds; ``env`` adds or overrides."""
    return ServiceProcess(
        "agents.guide",
        {
            "POST_OFFICE_URL": api_url,
            "GUIDE_AGENT_BACKOFF_BASE_SECONDS": "0.05",
            "GUIDE_AGENT_BACKOFF_CAP_SECONDS": "0.2",
            "GUIDE_AGENT_IDLE_TIMEOUT_SECONDS": str(timeout(2)),
            **env,
        },
    )
