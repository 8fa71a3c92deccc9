"""The I/O side of one client connection, and the table of every connection this process holds.

:class:`Connection` wraps a :class:`~services.gateway.connection_protocol.ConnectionProtocol`
(which decides everything) around an aiohttp ``WebSocketResponse`` (which moves bytes). After
every event it :meth:`~Connection.apply`\\ s what the protocol decided: client messages go to the
process's publisher, frames wake the socket's writer task, and a close decision starts the
close task. Nothing here waits on a client while fanning out: frames go into the protocol's
bounded queue, and only this socket's own writer waits on its socket.

Closing (:meth:`Connection._close`): a close that flushes lets the writer write what is queued
— owed acks included — for at most ``CLOSE_FLUSH_SECONDS``; then the writer stops and the Close
frame is sent, for at most ``CLOSE_TIMEOUT``. 1013 "too slow" skips the flush: the queue is the
problem. The close always finishes: a writer cancelled while blocked on a client that stopped
reading can make aiohttp's ``close()`` raise ``CancelledError`` (its drain waiter is shared), and
that is taken as an incomplete handshake (the transport is dropped), never as the end of the
owner's clean-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import web

from services.gateway import metrics
from services.gateway.connection_protocol import (
    ConnectionProtocol,
    FrameKind,
    Outgoing,
    Publish,
    State,
    Timing,
)
from shared.protocol import truncate_close_reason
from shared.registry import ConnectionRecord, PublishResult

__all__ = ["Connection", "ConnectionTable", "PublishSink"]

log = logging.getLogger(__name__)


class PublishSink(Protocol):
    """What a connection hands its accepted messages to (the process's publisher)."""

    def submit(self, connection: Connection, publish: Publish) -> str | None:
        """Take ``publish``; None when taken, else why not (the client sees ``unavailable``)."""
        ...


class Connection:
    """A registered socket: the protocol that decides, the writer and closer that act."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        protocol: ConnectionProtocol,
        sink: PublishSink,
        *,
        close_timeout: float,
        flush_timeout: float,
    ) -> None:
        self.ws = ws
        self.protocol = protocol
        self.id = protocol.id
        self.user_id = protocol.user_id
        self.session_id = protocol.session_id
        self.sink = sink
        self.close_timeout = close_timeout
        self.flush_timeout = flush_timeout
        self._wake = asyncio.Event()  # set when the writer has something to do
        self._progress = asyncio.Event()  # set when the writer wrote, or stopped
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._close_counted = False
        #: What the registry holds for it (written again if Redis loses its data).
        self.record: ConnectionRecord | None = None

    def __repr__(self) -> str:
        return f"Connection({self.id!r})"

    @property
    def closing(self) -> bool:
        return self.protocol.closing

    # -- acting on the protocol's decisions ------------------------------------------------------

    def apply(self) -> None:
        """Carry out what the protocol decided during the last event(s). Never waits."""
        proto = self.protocol
        publishes = proto.take_publishes()
        for publish in publishes:
            why = self.sink.submit(self, publish)
            if why is not None:
                proto.publish_refused(publish, why)
        if proto.queued_frames:
            self._wake.set()
        if proto.close is not None and not self._close_counted:
            self._close_counted = True
            metrics.CLOSES.labels(str(proto.close.code)).inc()
            log.info(
                "closing: %d %s",
                proto.close.code,
                proto.close.reason,
                extra={"connection_id": self.id},
            )
            if proto.close.send:
                self._closer = asyncio.create_task(self._close(), name=f"ws-close-{self.id}")
                self._wake.set()

    def published(self, publish: Publish, result: PublishResult) -> None:
        """The publisher's outcome for one of this connection's messages."""
        self.protocol.publish_done(publish, result)
        histogram = _FRAME_TO_REDIS.get(result)
        if histogram is not None and publish.received_at:
            histogram.observe(time.monotonic() - publish.received_at)
        self.apply()

    def deliver(self, text: str, size: int, kind: str = "connection") -> bool:
        """A frame for the client (``kind``: connection or broadcast, for the delivery-write
        latency); False when it was not queued (closing, or overflow)."""
        queued = self.protocol.deliver(text, size, (time.monotonic(), kind))
        self.apply()
        return queued

    # -- the writer ------------------------------------------------------------------------------

    def start_writer(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"ws-writer-{self.id}")
        self._writer.add_done_callback(lambda _task: self._progress.set())

    async def _write(self) -> None:
        ws, proto, stats = self.ws, self.protocol, self.protocol.stats
        coalesce = _raw_text_writer(ws)
        held: Outgoing | None = None  # a control frame taken while gathering text frames
        while True:
            frame, held = (held, None) if held is not None else (proto.next_frame(), None)
            if frame is None:
                self._progress.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            kind, data, timing, reply = frame
            try:
                if kind is FrameKind.TEXT:
                    if coalesce is not None and proto.queued_frames:
                        # Several frames wait (acks released together, a burst of replies):
                        # one write for all of them instead of a syscall each.
                        held = await self._write_batch(coalesce, frame)
                        continue
                    await ws.send_str(data)  # type: ignore[arg-type]
                    stats.frames_out += 1
                    if timing is not None or reply is not None:
                        _observe_written(timing, reply)
                elif kind is FrameKind.PING:
                    await ws.ping()
                else:
                    await ws.pong(data)  # type: ignore[arg-type]
            except (ConnectionError, RuntimeError) as exc:
                # The peer went away mid-write; the reader side sees the close and cleans up.
                log.debug("write failed: %r", exc, extra={"connection_id": self.id})
                return
            self._progress.set()

    async def _write_batch(self, raw: _RawTextWriter, first: Outgoing) -> Outgoing | None:
        """Write ``first`` and the text frames queued behind it (up to ``_BATCH_BYTES``) in
        one transport write; returns a control frame met on the way, to write next."""
        proto, stats = self.protocol, self.protocol.stats
        frames = [first]
        size = len(first[1])
        held: Outgoing | None = None
        while size < _BATCH_BYTES:
            frame = proto.next_frame()
            if frame is None:
                break
            if frame[0] is not FrameKind.TEXT:
                held = frame
                break
            frames.append(frame)
            size += len(frame[1])
        await raw.write([f[1] for f in frames])  # type: ignore[misc]
        stats.frames_out += len(frames)
        for _, _, timing, reply in frames:
            if timing is not None or reply is not None:
                _observe_written(timing, reply)
        self._progress.set()
        return held

    async def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
            await asyncio.wait([writer])

    # -- closing ---------------------------------------------------------------------------------

    async def _flushed(self) -> None:
        """Until every queued frame and owed answer is written, or the writer is gone."""
        proto = self.protocol
        while not proto.flushed:
            writer = self._writer
            if writer is None or writer.done() or proto.close is None or not proto.close.flush:
                return
            self._progress.clear()
            await self._progress.wait()

    async def _close(self) -> None:
        decision = self.protocol.close
        if decision is None:  # pragma: no cover - apply() starts this only after a decision
            return
        if decision.flush:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed(), self.flush_timeout)
        await self._stop_writer()
        self.protocol.socket_ended()  # nothing more is written after the Close frame
        try:
            # A reader that stopped reading must not hold the close forever: past the timeout
            # the transport is dropped.
            await asyncio.wait_for(
                self.ws.close(code=decision.code, message=truncate_close_reason(decision.reason)),
                self.close_timeout,
            )
            return
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.debug("close handshake incomplete: %r", exc, extra={"connection_id": self.id})
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                _drop_transport(self.ws)
                raise  # this task itself is being cancelled
            # aiohttp's drain waiter was cancelled with the writer: the handshake is lost.
            log.debug("close handshake cut short", extra={"connection_id": self.id})
        # aiohttp "closes" the transport, which waits to flush what is buffered first: a client
        # that reads nothing would hold the socket (and this connection's reader) open for
        # ever. Abort it: the reader sees the end and the leave runs.
        _drop_transport(self.ws)

    async def finish(self) -> None:
        """The owner's clean-up, whatever ended the socket: finish a pending close (or close
        normally if none was decided and the socket is open), stop the writer. Returns only
        when the socket is closed or dropped; never raises but for its own cancellation."""
        proto = self.protocol
        if self._closer is None and not self.ws.closed and proto.state is State.OPEN:
            proto.decide_close(1000, "")
            self.apply()
        if self._closer is not None:
            try:
                await asyncio.shield(self._closer)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except Exception:  # a bug in the close path must not skip the unregister
                log.exception("close failed", extra={"connection_id": self.id})
        proto.socket_ended()
        await self._stop_writer()
        if not self.ws.closed:
            _drop_transport(self.ws)


#: Most bytes of text frames gathered into one transport write.
_BATCH_BYTES = 64 * 1024


class _RawTextWriter:
    """Unmasked, uncompressed text frames written straight to the socket's transport, several
    at once (RFC 6455 5.2: a server never masks). aiohttp writes each frame with its own
    transport.write — a syscall each on uvloop. Flow control is aiohttp's: the protocol is
    paused past the transport's high-water mark, and its drain helper waits for it."""

    __slots__ = ("protocol", "transport")

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self.transport = transport
        self.protocol = protocol

    async def write(self, texts: list[str]) -> None:
        parts: list[bytes] = []
        for text in texts:
            payload = text.encode()
            n = len(payload)
            if n < 126:
                parts.append(_LEN1(0x81, n))
            elif n < 65536:
                parts.append(_LEN2(0x81, 126, n))
            else:
                parts.append(_LEN3(0x81, 127, n))
            parts.append(payload)
        if self.transport.is_closing():
            raise ConnectionResetError("the transport is closing")
        self.transport.write(b"".join(parts))
        if self.protocol._paused:
            await self.protocol._drain_helper()


_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack


def _raw_text_writer(ws: web.WebSocketResponse) -> _RawTextWriter | None:
    """The batching writer for ``ws``, or None where frames must go through aiohttp (a
    compressed socket, or an aiohttp whose writer does not look as expected)."""
    writer = getattr(ws, "_writer", None)
    if ws.compress or writer is None:
        return None
    transport, protocol = getattr(writer, "transport", None), getattr(writer, "protocol", None)
    if transport is None or not hasattr(protocol, "_drain_helper"):
        return None
    return _RawTextWriter(transport, protocol)


#: The frame-to-Redis latency, by outcome (children looked up once, not per message).
_FRAME_TO_REDIS = {
    PublishResult.PUBLISHED: metrics.FRAME_TO_REDIS_SECONDS.labels("published"),
    PublishResult.QUEUED: metrics.FRAME_TO_REDIS_SECONDS.labels("queued"),
}
_DELIVERY_WRITE = {
    kind: metrics.DELIVERY_WRITE_SECONDS.labels(kind) for kind in ("connection", "broadcast")
}


def _observe_written(timing: Timing | None, reply: Timing | None) -> None:
    """A delivery was written: how long since it arrived from Redis and, when it answers a
    message of this connection, since that message was read (the client's answer time)."""
    now = time.monotonic()
    if timing is not None:
        arrived, kind = timing
        _DELIVERY_WRITE[kind].observe(now - arrived)
    if reply is not None:
        read_at, channel = reply
        metrics.AGENT_ANSWER_SECONDS.labels(channel).observe(now - read_at)


def _drop_transport(ws: web.WebSocketResponse) -> None:
    """The last resort when no Close could be sent: drop the TCP connection, unflushed."""
    request = ws._req  # aiohttp keeps the request; its transport is the TCP connection
    transport = request.transport if request is not None else None
    if transport is not None:
        transport.abort()


class ConnectionTable:
    """Every connection of this process, with the indexes fan-out and revocation need."""

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_session: defaultdict[str, set[str]] = defaultdict(set)
        self._by_channel: defaultdict[str, set[str]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def get(self, connection_id: str) -> Connection | None:
        return self._by_id.get(connection_id)

    def add(self, conn: Connection) -> None:
        self._by_id[conn.id] = conn
        self._by_session[conn.session_id].add(conn.id)
        for channel in conn.protocol.channels:
            self._by_channel[channel].add(conn.id)
        metrics.CONNECTIONS.set(len(self._by_id))

    def remove(self, conn: Connection) -> None:
        if self._by_id.pop(conn.id, None) is None:
            return
        _discard(self._by_session, conn.session_id, conn.id)
        for channel in conn.protocol.channels:
            _discard(self._by_channel, channel, conn.id)
        metrics.CONNECTIONS.set(len(self._by_id))

    def index_channels(self, conn: Connection, channels: list[str]) -> None:
        """``conn`` used ``channels`` for the first time: it now receives their broadcasts."""
        if conn.id in self._by_id:
            for channel in channels:
                self._by_channel[channel].add(conn.id)

    def of_session(self, session_id: str) -> list[Connection]:
        return [self._by_id[i] for i in self._by_session.get(session_id, ()) if i in self._by_id]

    def count_of_session(self, session_id: str) -> int:
        return len(self._by_session.get(session_id, ()))

    def session_ids(self) -> list[str]:
        return list(self._by_session)

    def using(self, channel: str) -> list[Connection]:
        return [self._by_id[i] for i in self._by_channel.get(channel, ()) if i in self._by_id]


def _discard(index: defaultdict[str, set[str]], key: str, connection_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(connection_id)
        if not ids:
            del index[key]
