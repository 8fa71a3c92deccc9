"""The life of one client connection, as a sans-I/O state machine.

This is the one place that decides what happens to a connection for any input. In the manner
of python-websockets' ``Protocol``, it takes *events* and produces *actions*, and does no I/O:
it imports neither asyncio nor aiohttp, reads no clock (every event carries ``now``), and is
tested without sockets or an event loop (tests/test_connection_protocol.py, with hypothesis).

Events (methods): a text frame, a binary frame, a protocol ping, a protocol pong, a heartbeat,
a tick, a publish outcome, a delivery from an agent, a close command, a revoked, expired or
stale session, the drain, a socket error, and the socket's end.

Actions (what the I/O layer collects after each event):

* :meth:`ConnectionProtocol.next_frame` — the frames to write, in order: text frames, protocol
  pings and pongs. Their queue is bounded (``queue_frames`` frames, ``queue_bytes`` bytes);
  past either bound the connection closes 1013 "too slow" and what was queued is dropped, so a
  client that stops reading costs at most that much memory (nothing that fans out waits on it).
* :meth:`ConnectionProtocol.take_publishes` — client messages to hand to the agent channel,
  each with the :class:`Answer` place its outcome goes back to (:meth:`publish_done`).
* :attr:`ConnectionProtocol.close` — the close decision, made once: code, reason, whether the
  connection counts as evicted and whether queued frames are flushed first.

Answer order. Every client frame that gets an answer (an ack or an error) gets exactly one, in
the order the frames came in: an accepted message reserves a place in the answer FIFO, and an
error known at once waits behind the acks still pending. A delivery waits there too while acks
are pending — the agent's reply travels through other Redis connections than the ack's round
trip and can win the race, and a client must never see a reply to a message id that its ack
has not told it yet. What waits counts against the same frame and byte budget.

States::

    OPEN ──close decided──▶ CLOSING ──socket ended──▶ CLOSED
      └─────────────socket ended (client left, socket error)─────▶ CLOSED

After the close decision nothing new is accepted: frames from the client are not read, and
deliveries, pings and errors are dropped. The only frames still written are the answers owed
to messages accepted before it (their acks), and only when the close flushes (every close but
1013 "too slow": there the queue is the problem).

Budgets. Every client frame takes a token from the connection's bucket (``rate_per_second``,
``rate_burst``): text, binary, protocol pings and protocol pongs alike, so no kind of frame buys
unbounded work. A pong (app or protocol) within the pong allowance gives its token back. A
frame without a token is answered ``rate_limited`` (text; a pong is never answered, a ping is
not ponged), and ``rate_limit_close_after`` such frames in a row close the socket with 4429.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import (
    CLOSE_REASON_RATE_LIMITED,
    CloseCode,
    ErrorCode,
    ProtocolError,
    ack_frame,
    agent_message,
    decode_client_frame,
    error_frame,
    is_close_command_code,
    new_message_id,
    peek_rate_limited_frame,
)
from shared.registry import PublishResult
from shared.tracing import message_traceparent

__all__ = [
    "Answer",
    "CloseDecision",
    "ConnectionProtocol",
    "FrameKind",
    "Limits",
    "Outgoing",
    "ProtocolStats",
    "Publish",
    "State",
    "Timing",
    "TokenBucket",
]


class State(enum.Enum):
    OPEN = "open"  # registered: frames are read and answered
    CLOSING = "closing"  # the close is decided: owed answers flush, then the Close frame
    CLOSED = "closed"  # the socket is gone: nothing more is written


class FrameKind(enum.Enum):
    TEXT = "text"
    PING = "ping"  # a protocol-level ping (liveness)
    PONG = "pong"  # the answer to a client's protocol ping


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; one token per client frame."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        # A clock that went backwards (an event carried an older ``now``) refills nothing.
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)
        # The epsilon absorbs float rounding of (now - stamp) * rate on large monotonic clocks,
        # so a token that is due after exactly 1/rate seconds is given, not withheld.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def give_back(self) -> None:
        """Return the token :meth:`take` just took (a frame that turned out to be free)."""
        self.tokens = min(self.burst, self.tokens + 1.0)


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-connection limits (the gateway's settings of the same names)."""

    queue_frames: int
    queue_bytes: int
    rate_per_second: float
    rate_burst: int
    rate_limit_close_after: int
    pong_rate_per_second: float
    pong_burst: int
    max_idle_seconds: float


@dataclass(slots=True)
class ProtocolStats:
    """What every connection of a process adds to, as plain integers: the gateway's metrics
    read them when scraped, so no frame pays for a Prometheus call."""

    acks: dict[str, int] = field(default_factory=lambda: {"published": 0, "queued": 0})
    errors: dict[str, int] = field(default_factory=dict)
    pongs: int = 0
    frames_in: int = 0  # every frame read from a client (counted by the reader)
    frames_out: int = 0  # every text frame written to a client (counted by the writer)

    def error(self, code: ErrorCode) -> None:
        key = str(code)
        self.errors[key] = self.errors.get(key, 0) + 1


#: (when it arrived, a label): a delivery's arrival and kind, or an answered message's
#: arrival and channel. The I/O layer turns them into latencies once the frame is written.
Timing = tuple[float, str]


class Answer:
    """A place in the answer FIFO; ``text`` is None until the answer is known."""

    __slots__ = ("reply", "size", "text", "timing")

    def __init__(
        self,
        text: str | None = None,
        size: int = 0,
        timing: Timing | None = None,
        reply: Timing | None = None,
    ) -> None:
        self.text = text
        self.size = size
        self.timing = timing
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Publish:
    """A client message to hand to the agent channel; its outcome goes back to ``place``."""

    channel: str
    data: bytes
    message_id: str
    client_id: str | int | None
    place: Answer
    received_at: float = 0.0  # monotonic: when its frame was read


@dataclass(frozen=True, slots=True)
class CloseDecision:
    code: int
    reason: str
    evicted: bool  # announced as "evicted" rather than "disconnected"
    flush: bool  # write what is queued first (False for 1013 "too slow")
    send: bool = True  # send a Close frame (False: the socket is already closed)


#: A rate-limited frame longer than this is not parsed to echo its ``id`` (the error has null).
RATE_LIMITED_PARSE_BYTES = 1024

#: Messages whose answer (a delivery ``in_reply_to`` them) is awaited, for the answer-time
#: metric; past it the oldest is forgotten (its answer is then not timed).
MAX_AWAITED_ANSWERS = 256

_IN_REPLY_TO = '"in_reply_to":"'

#: A queued frame: kind, data, size, delivery timing, answered message's timing.
_Frame = tuple[FrameKind, str | bytes, int, Timing | None, Timing | None]
_PING: _Frame = (FrameKind.PING, b"", 0, None, None)
#: What :meth:`ConnectionProtocol.next_frame` hands the writer.
Outgoing = tuple[FrameKind, str | bytes, Timing | None, Timing | None]


class ConnectionProtocol:
    """One registered connection: its state, budgets, answer order and outbound queue."""

    def __init__(
        self,
        connection_id: str,
        user_id: str,
        session_id: str,
        *,
        instance: str,
        channels: frozenset[str],
        limits: Limits,
        now: float,
        wall: float,
        expires_at: float = math.inf,
        stats: ProtocolStats | None = None,
    ) -> None:
        self.id = connection_id
        self.user_id = user_id
        self.session_id = session_id
        self.instance = instance
        self.allowed_channels = channels
        self.limits = limits
        self.expires_at = expires_at  # unix seconds: the session's end
        self.state = State.OPEN
        self.close: CloseDecision | None = None
        self.bucket = TokenBucket(limits.rate_per_second, limits.rate_burst, now)
        self.pong_bucket = TokenBucket(limits.pong_rate_per_second, limits.pong_burst, now)
        self.limited_in_a_row = 0
        self._out: deque[_Frame] = deque()
        self._out_bytes = 0
        self._answers: deque[Answer] = deque()  # in client order; the head may be pending
        self._answers_bytes = 0  # size of the known texts waiting in _answers
        self._publishes: list[Publish] = []
        self.last_seen = now  # monotonic: the local idle check
        self.last_seen_wall = wall  # wall clock: what Redis stores
        self.flushed_wall = wall  # the last value the liveness flush wrote
        self.channels: list[str] = []  # channels used, in first-use order
        self.new_channels: list[str] = []  # used since the last liveness flush
        self.stats = stats if stats is not None else ProtocolStats()
        self._awaited: dict[str, Timing] = {}  # message id -> (read at, channel)

    def __repr__(self) -> str:
        return f"ConnectionProtocol({self.id!r}, {self.state.value})"

    # -- what the I/O layer reads ---------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.state is not State.OPEN

    @property
    def queued_frames(self) -> int:
        return len(self._out)

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes

    @property
    def flushed(self) -> bool:
        """Nothing left to write: the queue is empty and no answer is owed."""
        return not self._out and not self._answers

    def next_frame(self) -> Outgoing | None:
        """The next frame to write, taken off the queue; None when there is none. With it:
        a delivery's (arrival, kind), and the (arrival, channel) of the message it answers."""
        if not self._out:
            return None
        kind, data, size, timing, reply = self._out.popleft()
        self._out_bytes -= size
        return kind, data, timing, reply

    def take_publishes(self) -> list[Publish]:
        """The client messages accepted since the last call, to hand to the publisher."""
        out, self._publishes = self._publishes, []
        return out

    # -- events from the client -------------------------------------------------------------------

    def receive_text(self, data: str, now: float, wall: float) -> None:
        if self.state is not State.OPEN:
            return  # frames after the close decision are not taken (nor answered)
        self._seen(now, wall)
        if not self._take(now):
            self._limited(data)
            return
        try:
            frame = decode_client_frame(data, self.allowed_channels)
        except ProtocolError as exc:
            self._error(exc.client_id, exc.code, exc.message)
            return
        if frame is None:  # the app pong: liveness only, never answered
            self._pong(now)
            return
        message_id = new_message_id()
        if frame.channel not in self.channels:
            self.channels.append(frame.channel)
            self.new_channels.append(frame.channel)
        metadata = frame.payload.get("metadata")
        parent = metadata.get("traceparent") if isinstance(metadata, dict) else None
        body = agent_message(
            frame,
            message_id=message_id,
            connection_id=self.id,
            user_id=self.user_id,
            gateway_instance=self.instance,
            traceparent=message_traceparent(
                parent if isinstance(parent, str) else None,
                channel=frame.channel,
                message_id=message_id,
            ),
        ).to_bytes()
        place = Answer()  # the answer goes out in the order the message came in
        self._answers.append(place)
        self._publishes.append(Publish(frame.channel, body, message_id, frame.id, place, now))
        awaited = self._awaited
        awaited[message_id] = (now, frame.channel)
        if len(awaited) > MAX_AWAITED_ANSWERS:
            del awaited[next(iter(awaited))]

    def receive_binary(self, now: float, wall: float) -> None:
        if self.state is not State.OPEN:
            return
        self._seen(now, wall)
        if self._take(now):
            self._error(None, ErrorCode.INVALID_ENVELOPE, "binary frames are not accepted")
        else:
            self._limited(b"")

    def receive_ping(self, data: bytes, now: float, wall: float) -> None:
        """A protocol ping: ponged within the budget; past it, counted toward 4429."""
        if self.state is not State.OPEN:
            return
        self._seen(now, wall)
        if not self._take(now):
            self._limited(None)
            return
        self._push((FrameKind.PONG, data, len(data), None, None))

    def receive_pong(self, now: float, wall: float) -> None:
        """A protocol pong: liveness, free within the pong allowance like the app pong."""
        if self.state is not State.OPEN:
            return
        self._seen(now, wall)
        if not self._take(now):
            self._limited(None)
            return
        self._pong(now)

    # -- events from the gateway ------------------------------------------------------------------

    def heartbeat(self, ping_text: str) -> None:
        """Time for the app ping and a protocol ping (the gateway's heartbeat)."""
        if self.state is State.OPEN:
            self._send(ping_text, len(ping_text))
        if self.state is State.OPEN:
            self._push(_PING)

    def tick(self, now: float, wall: float) -> None:
        """The periodic checks: silence past ``max_idle_seconds`` (1008 "idle", evicted) and
        the session's end (4401 "session expired")."""
        if self.state is not State.OPEN:
            return
        if now - self.last_seen > self.limits.max_idle_seconds:
            self.decide_close(CloseCode.POLICY_VIOLATION, "idle", evicted=True)
        elif self.expires_at <= wall:
            self.session_expired()

    def publish_done(self, publish: Publish, result: PublishResult) -> None:
        """The publisher's outcome for a message this connection accepted."""
        if result == PublishResult.PUBLISHED or result == PublishResult.QUEUED:
            status = "published" if result == PublishResult.PUBLISHED else "queued"
            self.stats.acks[status] += 1
            self._fill(publish.place, ack_frame(publish.client_id, publish.message_id, status))
        else:
            self.publish_refused(publish, "the message could not be taken; retry later")

    def publish_refused(self, publish: Publish, why: str) -> None:
        """The publisher did not take the message (full, draining, Redis refused it)."""
        self.stats.error(ErrorCode.UNAVAILABLE)
        self._fill(publish.place, error_frame(publish.client_id, ErrorCode.UNAVAILABLE, why))

    def deliver(self, text: str, size: int, timing: Timing | None = None) -> bool:
        """A frame for the client from an agent (its connection, its user or a broadcast);
        ``timing`` is (when it arrived, its kind). Never waits: queued, or the connection
        closes 1013 on overflow. True when queued."""
        if self.state is not State.OPEN:
            return False
        reply = None
        if self._awaited:
            start = text.find(_IN_REPLY_TO)
            if start >= 0:
                start += len(_IN_REPLY_TO)
                reply = self._awaited.pop(text[start : text.find('"', start)], None)
        return self._send(text, size, timing, reply)

    def close_command(self, code: int, reason: str) -> None:
        """A close asked through the control channel (the API, the eviction worker)."""
        if not is_close_command_code(code):
            code = CloseCode.NORMAL
        self.decide_close(code, reason, evicted=code == CloseCode.POLICY_VIOLATION)

    def session_revoked(self) -> None:
        self.decide_close(CloseCode.SESSION_INVALID, "session revoked")

    def session_expired(self) -> None:
        self.decide_close(CloseCode.SESSION_INVALID, "session expired")

    def session_lost(self) -> None:
        """The session and the connection's record are both gone: Redis lost its data. The
        session cannot be trusted again (a revocation may have been lost with it): sign in."""
        self.decide_close(CloseCode.SESSION_INVALID, "session lost")

    def stale(self) -> None:
        """The registry record is gone while the session lives (this gateway was taken for dead
        while it stalled): deliveries would answer 410, so the client must reconnect."""
        self.decide_close(CloseCode.POLICY_VIOLATION, "stale", evicted=True)

    def going_away(self, reason: str = "server shutting down") -> None:
        self.decide_close(CloseCode.GOING_AWAY, reason)

    def internal_error(self) -> None:
        self.decide_close(CloseCode.INTERNAL_ERROR, "internal error")

    def socket_error(self, code: int | None) -> None:
        """aiohttp closed the socket itself (1009 for an oversized frame): no Close to send."""
        if self.close is None:
            code = code or CloseCode.INTERNAL_ERROR
            reason = "frame too large" if code == CloseCode.MESSAGE_TOO_BIG else "error"
            self.close = CloseDecision(code, reason, evicted=False, flush=False, send=False)
        self._drop_all()
        self.state = State.CLOSED

    def socket_ended(self) -> None:
        """The socket is gone (the client left, or the close finished): nothing more is
        written, and answers still owed are dropped."""
        self._drop_all()
        self.state = State.CLOSED

    def decide_close(
        self, code: int, reason: str, *, evicted: bool = False, flush: bool = True
    ) -> bool:
        """Decide to close with ``code``; the first decision wins. True when this one did.

        With ``flush``, what is queued or held behind owed acks (accepted before the decision)
        is still written, and the owed acks with it; nothing new is accepted."""
        if self.state is not State.OPEN:
            return False
        self.close = CloseDecision(int(code), reason, evicted=evicted, flush=flush)
        self.state = State.CLOSING
        if not flush:
            self._drop_all()
        return True

    # -- internals ------------------------------------------------------------------------------

    def _seen(self, now: float, wall: float) -> None:
        self.last_seen = now
        self.last_seen_wall = wall

    def _take(self, now: float) -> bool:
        if self.bucket.take(now):
            self.limited_in_a_row = 0
            return True
        return False

    def _pong(self, now: float) -> None:
        # Within the pong allowance a pong is free (the token goes back); past it, it costs a
        # message token like any frame, so pongs cannot buy unbounded parsing.
        self.stats.pongs += 1
        if self.pong_bucket.take(now):
            self.bucket.give_back()

    def _limited(self, data: str | bytes | None) -> None:
        """A frame over the rate limit: answered ``rate_limited`` (a text frame that is not a
        pong, a binary frame; ``data`` None: a protocol ping or pong, never answered), or the
        socket closed with 4429 once too many came in a row. Only a text frame of at most
        ``RATE_LIMITED_PARSE_BYTES`` is parsed to echo its ``id``: a client over its limit must
        not make the gateway parse 64 KiB frames."""
        self.limited_in_a_row += 1
        if self.limited_in_a_row >= self.limits.rate_limit_close_after:
            self.decide_close(CloseCode.RATE_LIMITED, CLOSE_REASON_RATE_LIMITED)
            return
        if data is None:
            return  # a protocol ping or pong: no error frame for a control frame
        is_pong, client_id = (
            peek_rate_limited_frame(data, RATE_LIMITED_PARSE_BYTES) if data else (False, None)
        )
        if not is_pong:
            self._error(client_id, ErrorCode.RATE_LIMITED, "too many messages; slow down")

    def _error(self, client_id: Any, code: ErrorCode, message: str) -> None:
        self.stats.error(code)
        text = error_frame(client_id, code, message)
        if self._answers:
            self._hold(text, len(text))
        else:
            self._push((FrameKind.TEXT, text, len(text), None, None))

    def _fill(self, place: Answer, text: str) -> None:
        if self.state is State.CLOSED or (self.close is not None and not self.close.flush):
            return
        place.text = text
        place.size = len(text)
        self._answers_bytes += place.size
        answers = self._answers
        while answers and answers[0].text is not None:
            done = answers.popleft()
            self._answers_bytes -= done.size
            if done.text is not None and not self._push(
                (FrameKind.TEXT, done.text, done.size, done.timing, done.reply)
            ):
                return

    def _send(
        self, text: str, size: int, timing: Timing | None = None, reply: Timing | None = None
    ) -> bool:
        if self._answers:
            return self._hold(text, size, timing, reply)
        return self._push((FrameKind.TEXT, text, size, timing, reply))

    def _hold(
        self, text: str, size: int, timing: Timing | None = None, reply: Timing | None = None
    ) -> bool:
        """Queue ``text`` behind the pending answers, within the same budget as the queue."""
        if (
            len(self._answers) + len(self._out) >= self.limits.queue_frames
            or self._out_bytes + self._answers_bytes + size > self.limits.queue_bytes
        ):
            self._overflow()
            return False
        self._answers.append(Answer(text, size, timing, reply))
        self._answers_bytes += size
        return True

    def _push(self, frame: _Frame) -> bool:
        if self.state is State.CLOSED:
            return False
        size = frame[2]
        if len(self._out) >= self.limits.queue_frames or self._out_bytes + size > (
            self.limits.queue_bytes
        ):
            self._overflow()
            return False
        self._out.append(frame)
        self._out_bytes += size
        return True

    def _overflow(self) -> None:
        """The client reads too slowly: drop what is queued and close 1013 at once. A close
        already decided that was flushing stops flushing (the queue is gone)."""
        self._drop_all()
        if self.state is State.OPEN:
            self.decide_close(CloseCode.TRY_AGAIN_LATER, "too slow", flush=False)
        elif self.close is not None and self.close.flush:
            self.close = CloseDecision(
                self.close.code, self.close.reason, self.close.evicted, flush=False
            )

    def _drop_all(self) -> None:
        self._out.clear()
        self._out_bytes = 0
        self._answers.clear()
        self._answers_bytes = 0
