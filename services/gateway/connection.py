"""One client connection's local state, and the table of every connection this process holds.

Outbound policy (websockets' "broadcast" topic): nothing that fans out ever waits on a client.
Frames for a socket go into its bounded queue (``SEND_QUEUE_FRAMES`` frames and
``SEND_QUEUE_BYTES`` bytes), written by that socket's own writer task; a socket whose queue is
full is closed with 1013 "too slow" and its frames dropped, so a slow reader costs at most that
much memory.

Answers (acks and errors) reach the client in the order its messages arrived. An ack waits for
the publisher's round trip while an error is known at once, so each accepted message reserves
a place in a per-connection FIFO (:meth:`Connection.reserve`); an error behind pending acks
waits there until they are answered. Deliveries wait there too while acks are pending: the
agent's reply travels through other Redis connections than the ack's round trip and can win
the race, and a client must never see a reply ``in_reply_to`` a message id its ack has not
told it yet. What waits counts against the same frame and byte budget.

Closing: every close but 1013 "too slow" first lets the writer flush what is queued (acks of
published messages included, and the answers still pending) for at most
``CLOSE_FLUSH_SECONDS``, then sends the Close frame. 1013 "too slow" closes at once: the queue
is the problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Iterator

from aiohttp import web

from services.gateway import metrics
from shared.protocol import CloseCode

__all__ = ["Answer", "Connection", "ConnectionTable", "TokenBucket"]

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

    def give_back(self) -> None:
        """Return the token :meth:`take` just took (a frame that turned out to be free)."""
        self.tokens = min(self.burst, self.tokens + 1.0)


class Answer:
    """A place in a connection's answer FIFO; ``text`` is None until the answer is known."""

    __slots__ = ("size", "text")

    def __init__(self, text: str | None = None, size: int = 0) -> None:
        self.text = text
        self.size = size


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
        queue_frames: int,
        queue_bytes: int,
        bucket: TokenBucket,
        pong_bucket: TokenBucket,
        close_timeout: float,
        flush_timeout: float,
        expires_at: float = math.inf,
    ) -> None:
        self.ws = ws
        self.id = connection_id
        self.user_id = user_id
        self.session_id = session_id
        self.expires_at = expires_at  # unix seconds: the session's end, enforced by the tick
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        # Text frames to write, with their size; None is a protocol-level ping.
        self._out: deque[tuple[str | None, int]] = deque()
        self._out_bytes = 0
        self._answers: deque[Answer] = deque()  # in client order; the head may be pending
        self._answers_bytes = 0  # size of the known texts waiting in _answers
        self._wake = asyncio.Event()  # set when the writer has something to write
        self._progress = asyncio.Event()  # set when the writer wrote, or stopped
        self._sealed = False  # nothing more may be queued (the Close frame is next)
        self.bucket = bucket
        self.pong_bucket = pong_bucket
        self.limited_in_a_row = 0
        self.close_timeout = close_timeout
        self.flush_timeout = flush_timeout
        now = time.monotonic()
        self.last_seen = now  # monotonic: the local idle check
        self.last_seen_wall = time.time()  # wall clock: what Redis stores
        self.flushed_wall = self.last_seen_wall  # last value written by the liveness flush
        self.channels: list[str] = []  # channels used, in first-use order
        self.new_channels: list[str] = []  # used since the last flush
        self.close_code: int | None = None  # the code the gateway closes with, once it does
        self.close_reason = ""
        self.evicted = False
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.pongs = 0

    def __repr__(self) -> str:
        return f"Connection({self.id!r})"

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes

    @property
    def queued_frames(self) -> int:
        return len(self._out)

    def seen(self) -> None:
        self.last_seen = time.monotonic()
        self.last_seen_wall = time.time()

    def use_channel(self, channel: str) -> bool:
        """Note the use of ``channel``; True the first time."""
        if channel in self.channels:
            return False
        self.channels.append(channel)
        self.new_channels.append(channel)
        return True

    # -- outbound ---------------------------------------------------------------------------

    def send(self, text: str, size: int | None = None) -> bool:
        """Queue one text frame (a delivery, a ping); on overflow close with 1013. Never waits.

        ``size`` is the frame's length in bytes when the caller knows it (pub/sub gives bytes);
        otherwise ``len(text)``, exact for the ASCII frames the gateway builds itself.
        """
        if self.closing:
            return False
        size = len(text) if size is None else size
        if self._answers:
            return self._hold(text, size)
        return self._push(text, size)

    def ping(self) -> bool:
        """Queue a protocol-level ping, written in turn by the writer (never waits here)."""
        if self.closing:
            return False
        return self._push(None, 0)

    def reserve(self) -> Answer:
        """A place in the answer FIFO for a message whose answer comes later (its ack)."""
        place = Answer()
        self._answers.append(place)
        return place

    def answer(self, place: Answer, text: str) -> None:
        """Fill a reserved place; answers are written once every earlier one is known."""
        if self._sealed:
            return
        place.text = text
        place.size = len(text)
        self._answers_bytes += place.size
        self._release()

    def answer_now(self, text: str) -> None:
        """An answer known at once (an error): written now, or behind the pending acks."""
        if not self._answers:
            self._push(text, len(text))
            return
        self._hold(text, len(text))

    def _hold(self, text: str, size: int) -> bool:
        """Queue ``text`` behind the pending answers, within the same budget as the queue."""
        if self._sealed:
            return False
        if (
            len(self._answers) + len(self._out) >= self.queue_frames
            or self._out_bytes + self._answers_bytes + size > self.queue_bytes
        ):
            self._overflow()
            return False
        self._answers.append(Answer(text, size))
        self._answers_bytes += size
        return True

    def _release(self) -> None:
        answers = self._answers
        while answers and answers[0].text is not None:
            done = answers.popleft()
            self._answers_bytes -= done.size
            if done.text is not None:
                self._push(done.text, done.size)

    def _push(self, text: str | None, size: int) -> bool:
        if self._sealed:
            return False
        if len(self._out) >= self.queue_frames or self._out_bytes + size > self.queue_bytes:
            self._overflow()
            return False
        self._out.append((text, size))
        self._out_bytes += size
        self._wake.set()
        return True

    def _overflow(self) -> None:
        log.warning(
            "send queue full (%d frames, %d bytes), closing",
            len(self._out),
            self._out_bytes,
            extra={"connection_id": self.id},
        )
        self._sealed = True
        self._out.clear()
        self._out_bytes = 0
        self._answers.clear()
        self._answers_bytes = 0
        if self.closing:
            # A close was already flushing: it must not wait on a queue that is gone.
            self._progress.set()
            return
        self.close(CloseCode.TRY_AGAIN_LATER, "too slow")

    def start_writer(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"ws-writer-{self.id}")
        self._writer.add_done_callback(lambda _task: self._progress.set())

    async def _write(self) -> None:
        ws, out = self.ws, self._out
        while True:
            if not out:
                self._wake.clear()
                await self._wake.wait()
                continue
            text, size = out.popleft()
            self._out_bytes -= size
            try:
                if text is None:
                    await ws.ping()
                    self._progress.set()
                    continue
                await ws.send_str(text)
            except (ConnectionError, RuntimeError) as exc:
                # The peer went away mid-write; the reader side sees the close and cleans up.
                log.debug("write failed: %r", exc, extra={"connection_id": self.id})
                return
            self.messages_out += 1
            Connection.frames_written += 1
            metrics.FRAMES_OUT.inc()
            self._progress.set()

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
        code, reason = self.close_code or CloseCode.NORMAL, self.close_reason
        # A "too slow" close sealed and emptied the queue already: nothing waits here then.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed(), self.flush_timeout)
        self._sealed = True
        await self.stop_writer()
        try:
            # A reader that stopped reading must not hold the close forever: past the timeout
            # aiohttp drops the transport (close() cancelled).
            await asyncio.wait_for(
                self.ws.close(code=code, message=reason.encode()[:120]), self.close_timeout
            )
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.debug("close handshake incomplete: %r", exc, extra={"connection_id": self.id})

    async def _flushed(self) -> None:
        """Until everything queued and every pending answer is written (or the writer is gone)."""
        while self._out or self._answers:
            writer = self._writer
            if writer is None or writer.done() or self._sealed:
                return
            self._progress.clear()
            await self._progress.wait()

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
        self._sealed = True
        await self.stop_writer()


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
        for channel in conn.channels:
            self._by_channel[channel].add(conn.id)
        metrics.CONNECTIONS.set(len(self._by_id))

    def remove(self, conn: Connection) -> None:
        if self._by_id.pop(conn.id, None) is None:
            return
        _discard(self._by_session, conn.session_id, conn.id)
        for channel in conn.channels:
            _discard(self._by_channel, channel, conn.id)
        metrics.CONNECTIONS.set(len(self._by_id))

    def use_channel(self, conn: Connection, channel: str) -> None:
        """``conn`` used ``channel``: from now on it receives the channel's broadcasts."""
        if conn.use_channel(channel) and conn.id in self._by_id:
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
