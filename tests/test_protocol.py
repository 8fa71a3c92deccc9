"""shared/protocol.py: the sans-I/O core, fed hostile input. No sockets, no Redis."""

from __future__ import annotations

import random
import re
from datetime import datetime

import orjson
import pytest

from shared.protocol import (
    DEFAULT_CHANNELS,
    MAX_CLIENT_ID_LENGTH,
    MAX_DEPTH,
    ClientEnvelope,
    CloseCode,
    ErrorCode,
    ProtocolError,
    ack_frame,
    agent_message,
    check_depth,
    decode_client_frame,
    error_frame,
    is_valid_connection_id,
    is_valid_traceparent,
    is_valid_user_id,
    iso_now,
    new_connection_id,
    new_message_id,
    new_traceparent,
    parse_client_frame,
    parse_delivery_body,
    peek_rate_limited_frame,
    ping_frame,
    welcome_frame,
)

VALID = {"channel": "guide", "intent": "chat", "payload": {"message": "hi"}, "id": "c1"}


def frame(**changes: object) -> bytes:
    body = {**VALID, **changes}
    return orjson.dumps({k: v for k, v in body.items() if v is not _DROP})


_DROP = object()


def refused(data: str | bytes, **kwargs: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(data, **kwargs)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------ accepted


def test_valid_frame_parses_and_normalises():
    env = parse_client_frame(frame())
    assert env == ClientEnvelope(channel="guide", intent="chat", payload={"message": "hi"}, id="c1")
    assert env.as_dict() == VALID


def test_channel_and_intent_default():
    env = parse_client_frame('{"payload": {"message": "hello"}}')
    assert (env.channel, env.intent, env.id) == ("guide", "chat", None)
    assert env.as_dict() == {"channel": "guide", "intent": "chat", "payload": {"message": "hello"}}


@pytest.mark.parametrize("channel", DEFAULT_CHANNELS)
@pytest.mark.parametrize("intent", ["chat", "query", "command"])
def test_every_channel_and_intent(channel, intent):
    env = parse_client_frame(frame(channel=channel, intent=intent))
    assert (env.channel, env.intent) == (channel, intent)


def test_optional_payload_fields_and_integer_ids():
    payload = {"message": "m", "conversation_id": "conv-1", "metadata": {"k": [1, 2]}}
    env = parse_client_frame(frame(payload=payload, id=42))
    assert env.payload == payload and env.id == 42
    assert parse_client_frame(frame(id=-(2**53))).id == -(2**53)
    assert parse_client_frame(frame(id=2**53)).id == 2**53
    assert parse_client_frame(frame(id=None)).id is None
    assert parse_client_frame(frame(id="x" * MAX_CLIENT_ID_LENGTH)).id == "x" * MAX_CLIENT_ID_LENGTH


def test_str_and_bytes_are_both_accepted():
    text = frame().decode()
    assert parse_client_frame(text) == parse_client_frame(text.encode())


def test_allowed_channels_are_configurable():
    assert (
        parse_client_frame(frame(channel="custom"), allowed_channels=("custom",)).channel
        == "custom"
    )
    assert refused(frame(), allowed_channels=("custom",)).code is ErrorCode.UNKNOWN_CHANNEL


# ------------------------------------------------------------------ refused


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"not json",
        b"{",
        b'{"channel": "guide",}',
        b"{'single': 1}",
        b"NaN",
        b'{"a": 1}{"b": 2}',
        b"\x00",
        "\ud800",
        b'{"payload": {"message": "\xff"}}',
        b"\xc3\x28",
        b"\xef\xbb\xbf{}",
    ],
)
def test_not_json(data):
    err = refused(data)
    assert err.code is ErrorCode.INVALID_JSON
    assert err.message.startswith("not valid JSON")
    assert err.client_id is None


@pytest.mark.parametrize("data", [b"[]", b"[1, 2]", b'"text"', b"42", b"3.5", b"null", b"true"])
def test_not_an_object(data):
    err = refused(data)
    assert err.code is ErrorCode.INVALID_ENVELOPE
    assert "JSON object" in err.message


@pytest.mark.parametrize(
    ("changes", "code", "fragment"),
    [
        ({"channel": 1}, ErrorCode.INVALID_ENVELOPE, "channel must be a string"),
        ({"channel": None}, ErrorCode.INVALID_ENVELOPE, "channel must be a string"),
        ({"channel": ["guide"]}, ErrorCode.INVALID_ENVELOPE, "channel must be a string"),
        ({"channel": "nope"}, ErrorCode.UNKNOWN_CHANNEL, "unknown channel 'nope'"),
        ({"channel": "Guide"}, ErrorCode.UNKNOWN_CHANNEL, "unknown channel"),
        ({"channel": ""}, ErrorCode.UNKNOWN_CHANNEL, "unknown channel"),
        ({"intent": 3}, ErrorCode.INVALID_ENVELOPE, "intent must be a string"),
        ({"intent": {"x": 1}}, ErrorCode.INVALID_ENVELOPE, "intent must be a string"),
        ({"intent": "shout"}, ErrorCode.UNKNOWN_INTENT, "unknown intent 'shout'"),
        ({"payload": _DROP}, ErrorCode.INVALID_ENVELOPE, "payload must be a JSON object"),
        ({"payload": "hi"}, ErrorCode.INVALID_ENVELOPE, "payload must be a JSON object"),
        ({"payload": ["hi"]}, ErrorCode.INVALID_ENVELOPE, "payload must be a JSON object"),
        ({"payload": None}, ErrorCode.INVALID_ENVELOPE, "payload must be a JSON object"),
        ({"payload": {}}, ErrorCode.INVALID_ENVELOPE, "payload.message must be a string"),
        ({"payload": {"message": 1}}, ErrorCode.INVALID_ENVELOPE, "payload.message"),
        ({"payload": {"message": None}}, ErrorCode.INVALID_ENVELOPE, "payload.message"),
        (
            {"payload": {"message": "m", "conversation_id": 5}},
            ErrorCode.INVALID_ENVELOPE,
            "payload.conversation_id must be a string",
        ),
        (
            {"payload": {"message": "m", "metadata": []}},
            ErrorCode.INVALID_ENVELOPE,
            "payload.metadata must be an object",
        ),
        (
            {"payload": {"message": "m", "metadata": "x"}},
            ErrorCode.INVALID_ENVELOPE,
            "payload.metadata must be an object",
        ),
        ({"type": "pong"}, ErrorCode.INVALID_ENVELOPE, "unknown field(s): type"),
        ({"zeta": 1, "alpha": 2}, ErrorCode.INVALID_ENVELOPE, "unknown field(s): alpha, zeta"),
    ],
)
def test_wrong_fields_are_refused_and_the_id_is_echoed(changes, code, fragment):
    err = refused(frame(**changes))
    assert err.code is code
    assert fragment in err.message
    assert err.client_id == "c1"


def test_long_unknown_channel_and_field_names_are_truncated_in_messages():
    err = refused(frame(channel="c" * 10_000))
    assert err.code is ErrorCode.UNKNOWN_CHANNEL and len(err.message) < 200
    err = refused(frame(**{"f" * 5000: 1}))
    assert err.code is ErrorCode.INVALID_ENVELOPE and len(err.message) < 300


@pytest.mark.parametrize(
    ("bad_id", "fragment"),
    [
        (True, "id must be a string or an integer"),
        (1.5, "id must be a string or an integer"),
        ([1], "id must be a string or an integer"),
        ({"a": 1}, "id must be a string or an integer"),
        (2**53 + 1, "safe integer range"),
        (-(2**53) - 1, "safe integer range"),
        ("x" * (MAX_CLIENT_ID_LENGTH + 1), f"longer than {MAX_CLIENT_ID_LENGTH}"),
    ],
)
def test_bad_ids_are_refused_and_not_echoed(bad_id, fragment):
    err = refused(frame(id=bad_id))
    assert err.code is ErrorCode.INVALID_ENVELOPE
    assert fragment in err.message
    assert err.client_id is None  # an id that is itself invalid is never echoed back


def test_huge_numbers():
    # Beyond 64 bits orjson gives a float (an id that is refused) or refuses the document.
    for raw in (b"99999999999999999999", b"18446744073709551615", b"1e400", b"-1e400", b"1e20"):
        data = b'{"id": ' + raw + b', "payload": {"message": "m"}}'
        err = refused(data)
        assert err.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_ENVELOPE)
    # Huge numbers inside the payload are the agent's business, as long as they parse.
    env = parse_client_frame(b'{"payload": {"message": "m", "metadata": {"n": 1e300}}}')
    assert env.payload["metadata"]["n"] == 1e300


def test_oversize_frame_is_too_large_before_parsing():
    data = frame(payload={"message": "x" * 200})
    err = refused(data, max_bytes=len(data) - 1)
    assert err.code is ErrorCode.TOO_LARGE
    assert f"{len(data)} bytes" in err.message and str(len(data) - 1) in err.message
    assert parse_client_frame(data, max_bytes=len(data)).payload["message"] == "x" * 200
    # Not JSON at all, but too large: the size check comes first and is cheap.
    assert refused(b"[" * 100_000, max_bytes=65536).code is ErrorCode.TOO_LARGE


def test_size_counts_utf8_bytes_not_characters():
    text = orjson.dumps({"payload": {"message": "é" * 60}}).decode()
    assert len(text) < 100 < len(text.encode())
    assert refused(text, max_bytes=100).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_nesting_never_raises_recursion_error(opener):
    data = (opener * 10_000).encode()
    err = refused(data, max_bytes=10**6)
    assert err.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_ENVELOPE)


def test_nesting_past_the_depth_limit_is_an_invalid_envelope():
    deep: object = "leaf"
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    err = refused(frame(payload={"message": "m", "metadata": {"d": deep}}))
    assert err.code is ErrorCode.INVALID_ENVELOPE
    assert f"deeper than {MAX_DEPTH}" in err.message
    assert err.client_id == "c1"
    # Within orjson's own limit but far past ours: still a clean refusal.
    very_deep = (
        b'{"payload": {"message": "m", "metadata": {"d": ' + b"[" * 1000 + b"]" * 1000 + b"}}}"
    )
    assert refused(very_deep, max_bytes=10**6).code is ErrorCode.INVALID_ENVELOPE


def test_check_depth():
    assert check_depth({}) and check_depth([]) and check_depth("x") and check_depth(None)
    nested: object = {}
    for _ in range(MAX_DEPTH - 1):
        nested = {"k": nested}
    assert check_depth(nested)
    assert not check_depth([nested])
    assert check_depth([[[]]], limit=3) and not check_depth([[[[]]]], limit=3)
    # Iterative: a depth far past the interpreter's recursion limit is answered, not crashed.
    huge: list[object] = []
    cur = huge
    for _ in range(100_000):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    assert not check_depth(huge)


def test_seeded_fuzz_only_accepts_or_refuses():
    rng = random.Random(20261126)
    seeds = [
        frame(),
        frame(id=7, channel="pillar:content", intent="query"),
        frame(
            payload={"message": "é✓", "conversation_id": "c", "metadata": {"a": [1, {"b": None}]}}
        ),
        b'{"payload":{"message":""}}',
    ]
    alphabet = b'{}[]":,0123456789.eE+-truefalsnul \\\x00\xff\xc3\xa9abc'
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(4000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                del data[min(pos, len(data) - 1)]
            elif op == 1:
                data.insert(pos, rng.choice(alphabet))
            elif op == 2 and data:
                data[min(pos, len(data) - 1)] = rng.choice(alphabet)
            else:
                data = data[:pos]
        try:
            env = parse_client_frame(bytes(data), max_bytes=256)
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            assert exc.message
            outcomes["refused"] += 1
        else:
            assert env.channel in DEFAULT_CHANNELS
            assert isinstance(env.payload["message"], str)
            outcomes["accepted"] += 1
    assert outcomes["accepted"] > 0 and outcomes["refused"] > 0


# ------------------------------------------------------------------ frames


def test_ack_frame_exact_shape():
    assert orjson.loads(ack_frame("c1", "msg_1", "published")) == {
        "type": "ack",
        "id": "c1",
        "message_id": "msg_1",
        "status": "published",
    }
    assert orjson.loads(ack_frame(None, "msg_2", "queued")) == {
        "type": "ack",
        "id": None,
        "message_id": "msg_2",
        "status": "queued",
    }


def test_error_frame_exact_shape():
    assert orjson.loads(error_frame(5, ErrorCode.UNKNOWN_INTENT, "nope")) == {
        "type": "error",
        "id": 5,
        "code": "unknown_intent",
        "message": "nope",
    }
    assert orjson.loads(error_frame(None, "unavailable", "later"))["code"] == "unavailable"


def test_error_frame_from_a_refusal_echoes_the_client_id():
    err = refused(frame(intent="shout", id="abc"))
    out = orjson.loads(error_frame(err.client_id, err.code, err.message))
    assert out["id"] == "abc" and out["code"] == "unknown_intent"


def test_welcome_frame_exact_shape():
    out = orjson.loads(welcome_frame("ws_alice_0badf00d", "alice", DEFAULT_CHANNELS, 30.0))
    assert out == {
        "type": "welcome",
        "connection_id": "ws_alice_0badf00d",
        "user_id": "alice",
        "channels": list(DEFAULT_CHANNELS),
        "heartbeat_interval": 30,
    }
    assert isinstance(out["heartbeat_interval"], int)
    assert orjson.loads(welcome_frame("c", "u", [], 0.5))["heartbeat_interval"] == 0.5


def test_ping_frame_and_pong():
    assert orjson.loads(ping_frame(1700000000.5)) == {"type": "ping", "timestamp": 1700000000.5}
    assert orjson.loads(ping_frame())["type"] == "ping"
    # One pong rule: any JSON object whose type is "pong", whatever else it holds.
    assert decode_client_frame('{"type": "pong"}') is None
    assert decode_client_frame(b'{"type":"pong"}') is None
    padded = '{"type": "pong", "padding": "' + "x" * 100 + '"}'
    assert decode_client_frame(padded) is None
    with pytest.raises(ProtocolError):
        decode_client_frame('{"type": "ping"}')
    with pytest.raises(ProtocolError):
        decode_client_frame("pong")
    # Over the rate limit a frame is parsed only up to a bound: a longer pong is no pong there.
    assert peek_rate_limited_frame('{"type": "pong"}', 64) == (True, None)
    assert peek_rate_limited_frame(b'{"type":"pong"}', 64) == (True, None)
    assert not peek_rate_limited_frame('{"type": "ping"}', 64)[0]
    assert not peek_rate_limited_frame("pong", 64)[0]
    assert not peek_rate_limited_frame("[", 64)[0]
    assert not peek_rate_limited_frame(padded, 64)[0]
    assert peek_rate_limited_frame(padded, 1024)[0]
    # The id it echoes follows the same rule as a validation error's.
    assert peek_rate_limited_frame('{"id": "a1"}', 64) == (False, "a1")
    assert peek_rate_limited_frame('{"id": true}', 64) == (False, None)
    assert peek_rate_limited_frame('{"id": "' + "x" * 200 + '"}', 1024) == (False, None)


def test_close_and_error_codes_match_the_spec():
    assert {c.name: int(c) for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "TRY_AGAIN_LATER": 1013,
        "SESSION_INVALID": 4401,
        "RATE_LIMITED": 4429,
    }
    for code in (
        "invalid_json",
        "invalid_envelope",
        "unknown_channel",
        "unknown_intent",
        "too_large",
        "rate_limited",
        "unavailable",
    ):
        assert ErrorCode(code) == code


# ------------------------------------------------------------------ agent message


def test_agent_message_shape_and_round_trip():
    env = parse_client_frame(frame())
    msg = agent_message(
        env,
        message_id="msg_1",
        connection_id="ws_alice_0badf00d",
        user_id="alice",
        gateway_instance="gw-1",
    )
    out = orjson.loads(msg.to_bytes())
    assert set(out) == {
        "message_id",
        "connection_id",
        "user_id",
        "gateway_instance",
        "message",
        "timestamp",
        "traceparent",
    }
    assert out["message"] == VALID
    assert (out["message_id"], out["connection_id"], out["user_id"], out["gateway_instance"]) == (
        "msg_1",
        "ws_alice_0badf00d",
        "alice",
        "gw-1",
    )
    assert out["timestamp"].endswith("Z")
    datetime.fromisoformat(out["timestamp"].replace("Z", "+00:00"))
    assert is_valid_traceparent(out["traceparent"])
    # (AgentMessage.from_bytes is gone: nothing but this test read agent messages back.)


def test_agent_message_keeps_a_given_traceparent():
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    msg = agent_message(
        parse_client_frame(frame()),
        message_id="m",
        connection_id="c",
        user_id="u",
        gateway_instance="g",
        traceparent=tp,
    )
    assert msg.traceparent == tp


# ------------------------------------------------------------------ delivery body


def test_parse_delivery_body_valid():
    assert parse_delivery_body(b'{"message": {"type": "response"}}') == ({"type": "response"}, None)
    tp = new_traceparent()
    body = orjson.dumps({"message": {"a": [1]}, "traceparent": tp})
    assert parse_delivery_body(body) == ({"a": [1]}, tp)
    # An invalid traceparent is ignored (W3C: restart the trace), never a refusal.
    for bad in (b"5", b'"00-zz"', b"null", b'"' + tp.upper().encode() + b'"'):
        assert parse_delivery_body(b'{"message": {}, "traceparent": ' + bad + b"}") == ({}, None)


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        (b"nope", ErrorCode.INVALID_JSON, "not valid JSON"),
        (b"\xff", ErrorCode.INVALID_JSON, "not valid JSON"),
        (b"[" * 5000, ErrorCode.INVALID_JSON, "not valid JSON"),
        (b"[]", ErrorCode.BAD_REQUEST, "JSON object"),
        (b"{}", ErrorCode.BAD_REQUEST, '"message"'),
        (b'{"message": "hi"}', ErrorCode.BAD_REQUEST, '"message"'),
        (b'{"message": null}', ErrorCode.BAD_REQUEST, '"message"'),
        (b'{"message": {}, "extra": 1}', ErrorCode.BAD_REQUEST, "unknown field(s): extra"),
        (
            b'{"message": {"d": ' + b"[" * 100 + b"]" * 100 + b"}}",
            ErrorCode.BAD_REQUEST,
            f"deeper than {MAX_DEPTH}",
        ),
    ],
)
def test_parse_delivery_body_refusals(data, code, fragment):
    with pytest.raises(ProtocolError) as info:
        parse_delivery_body(data)
    assert info.value.code is code
    assert fragment in info.value.message


# ------------------------------------------------------------------ ids


def test_connection_id_format():
    cid = new_connection_id("alice.b@x-y")
    assert re.fullmatch(r"ws_alice\.b@x-y_[0-9a-f]{8}", cid)
    assert is_valid_connection_id(cid)
    assert new_connection_id("alice") != new_connection_id("alice")
    for bad in (
        "ws_alice",
        "ws__0badf00d",
        "ws_alice_0BADF00D",
        "ws_al ice_0badf00d",
        "xs_alice_0badf00d",
        "ws_alice_0badf00",
        None,
        5,
        "ws_" + "a" * 129 + "_0badf00d",
    ):
        assert not is_valid_connection_id(bad), bad


def test_user_id_rules():
    for good in ("alice", "a", "A.b_c@d-e", "x" * 128):
        assert is_valid_user_id(good)
    for bad in ("", "x" * 129, "al ice", "alice\n", "ali/ce", "ali:ce", None, 5, "é"):
        assert not is_valid_user_id(bad), bad


def test_message_ids_and_traceparents():
    assert re.fullmatch(r"msg_[0-9a-f]{24}", new_message_id())
    assert new_message_id() != new_message_id()
    tp = new_traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp)
    assert is_valid_traceparent(tp)
    for bad in ("", "00-abc", tp.upper(), tp + "-", None, 1):
        assert not is_valid_traceparent(bad), bad


def test_iso_now_is_utc_milliseconds():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", iso_now())


def test_the_nesting_bound_holds_on_the_gateway_s_fast_path():
    # decode_client_frame skips the walk for frames with few brackets; deep ones still fail.
    deep = '{"payload": {"message": "m", "metadata": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}}"
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(deep)
    assert "deeper than" in info.value.message
    brackets_in_strings = '{"payload": {"message": "' + "{[" * 50 + '"}}'
    envelope = decode_client_frame(brackets_in_strings)
    assert envelope is not None and envelope.payload["message"].startswith("{[")


def test_message_ids_are_unique_and_keep_their_shape():
    ids = [new_message_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 28 and i.startswith("msg_") for i in ids[:100])
    assert all(int(i[4:], 16) >= 0 for i in ids[:100])  # 24 hex digits
    parents = {new_traceparent() for _ in range(10_000)}
    assert len(parents) == 10_000 and all(is_valid_traceparent(p) for p in parents)
