"""The gateway's pure parts, without sockets: origin policy, token bucket, backoff, settings."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import pytest
from aiohttp import web

from services.gateway.connection import Connection, ConnectionTable
from services.gateway.connection_protocol import (
    Answer,
    ConnectionProtocol,
    FrameKind,
    Limits,
    Publish,
    TokenBucket,
)
from services.gateway.origins import OriginPolicy
from services.gateway.process import RefusedTokens
from services.gateway.settings import PREFIX, GatewaySettings
from shared.backoff import backoff
from shared.protocol import ErrorCode
from shared.pubsub import Hub
from shared.settings import SettingsError, load
from tests.helpers import ROOT, timeout, wait_for


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "gw:8100", True),  # not a browser
        ("http://gw:8100", "gw:8100", True),  # same origin
        ("https://gw", "gw:443", True),
        ("http://localhost:5173", "gw:8100", True),
        ("http://127.0.0.1:1", "gw:8100", True),
        ("http://[::1]:8080", "gw:8100", True),
        ("https://evil.example", "gw:8100", False),
        ("http://localhost.evil.example", "gw:8100", False),
        ("null", "gw:8100", False),
        ("file://", "gw:8100", False),
        ("garbage", "gw:8100", False),
    ],
)
def test_default_origin_policy(origin, host, allowed):
    assert OriginPolicy(()).allows(origin, host) is allowed


def test_configured_origins_replace_the_localhost_default():
    policy = OriginPolicy(("https://app.example.com",), public_ws_url="wss://edge.example.com/ws")
    assert policy.allows("https://app.example.com", "gw:8100")
    assert policy.allows("https://APP.example.com:443", "gw:8100")
    assert policy.allows("https://edge.example.com", "gw:8100")
    assert policy.allows("http://gw:8100", "gw:8100")  # same origin is always fine
    assert not policy.allows("http://localhost:3000", "gw:8100")
    assert not policy.allows("http://app.example.com", "gw:8100")  # scheme matters
    assert OriginPolicy(("*",)).allows("https://anything.example", "gw:8100")
    # Any page can make itself a null origin (a sandboxed iframe): "*" does not admit it.
    assert not OriginPolicy(("*",)).allows("null", "gw:8100")


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=10, burst=3, now=1000.0)
    start = bucket.stamp
    assert [bucket.take(start) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(start + 0.1)  # one token back after 1/rate seconds
    assert not bucket.take(start + 0.1)


def test_backoff_is_capped_and_jittered():
    values = [backoff(n, 0.1, 2.0) for n in range(1, 40)]
    assert all(0 < v <= 2.0 for v in values)
    assert max(values) > 1.0  # reaches the cap region
    assert backoff(1, 0.1, 2.0) <= 0.2


def test_settings_validate_and_report_unknown_variables():
    assert load(GatewaySettings, PREFIX, {}).port == 8100
    with pytest.raises(SettingsError, match="GATEWAY_MAX_FRAME_BYTE"):
        load(GatewaySettings, PREFIX, {"GATEWAY_MAX_FRAME_BYTE": "1"})
    with pytest.raises(SettingsError, match="GATEWAY_RATE_LIMIT_BURST"):
        load(GatewaySettings, PREFIX, {"GATEWAY_RATE_LIMIT_BURST": "0"})
    with pytest.raises(SettingsError, match="RECORD_TTL"):
        load(
            GatewaySettings,
            PREFIX,
            {"GATEWAY_RECORD_TTL_SECONDS": "1", "GATEWAY_LIVENESS_FLUSH_SECONDS": "5"},
        )
    assert "'***'" in repr(load(GatewaySettings, PREFIX, {}))


def test_help_lists_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "services.gateway", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for field in GatewaySettings.__dataclass_fields__:
        assert PREFIX + field.upper() in out, field


def test_token_bucket_give_back_never_passes_the_burst():
    bucket = TokenBucket(rate=0.001, burst=2, now=1000.0)
    now = bucket.stamp
    assert bucket.take(now) and bucket.take(now) and not bucket.take(now)
    bucket.give_back()
    assert bucket.take(now) and not bucket.take(now)
    for _ in range(5):
        bucket.give_back()
    assert bucket.tokens == 2


def test_refused_tokens_expire_and_stay_bounded():
    cache = RefusedTokens(ttl=5, size=2)
    cache.add("a", now=100)
    assert cache.refused("a", now=104.9)
    assert not cache.refused("a", now=105)  # expired, and forgotten
    assert len(cache) == 0
    for token in ("a", "b", "c"):
        cache.add(token, now=200)
    assert len(cache) == 2
    assert not cache.refused("a", now=200)  # the oldest went first
    assert cache.refused("c", now=200)
    assert all(len(key) == 32 for key in cache._until)  # sha256 digests, never the token
    off = RefusedTokens(ttl=0, size=2)
    off.add("a", now=1)
    assert not off.refused("a", now=1)


def _proto(**overrides: Any) -> ConnectionProtocol:
    limits: dict[str, Any] = {
        "queue_frames": 8,
        "queue_bytes": 1000,
        "rate_per_second": 1,
        "rate_burst": 1,
        "rate_limit_close_after": 20,
        "pong_rate_per_second": 1,
        "pong_burst": 1,
        "max_idle_seconds": 60,
        **overrides,
    }
    return ConnectionProtocol(
        "ws_u_00000000",
        "u",
        "s",
        instance="gw",
        channels=frozenset({"guide"}),
        limits=Limits(**limits),
        now=0.0,
        wall=0.0,
    )


def _queued(proto: ConnectionProtocol) -> list[str]:
    return [data for kind, data, *_ in proto._out if kind is FrameKind.TEXT]  # type: ignore[misc]


def _reserve(proto: ConnectionProtocol) -> tuple[Answer, Publish]:
    """An accepted message whose ack is still pending (what receive_text reserves)."""
    place = Answer()
    proto._answers.append(place)
    return place, Publish("guide", b"{}", "m", None, place)


def _answer(proto: ConnectionProtocol, place: Answer, text: str) -> None:
    proto._fill(place, text)


async def test_answers_leave_in_the_order_their_messages_came():
    conn = _proto()
    first, _ = _reserve(conn)
    conn._error(2, ErrorCode.INVALID_JSON, "e")  # known at once, but behind the pending ack
    third, _ = _reserve(conn)
    conn._error(4, ErrorCode.INVALID_JSON, "e")
    assert _queued(conn) == []
    _answer(conn, third, "ack-3")
    assert _queued(conn) == []  # the first answer is still unknown
    _answer(conn, first, "ack-1")
    assert [orjson.loads(t).get("id", t) if t.startswith("{") else t for t in _queued(conn)] == [
        "ack-1",
        2,
        "ack-3",
        4,
    ]
    conn._error(5, ErrorCode.INVALID_JSON, "e")  # nothing pending: straight out
    assert orjson.loads(_queued(conn)[-1])["id"] == 5


async def test_a_delivery_never_overtakes_a_pending_ack():
    # The agent's reply can reach the gateway before the publisher's round trip returns; the
    # client must see the ack (which names the message id) before any reply to it.
    conn = _proto(queue_frames=4, queue_bytes=1000)
    place, _ = _reserve(conn)
    reply = '{"type":"response","in_reply_to":"m1"}'
    assert conn.deliver(reply, len(reply))
    assert _queued(conn) == []
    _answer(conn, place, '{"type":"ack","message_id":"m1"}')
    assert _queued(conn) == [
        '{"type":"ack","message_id":"m1"}',
        '{"type":"response","in_reply_to":"m1"}',
    ]
    assert conn.deliver("after", 5)  # nothing pending: straight out
    assert _queued(conn)[-1] == "after"

    # What waits counts against the byte budget.
    conn = _proto(queue_frames=8, queue_bytes=100)
    _reserve(conn)
    assert conn.deliver("x" * 60, 60)
    assert not conn.deliver("y" * 60, 60)
    assert conn.close is not None
    assert (conn.close.code, conn.close.reason) == (1013, "too slow")


async def test_the_send_queue_is_bounded_in_frames_and_bytes():
    conn = _proto(queue_frames=3, queue_bytes=100)
    assert conn.deliver("x" * 40, 40) and conn.deliver("y" * 40, 40)
    assert conn.queued_bytes == 80
    assert not conn.deliver("z" * 30, 30)  # 110 bytes: over the byte budget
    assert conn.close is not None
    assert (conn.close.code, conn.close.reason) == (1013, "too slow")
    assert conn.queued_frames == 0 and conn.queued_bytes == 0  # dropped, not written

    conn = _proto(queue_frames=2, queue_bytes=100)
    assert conn.deliver("a", 1) and conn.deliver("b", 1)
    assert not conn.deliver("c", 1)
    assert conn.close is not None and conn.close.code == 1013


class _Sink:
    def submit(self, connection: Connection, publish: Publish) -> str | None:
        return None


def _conn(cid: str, session_id: str) -> Connection:
    proto = ConnectionProtocol(
        cid,
        "u",
        session_id,
        instance="gw",
        channels=frozenset({"guide"}),
        limits=_proto().limits,
        now=0.0,
        wall=0.0,
    )
    return Connection(
        cast(web.WebSocketResponse, None), proto, _Sink(), close_timeout=1, flush_timeout=1
    )


def test_the_connection_table_indexes_sessions_and_channels():
    table = ConnectionTable()
    a, b = _conn("ws_u_00000000", "s"), _conn("ws_u_11111111", "s2")
    table.add(a)
    table.add(b)
    a.protocol.bucket = TokenBucket(100, 100, 0.0)
    message = '{"channel": "guide", "payload": {"message": "hi"}}'
    for _ in range(2):
        known = len(a.protocol.channels)
        a.protocol.receive_text(message, 1.0, 1.0)
        table.index_channels(a, a.protocol.channels[known:])
    assert table.using("guide") == [a]
    assert a.protocol.new_channels == ["guide"]
    assert sorted(table.session_ids()) == ["s", "s2"]
    assert table.count_of_session("s") == 1
    table.remove(a)
    assert table.using("guide") == [] and table.of_session("s") == []
    assert table.session_ids() == ["s2"]


def test_the_new_limits_have_their_documented_defaults():
    s = load(GatewaySettings, PREFIX, {})
    assert s.send_queue_bytes == 4 * 1024 * 1024
    assert s.close_flush_seconds == 1.0
    assert s.max_connections == 10000
    assert s.max_connections_per_session == 16
    assert s.session_check_seconds == 30.0


async def test_a_channel_dropped_while_the_hub_resubscribes_is_not_left_behind(redis_url, redis):
    hub = Hub(redis_url, name="test-hub", backoff_base=0.01, backoff_cap=0.05)
    resubscribed = asyncio.Event()
    hub.on_resubscribed(resubscribed.set)
    hub.watch("keep", lambda data: None)
    hub.watch("drop", lambda data: None)
    reader = asyncio.create_task(hub.run())
    try:
        await asyncio.sleep(0)  # the reader took its list of channels and is connecting
        await hub.unsubscribe("drop")  # nothing to send it to yet
        await asyncio.wait_for(resubscribed.wait(), timeout(5))

        async def channels() -> set[bytes]:
            return set(await redis.pubsub_channels())

        await wait_for(lambda: _only_keep(channels), 5, what="only 'keep' subscribed")
    finally:
        reader.cancel()
        await asyncio.wait([reader])
        await hub.aclose()


async def _only_keep(channels: Callable[[], Awaitable[set[bytes]]]) -> bool:
    return await channels() == {b"keep"}


@pytest.mark.parametrize(
    "origin",
    [
        "http://xn--ocalhost-5o0d",  # does not round-trip IDNA: once a 500 with a traceback
        "http://evil.com@localhost",  # user information: no browser sends it
        "http://localhost/",  # a path, even "/"
        "http://localhost/chat",
        "http://localhost?x=1",
        "http://localhost#top",
        "http://local host",
        "http://localhost\\@evil.com",
    ],
)
def test_origins_no_browser_sends_are_refused_even_with_a_wildcard(origin):
    for policy in (OriginPolicy(()), OriginPolicy(("*",)), OriginPolicy(("http://localhost",))):
        assert policy.allows(origin, "localhost") is False
