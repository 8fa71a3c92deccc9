"""One client connection's local state, and the table of every connection this process holds.

Outbound policy (websockets' "broadcast" topic): nothing that fans out ever waits on a client.
Frames for a socket go into its bounded queue, written by that socket's own writer task; a
socket whose queue is full is closed with 1013 "too slow" and its frames dropped, so a slow
reader costs at most ``SEND_QUEUE_FRAMES`` frames of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator

from aiohttp import web

from services.gateway import metrics
from shared.protocol import CloseCode

__all__ = ["Connection", "ConnectionTable", "TokenBucket"]

log = logging.getLogger(__name__)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; one token per client frame."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        # The epsilon absorbs float rounding of (now - stamp) * rate on large monotonic clocks,
        # so a token that is due after exactly 1/rate seconds is given, not withheld.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False


class Connection:
    """A registered socket: identity, outbound queue and writer, liveness, rate limit."""

    #: Frames written by every connection of the process (the detailed health view).
    frames_written = 0

    def __init__(
        self,
        ws: web.WebSocketResponse,
        connection_id: str,
        user_id: str,
        session_id: str,
        *,
        queue_size: int,
        bucket: TokenBucket,
        close_timeout: float,
    ) -> None:
        self.ws = ws
        self.id = connection_id
        self.user_id = user_id
        self.session_id = session_id
        self.queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self.bucket = bucket
        self.limited_in_a_row = 0
        self.close_timeout = close_timeout
        now = time.monotonic()
        self.last_seen = now  # monotonic: the local idle check
        self.last_seen_wall = time.time()  # wall clock: what Redis stores
        self.flushed_wall = self.last_seen_wall  # last value written by the liveness flush
        self.channels: list[str] = []  # channels used, in first-use order
        self.new_channels: list[str] = []  # used since the last flush
        self.close_code: int | None = None
        self.close_reason = ""
        self.evicted = False
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self.messages_in = 0
        self.messages_out = 0

    def __repr__(self) -> str:
        return f"Connection({self.id!r})"

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def seen(self) -> None:
        self.last_seen = time.monotonic()
        self.last_seen_wall = time.time()

    def use_channel(self, channel: str) -> None:
        if channel not in self.channels:
            self.channels.append(channel)
            self.new_channels.append(channel)

    # -- outbound ---------------------------------------------------------------------------

    def send(self, text: str) -> bool:
        """Queue one text frame; on overflow close the socket with 1013. Never waits."""
        if self.closing:
            return False
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            log.warning("send queue full, closing", extra={"connection_id": self.id})
            self.close(CloseCode.TRY_AGAIN_LATER, "too slow")
            return False
        return True

    def start_writer(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"ws-writer-{self.id}")

    async def _write(self) -> None:
        ws, queue = self.ws, self.queue
        while True:
            text = await queue.get()
            try:
                await ws.send_str(text)
            except (ConnectionError, RuntimeError) as exc:
                # The peer went away mid-write; the reader side sees the close and cleans up.
                log.debug("write failed: %r", exc, extra={"connection_id": self.id})
                return
            self.messages_out += 1
            Connection.frames_written += 1
            metrics.FRAMES_OUT.inc()

    # -- closing ----------------------------------------------------------------------------

    def close(self, code: int, reason: str, *, evicted: bool = False) -> None:
        """Close the socket with ``code`` soon (from any task, never waiting); first call wins."""
        if self.closing:
            return
        self.close_code = code
        self.close_reason = reason
        self.evicted = evicted
        metrics.CLOSES.labels(str(code)).inc()
        self._closer = asyncio.create_task(self._close(), name=f"ws-close-{self.id}")

    async def _close(self) -> None:
        await self.stop_writer()
        code, reason = self.close_code or CloseCode.NORMAL, self.close_reason
        try:
            # A reader that stopped reading must not hold the close forever: past the timeout
            # aiohttp drops the transport (close() cancelled).
            await asyncio.wait_for(
                self.ws.close(code=code, message=reason.encode()[:120]), self.close_timeout
            )
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.debug("close handshake incomplete: %r", exc, extra={"connection_id": self.id})

    async def stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait([self._writer])
            self._writer = None

    async def wait_closed(self) -> None:
        """Owner's cleanup: stop the writer, finish a pending close (or close if none was asked)."""
        if self._closer is None and not self.ws.closed:
            self.close_code = self.close_code or CloseCode.NORMAL
            self._closer = asyncio.create_task(self._close(), name=f"ws-close-{self.id}")
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closer)
        await self.stop_writer()


class ConnectionTable:
    """Every connection of this process, with the indexes fan-out and revocation need."""

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_session: defaultdict[str, set[str]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def get(self, connection_id: str) -> Connection | None:
        return self._by_id.get(connection_id)

    def add(self, conn: Connection) -> None:
        self._by_id[conn.id] = conn
        self._by_session[conn.session_id].add(conn.id)
        metrics.CONNECTIONS.set(len(self._by_id))

    def remove(self, conn: Connection) -> None:
        if self._by_id.pop(conn.id, None) is None:
            return
        ids = self._by_session.get(conn.session_id)
        if ids is not None:
            ids.discard(conn.id)
            if not ids:
                del self._by_session[conn.session_id]
        metrics.CONNECTIONS.set(len(self._by_id))

    def of_session(self, session_id: str) -> list[Connection]:
        return [self._by_id[i] for i in self._by_session.get(session_id, ()) if i in self._by_id]

    def using(self, channel: str) -> list[Connection]:
        return [c for c in self._by_id.values() if channel in c.channels]
