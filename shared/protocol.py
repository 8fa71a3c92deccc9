"""The Post Office wire protocol: envelopes, frames, close and error codes.

Pure functions and data only — no sockets, no Redis — so every rule here is tested without I/O
(the python-websockets layering: a sans-I/O core under thin I/O layers). The gateway, the Post
Office API and the agent client all build and read frames through this module.

Exception tree::

    Exception
     └── ProtocolError          a frame or body was refused; carries an ErrorCode and a message
"""

from __future__ import annotations

import enum
import itertools
import os
import random as _random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = [
    "CLOSE_REASON_RATE_LIMITED",
    "CLOSE_REASON_SESSION_LIMIT",
    "DEFAULT_CHANNELS",
    "INTENTS",
    "MAX_CLOSE_REASON_BYTES",
    "AgentMessage",
    "ClientEnvelope",
    "CloseCode",
    "ErrorCode",
    "ProtocolError",
    "ack_frame",
    "agent_message",
    "check_depth",
    "close_reason_fits",
    "decode_client_frame",
    "error_frame",
    "is_agent_close_code",
    "is_close_command_code",
    "is_valid_connection_id",
    "is_valid_user_id",
    "iso_now",
    "new_connection_id",
    "new_message_id",
    "new_traceparent",
    "parse_client_frame",
    "parse_delivery_body",
    "parse_reply_body",
    "peek_rate_limited_frame",
    "ping_frame",
    "truncate_close_reason",
    "validate_client_object",
    "welcome_frame",
]

DEFAULT_CHANNELS: tuple[str, ...] = (
    "guide",
    "pillar:content",
    "pillar:insights",
    "pillar:operations",
    "pillar:business_outcomes",
)
INTENTS: frozenset[str] = frozenset({"chat", "query", "command"})

#: JSON deeper than this is refused: no agent needs it and it is a cheap CPU/stack attack.
MAX_DEPTH = 32
#: Client message ids are echoed back; keep them short.
MAX_CLIENT_ID_LENGTH = 128

# \Z, not $: "$" also matches before a trailing newline, which would let "alice\n" through.
_USER_ID_RE = re.compile(r"^[A-Za-z0-9._@-]{1,128}\Z")
_CONNECTION_ID_RE = re.compile(r"^ws_[A-Za-z0-9._@-]{1,128}_[0-9a-f]{8}\Z")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses; see docs/protocol.md."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server drain
    POLICY_VIOLATION = 1008  # evicted: idle or stale, the reason says which
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # overloaded, or the client reads too slowly
    SESSION_INVALID = 4401  # invalid, expired or revoked session
    RATE_LIMITED = 4429  # rate limit exceeded repeatedly, or too many sockets for the session


#: The two causes of a 4429, told apart by the close reason (the chat page reads it; a client
#: should wait on the first, and close another socket of the session on the second).
CLOSE_REASON_RATE_LIMITED = "rate limit exceeded"
CLOSE_REASON_SESSION_LIMIT = "too many connections for this session"


#: RFC 6455 5.5: a Close frame's body is at most 125 bytes, two of them the code.
MAX_CLOSE_REASON_BYTES = 123

#: Codes an agent (the Post Office API) may ask a gateway to close with: a normal close or an
#: application code. The gateway's own codes (1001, 1008, 1011, 1013) mean something the
#: documentation promises the client, so only the gateway and the eviction worker send them.
_GATEWAY_ONLY_CLOSE_CODES = frozenset({1001, 1008, 1011, 1013})


def is_agent_close_code(code: int) -> bool:
    """True for a close code an agent may request: 1000 or an application code 3000-4999."""
    return code == CloseCode.NORMAL or 3000 <= code <= 4999


def is_close_command_code(code: int) -> bool:
    """True for a code a gateway honours in a close command from its control channel: what an
    agent may request, plus the gateway's own codes the eviction worker sends (1008 idle)."""
    return is_agent_close_code(code) or code in _GATEWAY_ONLY_CLOSE_CODES


def close_reason_fits(reason: str) -> bool:
    """True when ``reason`` fits a Close frame (at most 123 bytes of UTF-8)."""
    return len(reason.encode("utf-8", "surrogatepass")) <= MAX_CLOSE_REASON_BYTES


def truncate_close_reason(reason: str) -> bytes:
    """``reason`` as UTF-8 cut to 123 bytes on a character boundary (never half a character)."""
    data = reason.encode("utf-8", "replace")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return data
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


class ErrorCode(enum.StrEnum):
    """``code`` of an ``error`` frame (WebSocket) or an HTTP JSON error."""

    INVALID_JSON = "invalid_json"
    INVALID_ENVELOPE = "invalid_envelope"
    UNKNOWN_CHANNEL = "unknown_channel"
    UNKNOWN_INTENT = "unknown_intent"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    # HTTP API codes
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    GONE = "gone"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    TIMEOUT = "timeout"
    INTERNAL = "internal_error"


class ProtocolError(Exception):
    """A frame or request body was refused. ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode, message: str, client_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_id = client_id


@dataclass(frozen=True, slots=True)
class ClientEnvelope:
    """A validated client message, normalised (``channel`` and ``intent`` filled in)."""

    channel: str
    intent: str
    payload: dict[str, Any]
    id: str | int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "channel": self.channel,
            "intent": self.intent,
            "payload": self.payload,
        }
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """What agents receive on ``websocket:<channel>`` (docs/protocol.md, "What agents receive")."""

    message_id: str
    connection_id: str
    user_id: str
    gateway_instance: str
    message: dict[str, Any]
    timestamp: str
    traceparent: str

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "message_id": self.message_id,
                "connection_id": self.connection_id,
                "user_id": self.user_id,
                "gateway_instance": self.gateway_instance,
                "message": self.message,
                "timestamp": self.timestamp,
                "traceparent": self.traceparent,
            }
        )


def check_depth(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``value`` nests no deeper than ``limit`` containers (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


def _client_id(raw: dict[str, Any]) -> str | int | None:
    value = raw.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "id must be a string or an integer")
    if isinstance(value, int) and not -(2**53) <= value <= 2**53:
        raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "id is out of the safe integer range")
    if isinstance(value, str) and len(value) > MAX_CLIENT_ID_LENGTH:
        raise ProtocolError(ErrorCode.INVALID_ENVELOPE, f"id is longer than {MAX_CLIENT_ID_LENGTH}")
    return value


def _echo_id(raw: dict[str, Any]) -> str | int | None:
    """The client ``id`` an error frame echoes: the id when it is a valid one, else None."""
    try:
        return _client_id(raw)
    except ProtocolError:
        return None


def _is_pong(raw: Any) -> bool:
    # The one pong rule: any JSON object whose "type" is "pong", whatever else it holds.
    return isinstance(raw, dict) and raw.get("type") == "pong"


def decode_client_frame(
    data: str | bytes, allowed_channels: Iterable[str] = DEFAULT_CHANNELS
) -> ClientEnvelope | None:
    """One client text frame as the gateway reads it: None for the app pong (liveness, never
    answered), else the validated message. Raises :class:`ProtocolError` on any defect, with
    the client's ``id`` whenever it could be read, so the error frame can echo it: a client
    never has to guess which of its messages was refused. The frame's size is the WebSocket
    layer's to bound (``GATEWAY_MAX_FRAME_BYTES``, 1009)."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc.msg}") from None
    if _is_pong(raw):
        return None
    # A frame with at most MAX_DEPTH brackets cannot nest deeper than MAX_DEPTH: counting them
    # (in C) spares the walk over the decoded object for nearly every frame. Brackets inside
    # strings only make the count larger, so a frame is never taken for shallower than it is.
    opened = (
        data.count("{") + data.count("[")
        if isinstance(data, str)
        else (data.count(b"{") + data.count(b"["))
    )
    return validate_client_object(raw, allowed_channels, nesting_checked=opened <= MAX_DEPTH)


def peek_rate_limited_frame(data: str | bytes, max_bytes: int) -> tuple[bool, str | int | None]:
    """For a frame over the rate limit: (is it a pong, the ``id`` to echo). Only a frame of at
    most ``max_bytes`` is parsed (a client over its limit must not buy parsing of large
    frames); a longer one is no pong and echoes null."""
    if len(data) > max_bytes:
        return False, None
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False, None
    if not isinstance(raw, dict):
        return False, None
    return _is_pong(raw), _echo_id(raw)


def parse_client_frame(
    data: str | bytes, allowed_channels: Iterable[str] = DEFAULT_CHANNELS, max_bytes: int = 65536
) -> ClientEnvelope:
    """:func:`decode_client_frame` for a reader that wants a message and bounds the size itself
    (an agent, a tool): a frame over ``max_bytes`` is ``too_large``, a pong is refused."""
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame is {size} bytes; the limit is {max_bytes}")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc.msg}") from None
    # No pong shortcut: a pong is no message, so its "type" is an unknown field here.
    return validate_client_object(raw, allowed_channels)


def validate_client_object(
    raw: Any, allowed_channels: Iterable[str] = DEFAULT_CHANNELS, *, nesting_checked: bool = False
) -> ClientEnvelope:
    """:func:`parse_client_frame` for a frame already decoded (``orjson.loads``), so a caller
    that had to look inside it first (is it a pong?) does not parse it twice."""
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "a message must be a JSON object")
    client_id: Any = None
    try:
        client_id = _client_id(raw)
        if not nesting_checked and not check_depth(raw):
            raise ProtocolError(ErrorCode.INVALID_ENVELOPE, f"JSON nests deeper than {MAX_DEPTH}")
        channel = raw.get("channel", "guide")
        if not isinstance(channel, str):
            raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "channel must be a string")
        if channel not in allowed_channels:
            raise ProtocolError(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel {channel[:64]!r}")
        intent = raw.get("intent", "chat")
        if not isinstance(intent, str):
            raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "intent must be a string")
        if intent not in INTENTS:
            raise ProtocolError(
                ErrorCode.UNKNOWN_INTENT,
                f"unknown intent {intent[:64]!r}; use chat, query or command",
            )
        payload = raw.get("payload")
        if not isinstance(payload, dict):
            raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "payload must be a JSON object")
        if not isinstance(payload.get("message"), str):
            raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "payload.message must be a string")
        conversation_id = payload.get("conversation_id")
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise ProtocolError(
                ErrorCode.INVALID_ENVELOPE, "payload.conversation_id must be a string"
            )
        metadata = payload.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ProtocolError(ErrorCode.INVALID_ENVELOPE, "payload.metadata must be an object")
        unknown = set(raw) - {"channel", "intent", "payload", "id"}
        if unknown:
            raise ProtocolError(
                ErrorCode.INVALID_ENVELOPE, f"unknown field(s): {', '.join(sorted(unknown))[:200]}"
            )
    except ProtocolError as exc:
        exc.client_id = client_id
        raise
    return ClientEnvelope(channel=channel, intent=intent, payload=payload, id=client_id)


def parse_delivery_body(data: bytes) -> tuple[dict[str, Any], str | None]:
    """Validate a Post Office delivery body ``{"message": {...}, "traceparent"?}``.

    An invalid ``traceparent`` (wrong type or shape) is returned as None, as if absent."""
    message, traceparent, _ack = _parse_delivery(data, frozenset({"message", "traceparent"}))
    return message, traceparent


def parse_reply_body(data: bytes) -> tuple[dict[str, Any], str | None, Any]:
    """:func:`parse_delivery_body` for a reply that may also carry ``"ack"`` (the stream entry
    it answers, acked in the same request); the ``ack`` value is returned unchecked (None when
    absent): the API validates it."""
    return _parse_delivery(data, frozenset({"message", "traceparent", "ack"}))


def _parse_delivery(data: bytes, allowed: frozenset[str]) -> tuple[dict[str, Any], str | None, Any]:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "body must be a JSON object")
    message = raw.get("message")
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'body must have "message": a JSON object')
    if not check_depth(message):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"message nests deeper than {MAX_DEPTH}")
    traceparent = raw.get("traceparent")
    if not is_valid_traceparent(traceparent):
        # W3C Trace Context: a traceparent that cannot be parsed is ignored and the trace
        # restarts; refusing the delivery would lose the message over a tracing detail.
        traceparent = None
    unknown = set(raw) - allowed
    if unknown:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"unknown field(s): {', '.join(sorted(unknown))[:200]}"
        )
    return message, traceparent, raw.get("ack")


def is_valid_user_id(user_id: object) -> bool:
    return isinstance(user_id, str) and bool(_USER_ID_RE.match(user_id))


def is_valid_connection_id(connection_id: object) -> bool:
    return isinstance(connection_id, str) and bool(_CONNECTION_ID_RE.match(connection_id))


def is_valid_traceparent(value: object) -> bool:
    return isinstance(value, str) and bool(_TRACEPARENT_RE.match(value))


def new_connection_id(user_id: str) -> str:
    return f"ws_{user_id}_{os.urandom(4).hex()}"


#: Message ids are a random per-process prefix and a counter: unique across processes (48
#: random bits each) and in a process (48-bit counter), without a system call per message
#: (``os.urandom`` per id was 3% of the gateway's CPU). They are identifiers, not secrets.
_MESSAGE_ID_PREFIX = os.urandom(6).hex()
_MESSAGE_COUNTER = itertools.count(int.from_bytes(os.urandom(5), "big"))
_MASK_48 = (1 << 48) - 1


def new_message_id() -> str:
    return f"msg_{_MESSAGE_ID_PREFIX}{next(_MESSAGE_COUNTER) & _MASK_48:012x}"


def new_traceparent() -> str:
    """A fresh W3C trace context (sampled) for a message that arrives without one. Trace ids
    need to be random enough not to collide (W3C Trace Context), not secret: the process's
    Mersenne Twister, seeded from the OS, instead of a system call per message."""
    trace = _random.getrandbits(128) or 1  # all zeros is an invalid trace id
    span = _random.getrandbits(64) or 1
    return f"00-{trace:032x}-{span:016x}-01"


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def agent_message(
    envelope: ClientEnvelope,
    *,
    message_id: str,
    connection_id: str,
    user_id: str,
    gateway_instance: str,
    traceparent: str | None = None,
) -> AgentMessage:
    return AgentMessage(
        message_id=message_id,
        connection_id=connection_id,
        user_id=user_id,
        gateway_instance=gateway_instance,
        message=envelope.as_dict(),
        timestamp=iso_now(),
        traceparent=traceparent or new_traceparent(),
    )


def _dumps(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def welcome_frame(
    connection_id: str, user_id: str, channels: Iterable[str], heartbeat_interval: float
) -> str:
    interval: float = (
        int(heartbeat_interval) if float(heartbeat_interval).is_integer() else heartbeat_interval
    )
    return _dumps(
        {
            "type": "welcome",
            "connection_id": connection_id,
            "user_id": user_id,
            "channels": list(channels),
            "heartbeat_interval": interval,
        }
    )


def ack_frame(client_id: Any, message_id: str, status: str) -> str:
    return _dumps({"type": "ack", "id": client_id, "message_id": message_id, "status": status})


def error_frame(client_id: Any, code: ErrorCode | str, message: str) -> str:
    return _dumps({"type": "error", "id": client_id, "code": str(code), "message": message})


def ping_frame(now: float | None = None) -> str:
    return _dumps({"type": "ping", "timestamp": time.time() if now is None else now})
