"""The connection protocol without sockets or an event loop: examples and properties.

The properties run random event sequences (hypothesis) through one ConnectionProtocol and check
the invariants the gateway promises, written out here:

1. Every client frame that gets an answer gets exactly one (an ack or an error), and answers
   leave in the order the frames came in: the answers written are always a prefix of the
   answers owed, in order, with no repeat.
2. No delivery reaches the client before the answer of any message accepted before it.
3. After the close decision nothing new is emitted: no answer to a frame that came after it,
   no delivery, ping or pong that came after it.
4. Limits hold for any sequence: the send queue never passes its frame and byte bounds; a
   client without free pongs is never given more than ``burst + rate * elapsed`` accepted
   frames; ``rate_limit_close_after`` rate-limited frames in a row close with 4429; a queue
   overflow closes 1013 "too slow" and drops what was queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.connection_protocol import (
    ConnectionProtocol,
    FrameKind,
    Limits,
    Publish,
    State,
)
from shared.registry import PublishResult


def _limits(**overrides: Any) -> Limits:
    values: dict[str, Any] = {
        "queue_frames": 6,
        "queue_bytes": 600,
        "rate_per_second": 5.0,
        "rate_burst": 4,
        "rate_limit_close_after": 5,
        "pong_rate_per_second": 1.0,
        "pong_burst": 2,
        "max_idle_seconds": 30.0,
        **overrides,
    }
    return Limits(**values)


def _proto(**overrides: Any) -> ConnectionProtocol:
    return ConnectionProtocol(
        "ws_u_00000000",
        "u",
        "s",
        instance="gw-1",
        channels=frozenset({"guide"}),
        limits=_limits(**overrides),
        now=100.0,
        wall=1000.0,
    )


def _message(client_id: int) -> str:
    return orjson.dumps(
        {"id": client_id, "channel": "guide", "payload": {"message": "hi"}}
    ).decode()


def _drain(proto: ConnectionProtocol) -> list[tuple[FrameKind, Any]]:
    out = []
    while (frame := proto.next_frame()) is not None:
        out.append(frame[:2])
    return out


# -- examples ------------------------------------------------------------------------------------


def test_a_message_is_published_then_acked_with_its_id():
    proto = _proto()
    proto.receive_text(_message(7), 100.0, 1000.0)
    [publish] = proto.take_publishes()
    agent = orjson.loads(publish.data)
    assert agent["connection_id"] == "ws_u_00000000" and agent["message"]["id"] == 7
    assert agent["message_id"] == publish.message_id
    assert _drain(proto) == []  # the ack waits for the publisher
    proto.publish_done(publish, PublishResult.PUBLISHED)
    [(kind, text)] = _drain(proto)
    assert kind is FrameKind.TEXT
    assert orjson.loads(text) == {
        "type": "ack",
        "id": 7,
        "message_id": publish.message_id,
        "status": "published",
    }


def test_errors_echo_the_id_and_wait_behind_pending_acks():
    proto = _proto()
    proto.receive_text(_message(1), 100.0, 1000.0)
    proto.receive_text('{"id": 2, "channel": "nope", "payload": {"message": "x"}}', 100.0, 1000.0)
    proto.receive_text("not json", 100.0, 1000.0)
    assert _drain(proto) == []
    [publish] = proto.take_publishes()
    proto.publish_done(publish, PublishResult.QUEUED)
    frames = [orjson.loads(text) for _, text in _drain(proto)]
    assert [(f["type"], f["id"]) for f in frames] == [("ack", 1), ("error", 2), ("error", None)]
    assert frames[0]["status"] == "queued"
    assert [f.get("code") for f in frames[1:]] == ["unknown_channel", "invalid_json"]


def test_pongs_are_never_answered_and_free_within_their_allowance():
    proto = _proto(rate_burst=1, rate_per_second=0.001, pong_burst=3)
    for _ in range(3):
        proto.receive_text('{"type": "pong", "anything": [1, 2]}', 100.0, 1000.0)
    assert _drain(proto) == [] and proto.close is None
    # The allowance spent, a pong costs the last message token; then frames are limited.
    proto.receive_pong(100.0, 1000.0)
    proto.receive_text(_message(1), 100.0, 1000.0)
    [(_, text)] = _drain(proto)
    assert orjson.loads(text)["code"] == "rate_limited"


def test_protocol_pings_take_tokens_and_a_flood_closes_4429():
    proto = _proto(rate_burst=3, rate_per_second=0.001, rate_limit_close_after=4)
    for _ in range(3):
        proto.receive_ping(b"p", 100.0, 1000.0)
    assert [kind for kind, _ in _drain(proto)] == [FrameKind.PONG] * 3
    for _ in range(4):  # over the budget: not ponged, counted toward 4429
        proto.receive_ping(b"p", 100.0, 1000.0)
    assert proto.close is not None
    assert (proto.close.code, proto.close.reason) == (4429, "rate limit exceeded")
    assert _drain(proto) == []


def test_idle_and_expiry_are_decided_by_the_tick():
    proto = _proto(max_idle_seconds=10)
    proto.tick(109.0, 1009.0)
    assert proto.state is State.OPEN
    proto.tick(110.5, 1010.5)
    assert proto.close is not None and (proto.close.code, proto.close.reason) == (1008, "idle")
    assert proto.close.evicted

    proto = ConnectionProtocol(
        "ws_u_00000001",
        "u",
        "s",
        instance="gw-1",
        channels=frozenset({"guide"}),
        limits=_limits(),
        now=100.0,
        wall=1000.0,
        expires_at=1005.0,
    )
    proto.tick(101.0, 1005.0)
    assert proto.close is not None and (proto.close.code, proto.close.reason) == (
        4401,
        "session expired",
    )


def test_a_close_command_is_limited_to_codes_a_client_may_be_told():
    proto = _proto()
    proto.close_command(1005, "no")  # reserved: never sent on the wire
    assert proto.close is not None and proto.close.code == 1000
    proto = _proto()
    proto.close_command(1008, "idle")
    assert proto.close is not None and proto.close.code == 1008 and proto.close.evicted


def test_a_flushing_close_still_writes_the_owed_acks_and_nothing_new():
    proto = _proto()
    proto.receive_text(_message(1), 100.0, 1000.0)
    [publish] = proto.take_publishes()
    proto.going_away()
    proto.receive_text(_message(2), 100.0, 1000.0)  # after the decision: not taken
    assert proto.take_publishes() == []
    assert not proto.deliver("late", 4)
    proto.publish_done(publish, PublishResult.PUBLISHED)
    [(_, text)] = _drain(proto)
    assert orjson.loads(text)["id"] == 1
    proto.socket_ended()
    assert proto.state is State.CLOSED and proto.flushed


def test_an_oversized_frame_closed_by_the_socket_layer_sends_no_close():
    proto = _proto()
    proto.socket_error(1009)
    assert proto.close is not None and proto.close.code == 1009 and not proto.close.send


# -- properties ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the driver knows while it feeds random events to one protocol."""

    proto: ConnectionProtocol
    now: float = 100.0
    next_id: int = 0
    owed: list[Any] = field(default_factory=list)  # answers owed, in client order (id or None)
    written: list[Any] = field(default_factory=list)  # answers written, in order
    pending: list[Publish] = field(default_factory=list)
    deliveries: int = 0
    # delivery number -> answers owed (count) when it was accepted: they must come first
    owed_before: dict[int, int] = field(default_factory=dict)
    decided_at_owed: int | None = None  # len(owed) at the close decision
    deliveries_at_decision: int | None = None
    pings_at_decision: int | None = None
    heartbeats: int = 0
    pongs_written: int = 0
    pings_received: int = 0
    pings_at_decision_recv: int | None = None

    def note_decision(self) -> None:
        if self.proto.close is not None and self.decided_at_owed is None:
            self.decided_at_owed = len(self.owed)
            self.deliveries_at_decision = self.deliveries
            self.pings_at_decision = self.heartbeats
            self.pings_at_decision_recv = self.pings_received

    def check_limits(self) -> None:
        limits = self.proto.limits
        assert self.proto.queued_frames <= limits.queue_frames
        assert self.proto.queued_bytes <= limits.queue_bytes

    def write(self, count: int) -> None:
        for _ in range(count):
            frame = self.proto.next_frame()
            if frame is None:
                return
            kind, data, _, _ = frame
            if kind is FrameKind.PONG:
                self.pongs_written += 1
                assert self.pings_at_decision_recv is None or (
                    self.pongs_written <= self.pings_at_decision_recv
                )
                continue
            if kind is FrameKind.PING:
                continue
            body = orjson.loads(data)
            if body["type"] in ("ack", "error"):
                self.written.append(body["id"])
                # 1. exactly once, in order: what is written is a prefix of what is owed
                assert self.written == self.owed[: len(self.written)]
            elif body["type"] == "delivery":
                n = body["n"]
                # 2. every answer owed before the delivery came first
                assert len(self.written) >= self.owed_before[n]
                # 3. no delivery accepted after the decision
                assert self.deliveries_at_decision is None or n < self.deliveries_at_decision
            elif body["type"] == "ping":
                assert self.pings_at_decision is None or body["n"] < self.pings_at_decision
        # 3. no answer to a frame that came after the decision
        if self.decided_at_owed is not None:
            assert len(self.written) <= self.decided_at_owed


_EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("message"), st.integers(0, 0)),
        st.tuples(st.just("bad_json"), st.integers(0, 0)),
        st.tuples(st.just("bad_channel"), st.integers(0, 0)),
        st.tuples(st.just("app_pong"), st.integers(0, 0)),
        st.tuples(st.just("binary"), st.integers(0, 0)),
        st.tuples(st.just("ping"), st.integers(0, 0)),
        st.tuples(st.just("pong"), st.integers(0, 0)),
        st.tuples(st.just("deliver"), st.integers(0, 200)),
        st.tuples(st.just("heartbeat"), st.integers(0, 0)),
        st.tuples(st.just("outcome"), st.integers(0, 3)),
        st.tuples(st.just("write"), st.integers(0, 5)),
        st.tuples(st.just("time"), st.integers(0, 2000)),
        st.tuples(st.just("tick"), st.integers(0, 0)),
        st.tuples(st.just("close"), st.integers(0, 3)),
    ),
    max_size=80,
)


def _feed(run: _Run, event: str, arg: int) -> None:
    proto = run.proto
    now, wall = run.now, run.now + 900.0
    open_before = proto.state is State.OPEN
    answer_id: Any = _NONE_OWED
    if event in ("message", "bad_json", "bad_channel"):
        client_id = run.next_id
        run.next_id += 1
        text = {
            "message": _message(client_id),
            "bad_json": "{nope",
            "bad_channel": _message(client_id).replace("guide", "nah"),
        }[event]
        proto.receive_text(text, now, wall)
        run.pending.extend(proto.take_publishes())
        # An ack, an error, or rate_limited: each echoes the id when the frame parses.
        answer_id = None if event == "bad_json" else client_id
    elif event == "app_pong":
        proto.receive_text('{"type": "pong"}', now, wall)
    elif event == "binary":
        proto.receive_binary(now, wall)
        answer_id = None
    elif event == "ping":
        if open_before:
            run.pings_received += 1
        proto.receive_ping(b"x", now, wall)
    elif event == "pong":
        proto.receive_pong(now, wall)
    elif event == "deliver":
        text = orjson.dumps({"type": "delivery", "n": run.deliveries, "pad": "p" * arg}).decode()
        run.owed_before[run.deliveries] = len(run.owed)
        proto.deliver(text, len(text))
        run.deliveries += 1
    elif event == "heartbeat":
        proto.heartbeat(orjson.dumps({"type": "ping", "n": run.heartbeats}).decode())
        run.heartbeats += 1
    elif event == "outcome" and run.pending:
        publish = run.pending.pop(0)
        if arg == 3:
            proto.publish_refused(publish, "draining")
        else:
            result = [PublishResult.PUBLISHED, PublishResult.QUEUED, PublishResult.REFUSED][arg]
            proto.publish_done(publish, result)
    elif event == "write":
        run.write(arg)
    elif event == "time":
        run.now += arg / 1000
    elif event == "tick":
        proto.tick(now, wall)
    elif event == "close":
        [proto.going_away, proto.session_revoked, proto.stale, proto.internal_error][arg]()
    # The frame that closes 4429 (one rate-limited frame too many) gets no answer.
    closed_4429_now = open_before and proto.close is not None and proto.close.code == 4429
    if answer_id is not _NONE_OWED and open_before and not closed_4429_now:
        run.owed.append(answer_id)
    run.note_decision()
    run.check_limits()


_NONE_OWED = object()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_EVENTS)
def test_any_event_sequence_keeps_the_invariants(events: list[tuple[str, int]]) -> None:
    run = _Run(_proto())
    for event, arg in events:
        _feed(run, event, arg)
    # Everything outstanding resolved and written: every owed answer comes out, unless the
    # close dropped the queue (1013) or the socket ended.
    while run.pending:
        proto = run.proto
        proto.publish_done(run.pending.pop(0), PublishResult.PUBLISHED)
        run.check_limits()
    run.write(10_000)
    proto = run.proto
    dropped = proto.close is not None and not proto.close.flush
    if not dropped:
        assert run.written == run.owed
    if proto.close is not None and proto.close.code == 1013:
        assert proto.close.reason == "too slow" and not proto.close.flush


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["text", "ping", "binary"]), st.integers(0, 400))))
def test_no_client_gets_more_than_its_rate(frames: list[tuple[str, int]]) -> None:
    limits = _limits(rate_limit_close_after=10**9, queue_frames=10**6, queue_bytes=10**9)
    proto = ConnectionProtocol(
        "ws_u_00000000",
        "u",
        "s",
        instance="gw-1",
        channels=frozenset({"guide"}),
        limits=limits,
        now=0.0,
        wall=0.0,
    )
    now = 0.0
    accepted = 0
    for kind, gap_ms in frames:
        now += gap_ms / 1000
        before = proto.limited_in_a_row
        if kind == "text":
            proto.receive_text(_message(1), now, now)
        elif kind == "ping":
            proto.receive_ping(b"", now, now)
        else:
            proto.receive_binary(now, now)
        if proto.limited_in_a_row <= before:
            accepted += 1
        assert accepted <= limits.rate_burst + limits.rate_per_second * now + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30))
def test_rate_limited_frames_in_a_row_close_4429(close_after: int) -> None:
    proto = _proto(
        rate_burst=1,
        rate_per_second=0.0001,
        rate_limit_close_after=close_after,
        queue_frames=100,
        queue_bytes=100_000,
    )
    proto.receive_text(_message(0), 100.0, 1000.0)  # the only token
    [publish] = proto.take_publishes()
    proto.publish_done(publish, PublishResult.PUBLISHED)
    for n in range(close_after):
        assert proto.close is None, n
        proto.receive_text(_message(n + 1), 100.0, 1000.0)
    assert proto.close is not None and proto.close.code == 4429
    limited = [orjson.loads(t) for k, t in _drain(proto) if k is FrameKind.TEXT]
    # Each limited frame before the last got rate_limited with its id; none after the close.
    assert [f["id"] for f in limited if f.get("code") == "rate_limited"] == list(
        range(1, close_after)
    )


def test_a_reply_is_matched_to_the_message_it_answers_for_the_answer_time():
    proto = _proto()
    proto.receive_text(_message(1), 100.0, 1000.0)
    [publish] = proto.take_publishes()
    proto.publish_done(publish, PublishResult.PUBLISHED)
    reply = orjson.dumps({"type": "response", "in_reply_to": publish.message_id}).decode()
    other = orjson.dumps({"type": "response", "in_reply_to": "msg_unknown"}).decode()
    proto.deliver(other, len(other), (101.0, "connection"))
    proto.deliver(reply, len(reply), (102.0, "connection"))
    proto.deliver(reply, len(reply), (103.0, "connection"))  # a second answer: not timed again
    frames = []
    while (frame := proto.next_frame()) is not None:
        frames.append(frame)
    _ack, unknown, first, second = frames
    assert unknown[2:] == ((101.0, "connection"), None)
    assert first[2:] == ((102.0, "connection"), (100.0, "guide"))
    assert second[3] is None


def test_the_awaited_answers_stay_bounded():
    from services.gateway.connection_protocol import MAX_AWAITED_ANSWERS

    proto = _proto(rate_burst=10_000, queue_frames=10_000, queue_bytes=10**8)
    for i in range(MAX_AWAITED_ANSWERS + 50):
        proto.receive_text(_message(i), 100.0, 1000.0)
    assert len(proto._awaited) == MAX_AWAITED_ANSWERS
