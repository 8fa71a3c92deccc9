"""Traffic Cop's HTTP handlers and its service-key middleware.

Every refusal is a JSON error (``shared.http``): 400 for bad input, 401 for a missing or wrong
service key (``unauthorized``) or a session that is unknown, expired or revoked
(``session_invalid``, the code :mod:`shared.traffic_cop_client` keys on), 404 for unknown
tokens and connections, 413 past ``MAX_BODY_BYTES``. Tokens never reach a log line: handlers
log session ids only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.traffic_cop_stub import metrics
from services.traffic_cop_stub.keys import SETTINGS, STORE
from services.traffic_cop_stub.sessions import Registration, Session
from shared.http import (
    bearer_token,
    json_error,
    json_error_exception,
    json_response,
    read_json_body,
)
from shared.protocol import (
    MAX_DEPTH,
    ErrorCode,
    check_depth,
    is_valid_connection_id,
    is_valid_user_id,
)
from shared.traffic_cop_client import SESSION_INVALID_CODE

__all__ = [
    "create_session",
    "register_connection",
    "revoke_session",
    "service_key_middleware",
    "unregister_connection",
    "validate_session",
]

log = logging.getLogger(__name__)

# \Z, not $: "$" also matches before a trailing newline.
_SESSION_ID_RE = re.compile(r"^sess_[0-9a-f]{16}\Z")
_GATEWAY_INSTANCE_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}\Z")
#: A token longer than this cannot be one we issued (43 characters); refuse it before hashing.
_MAX_TOKEN_LENGTH = 512

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bad_request(message: str) -> web.HTTPException:
    return json_error_exception(400, ErrorCode.BAD_REQUEST, message)


def _session_invalid(message: str) -> web.Response:
    return json_error(401, SESSION_INVALID_CODE, message)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _object_body(
    request: web.Request, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The body as a JSON object with exactly the known fields, or a 400 saying what is wrong."""
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise _bad_request("body must be a JSON object")
    missing = sorted(required - body.keys())
    if missing:
        raise _bad_request(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(body.keys() - required - optional)
    if unknown:
        raise _bad_request(f"unknown field(s): {', '.join(unknown)[:200]}")
    return body


def _string_field(body: dict[str, Any], name: str) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise _bad_request(f"{name} must be a string")
    return value


@web.middleware
async def service_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/v1`` needs ``Authorization: Bearer <service key>``; the operational routes do not
    (Consul and Prometheus call them without one)."""
    if request.path.startswith("/v1/") or request.path == "/v1":
        expected = hashlib.sha256(request.app[SETTINGS].service_key.encode()).digest()
        presented = bearer_token(request.headers.get("Authorization"))
        if presented is None:
            return json_error(
                401,
                ErrorCode.UNAUTHORIZED,
                "missing service key: send Authorization: Bearer <TRAFFIC_COP_SERVICE_KEY>",
                {"WWW-Authenticate": "Bearer"},
            )
        # Constant time over fixed-length digests, so response timing reveals neither how much
        # of a guess was right nor the key's length.
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        if not hmac.compare_digest(digest, expected):
            return json_error(
                401, ErrorCode.UNAUTHORIZED, "wrong service key", {"WWW-Authenticate": "Bearer"}
            )
    # Redis failures become 503 in shared.http's error middleware.
    return await handler(request)


async def create_session(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body = await _object_body(
        request, frozenset({"user_id"}), frozenset({"ttl_seconds", "metadata"})
    )
    user_id = body["user_id"]
    if not is_valid_user_id(user_id):
        raise _bad_request("user_id must be 1 to 128 characters of letters, digits and . _ @ -")
    ttl = body.get("ttl_seconds")
    if ttl is None:
        ttl = settings.default_ttl_seconds
    elif isinstance(ttl, bool) or not isinstance(ttl, int):
        raise _bad_request("ttl_seconds must be an integer")
    elif not 1 <= ttl <= settings.max_ttl_seconds:
        raise _bad_request(f"ttl_seconds must be between 1 and {settings.max_ttl_seconds}")
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise _bad_request("metadata must be a JSON object")
    elif not check_depth(metadata):
        raise _bad_request(f"metadata nests deeper than {MAX_DEPTH}")
    created = await request.app[STORE].create(user_id, ttl, metadata)
    metrics.SESSIONS_CREATED.inc()
    session = created.session
    log.info("session %s created for user %s, ttl %ds", session.session_id, user_id, ttl)
    return json_response(
        {
            "session_token": created.token,
            "session_id": session.session_id,
            "user_id": session.user_id,
            "expires_at": _iso(session.expires_at),
        },
        201,
    )


def _session_view(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "user_id": session.user_id,
        "expires_at": _iso(session.expires_at),
        "metadata": session.metadata,
    }


async def validate_session(request: web.Request) -> web.Response:
    body = await _object_body(request, frozenset({"session_token"}))
    token = _string_field(body, "session_token")
    session = None
    if token and len(token) <= _MAX_TOKEN_LENGTH:
        session = await request.app[STORE].validate(token)
    if session is None:
        metrics.SESSIONS_VALIDATED.labels(result="invalid").inc()
        return _session_invalid("session is unknown, expired or revoked")
    metrics.SESSIONS_VALIDATED.labels(result="valid").inc()
    return json_response(_session_view(session))


async def revoke_session(request: web.Request) -> web.Response:
    token = request.match_info["session_token"]
    session_id = None
    if len(token) <= _MAX_TOKEN_LENGTH:
        session_id = await request.app[STORE].revoke(token)
    if session_id is None:
        return json_error(404, ErrorCode.NOT_FOUND, "no such session")
    metrics.SESSIONS_REVOKED.inc()
    log.info("session %s revoked", session_id)
    return web.Response(status=204)


async def register_connection(request: web.Request) -> web.Response:
    body = await _object_body(
        request, frozenset({"connection_id", "session_id", "user_id", "gateway_instance"})
    )
    connection_id = _string_field(body, "connection_id")
    session_id = _string_field(body, "session_id")
    user_id = _string_field(body, "user_id")
    gateway_instance = _string_field(body, "gateway_instance")
    if not is_valid_connection_id(connection_id):
        raise _bad_request("connection_id must look like ws_<user_id>_<8 hex>")
    if not _SESSION_ID_RE.match(session_id):
        raise _bad_request("session_id must look like sess_<16 hex>")
    if not is_valid_user_id(user_id):
        raise _bad_request("user_id must be 1 to 128 characters of letters, digits and . _ @ -")
    if not _GATEWAY_INSTANCE_RE.match(gateway_instance):
        raise _bad_request(
            "gateway_instance must be 1 to 128 characters of letters, digits and ._:@-"
        )
    outcome = await request.app[STORE].register_connection(connection_id, session_id, user_id)
    extra = {"connection_id": connection_id}
    if outcome is Registration.REGISTERED:
        metrics.CONNECTIONS_REGISTERED.labels(result="registered").inc()
        log.info(
            "connection registered to session %s on %s", session_id, gateway_instance, extra=extra
        )
        return json_response(
            {"connection_id": connection_id, "session_id": session_id, "user_id": user_id}, 201
        )
    metrics.CONNECTIONS_REGISTERED.labels(result="session_invalid").inc()
    if outcome is Registration.WRONG_USER:
        log.warning(
            "connection refused: session %s is not user %s's", session_id, user_id, extra=extra
        )
        return _session_invalid("the session belongs to another user")
    log.info("connection refused: session %s no longer exists", session_id, extra=extra)
    return _session_invalid("session is unknown, expired or revoked")


async def unregister_connection(request: web.Request) -> web.Response:
    connection_id = request.match_info["connection_id"]
    if not is_valid_connection_id(connection_id):
        raise _bad_request("connection_id must look like ws_<user_id>_<8 hex>")
    if not await request.app[STORE].unregister_connection(connection_id):
        return json_error(404, ErrorCode.NOT_FOUND, "no such connection")
    metrics.CONNECTIONS_UNREGISTERED.inc()
    log.info("connection unregistered", extra={"connection_id": connection_id})
    return web.Response(status=204)
