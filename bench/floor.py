"""The bare floor: the least any WebSocket gateway on aiohttp and Redis can cost.

``python -m bench.floor`` (``FLOOR_PORT``, ``REDIS_URL``): an aiohttp ``/ws`` endpoint with no
authentication, validation, registry, acks, limits or metrics. Each text frame from a socket is
wrapped, without parsing it, as ``{"connection_id": <n>, "message": <frame>}`` and handed to one
batched publisher (:class:`bench.resp.BatchedPublisher`) for the ``websocket:guide`` agent
channel; one pattern subscription (``websocket:connection:*:messages``) on one connection
delivers every answer to its socket. One process, so one pattern subscription serves all
sockets (a fleet of gateways needs a channel per connection instead, as Post Office has);
heartbeats are on (aiohttp's protocol ping, every 30 s) as on the gateway. ``GET /ready``
answers 200 once the subscription is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web

from bench.peer import running_publisher, serve, watch
from bench.resp import BatchedPublisher, subscribe
from shared import redis_names as names

HEARTBEAT_SECONDS = 30.0
SOCKETS = web.AppKey("sockets", dict[str, web.WebSocketResponse])
PUBLISHER = web.AppKey("publisher", BatchedPublisher)
READY = web.AppKey("ready", asyncio.Event)


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS)
    await ws.prepare(request)
    sockets = request.app[SOCKETS]
    publisher = request.app[PUBLISHER]
    connection_id = str(next(_ids))
    channel = names.agent_channel("guide")
    head = b'{"connection_id":"%s","message":' % connection_id.encode()
    sockets[connection_id] = ws
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                publisher.put(channel, head + msg.data.encode() + b"}")
    finally:
        sockets.pop(connection_id, None)
    return ws


async def ready(request: web.Request) -> web.Response:
    is_ready = request.app[READY].is_set()
    return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)


_ids = itertools.count(1)


async def redis_parts(app: web.Application) -> AsyncIterator[None]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    sockets = app[SOCKETS]
    prefix, suffix = names.connection_messages("*").split("*")
    start, end = len(prefix), -len(suffix)

    async def deliver() -> None:
        async for batch in subscribe(url, patterns=[names.connection_messages("*")]):
            app[READY].set()
            for channel, data in batch:
                ws = sockets.get(channel[start:end].decode())
                if ws is not None and not ws.closed:
                    await ws.send_str(data.decode())

    async with running_publisher(url) as publisher:
        app[PUBLISHER] = publisher
        delivery = watch(asyncio.create_task(deliver()))
        yield
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery


def create_app() -> web.Application:
    app = web.Application()
    app[SOCKETS] = {}
    app[READY] = asyncio.Event()
    app.router.add_get("/ws", websocket)
    app.router.add_get("/ready", ready)
    app.cleanup_ctx.append(redis_parts)
    return app


def main() -> None:
    serve(create_app(), "FLOOR_PORT", 8900)


if __name__ == "__main__":
    main()
