"""What the floor (:mod:`bench.floor`) and the socketio peer (:mod:`bench.sio_server`) share.

Both are aiohttp servers with one batched publisher to Redis. This imports only aiohttp,
uvloop and :mod:`bench.resp`, so it runs in the socketio peer's own venv too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web

from bench.resp import BatchedPublisher, Resp

__all__ = ["running_publisher", "serve", "watch"]


def _die_unless_cancelled(task: asyncio.Task[None]) -> None:
    # A part of the server dying is the server failing: exit rather than measure half of it.
    if not task.cancelled():
        os._exit(3)


def watch(task: asyncio.Task[None]) -> asyncio.Task[None]:
    """``task``, with the process exiting (status 3) should it ever end by itself."""
    task.add_done_callback(_die_unless_cancelled)
    return task


@contextlib.asynccontextmanager
async def running_publisher(redis_url: str) -> AsyncIterator[BatchedPublisher]:
    """A :class:`BatchedPublisher` on its own connection, its task running until exit."""
    publisher = BatchedPublisher(await Resp.open(redis_url))
    task = watch(asyncio.create_task(publisher.run()))
    try:
        yield publisher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await publisher.conn.close()


def serve(app: web.Application, port_variable: str, default_port: int) -> None:
    """Run ``app`` on uvloop, on 127.0.0.1 and the port ``port_variable`` names."""
    uvloop.install()
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(os.environ.get(port_variable, str(default_port))),
        print=None,
        shutdown_timeout=2,
    )
