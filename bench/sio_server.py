"""The reference peer: python-socketio 5.x with its AsyncRedisManager, on aiohttp.

Run by :mod:`bench.roundtrip` with the interpreter of its own venv (``.bench-venv/``, made by
:func:`bench.sio_venv.ensure`), so python-socketio never enters the project's lock: it imports
only the standard library, python-socketio, redis, aiohttp, uvloop and :mod:`bench.resp`
(hiredis) and :mod:`bench.peer`. ``SIO_PORT`` and ``REDIS_URL`` configure it.

It is what an application on python-socketio would write for the same round trip: an event
``msg`` from a client is wrapped as ``{"connection_id": <sid>, "message": <data>}`` and handed
to one batched publisher for the ``websocket:guide`` agent channel (the same publisher the
floor uses, so the difference measured is socketio's own cost); the answer comes back through
AsyncRedisManager, which every socketio server subscribes to (channel ``socketio``), as an
``emit("reply", ..., to=sid)`` published by the responder. ``GET /ready`` answers 200 once the
app runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import socketio  # type: ignore[import-not-found]  # only in .bench-venv
from aiohttp import web

from bench.peer import running_publisher, serve
from bench.resp import BatchedPublisher

#: shared.redis_names.agent_channel("guide"); spelled here because this process runs outside
#: the project's venv. bench.roundtrip checks the two agree before starting it.
AGENT_CHANNEL = "websocket:guide"
PUBLISHER = web.AppKey("publisher", BatchedPublisher)


def create_app(redis_url: str) -> web.Application:
    manager = socketio.AsyncRedisManager(redis_url)
    # Ping every 25 s, python-socketio's default: the heartbeat is on, as on the gateway.
    sio = socketio.AsyncServer(
        async_mode="aiohttp", client_manager=manager, cors_allowed_origins="*"
    )
    app = web.Application()
    sio.attach(app)

    @sio.on("msg")  # type: ignore[untyped-decorator]
    async def on_msg(sid: str, data: Any) -> None:
        app[PUBLISHER].put(
            AGENT_CHANNEL,
            json.dumps({"connection_id": sid, "message": data}, separators=(",", ":")),
        )

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def redis_parts(app: web.Application) -> AsyncIterator[None]:
        async with running_publisher(redis_url) as publisher:
            app[PUBLISHER] = publisher
            # The manager starts its listener on the first connect; start it now, so the first
            # answers are not lost while it subscribes (bench.roundtrip waits for the
            # subscription with PUBSUB NUMSUB before it connects anyone).
            sio.manager_initialized = True
            manager.initialize()
            yield

    app.router.add_get("/ready", ready)
    app.cleanup_ctx.append(redis_parts)
    return app


def main() -> None:
    serve(create_app(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")), "SIO_PORT", 8901)


if __name__ == "__main__":
    main()
