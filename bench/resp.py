"""The least Redis client a benchmark part can use: RESP over one asyncio stream, hiredis parsing.

The floor (:mod:`bench.floor`), the raw responder (:mod:`bench.responder`) and the
python-socketio peer (:mod:`bench.sio_server`) talk to Redis through this, not redis-py, so
their cost is what Redis and the kernel charge and nothing else: a batch of commands is one
``write`` and its replies are parsed straight off the socket by hiredis. It depends only on
``hiredis`` and the standard library, so the socketio peer's own venv can import it too.

:class:`BatchedPublisher` is "one batched PUBLISH task": whatever was queued while the previous
batch's round trip ran goes out as the next batch, so batches stay small under light load and
grow under heavy load. :func:`subscribe` is "one SUBSCRIBE reader": every read of the socket
yields every pub/sub message already parsed from it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import hiredis

__all__ = ["BatchedPublisher", "Resp", "encode", "subscribe"]

#: Most commands one batch holds; a bigger backlog goes out over the following round trips.
MAX_BATCH = 512


def encode(*args: bytes | str) -> bytes:
    """One command in RESP: ``*<n>`` then ``$<len>`` and the bytes of each argument."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Resp:
    """One connection: write encoded commands, read replies in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str) -> Resp:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(
            parts.hostname or "127.0.0.1", parts.port or 6379, limit=1 << 20
        )
        conn = cls(reader, writer)
        db = (parts.path or "/0").lstrip("/") or "0"
        if db != "0":
            conn.writer.write(encode("SELECT", db))
            await conn.replies(1)
        return conn

    async def replies(self, count: int) -> list[Any]:
        """The next ``count`` replies (a RESP error is raised, not returned)."""
        out: list[Any] = []
        while len(out) < count:
            reply = self.parser.gets()
            if reply is False:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionError("redis closed the connection")
                self.parser.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise reply
            out.append(reply)
        return out

    async def some(self) -> list[Any]:
        """Every reply parsed from the next read of the socket (at least one)."""
        out: list[Any] = []
        while not out:
            data = await self.reader.read(1 << 16)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.parser.feed(data)
            while (reply := self.parser.gets()) is not False:
                out.append(reply)
        return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def subscribe(
    url: str, channels: Sequence[str] = (), patterns: Sequence[str] = ()
) -> AsyncIterator[list[tuple[bytes, bytes]]]:
    """``(channel, data)`` batches from one pub/sub connection, once every subscription is
    confirmed (the first batch yielded is empty, so a caller can say it is ready)."""
    conn = await Resp.open(url)
    try:
        if channels:
            conn.writer.write(encode("SUBSCRIBE", *channels))
        if patterns:
            conn.writer.write(encode("PSUBSCRIBE", *patterns))
        await conn.replies(len(channels) + len(patterns))
        yield []
        while True:
            batch: list[tuple[bytes, bytes]] = []
            for reply in await conn.some():
                if reply[0] == b"message":
                    batch.append((reply[1], reply[2]))
                elif reply[0] == b"pmessage":
                    batch.append((reply[2], reply[3]))
            if batch:
                yield batch
    finally:
        await conn.close()


class BatchedPublisher:
    """``put(channel, data)`` from anywhere on the loop; one task sends them in pipelines."""

    def __init__(self, conn: Resp) -> None:
        self.conn = conn
        self.pending: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.published = 0
        self.receivers = 0
        self.batches = 0

    def put(self, channel: bytes | str, data: bytes | str) -> None:
        self.pending.append(encode("PUBLISH", channel, data))
        self.wake.set()

    async def run(self) -> None:
        """Until cancelled: send what is pending as one write, read its replies, repeat."""
        pending = self.pending
        while True:
            if not pending:
                self.wake.clear()
                await self.wake.wait()
            count = min(len(pending), MAX_BATCH)
            self.conn.writer.write(b"".join(pending.popleft() for _ in range(count)))
            replies = await self.conn.replies(count)
            self.published += count
            self.receivers += sum(int(r) for r in replies)
            self.batches += 1
