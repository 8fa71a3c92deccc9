"""HTTP pieces every service shares: JSON errors and the bearer-token parser.

Errors are ``{"error": {"code": ..., "message": ...}}``, built in one place
(:func:`error_body`): :func:`json_error` answers with one, :func:`json_error_exception` makes
one an exception to raise from deep in a handler. :func:`error_middleware` turns aiohttp's own
HTTP exceptions (404, 405, 413 ...) and any unexpected exception into that shape, so no
request ever gets an HTML page or a bare 500, and a Redis outage during a request is a 503
naming the dependency rather than a crash.

:func:`bearer_token` is the one reader of ``Authorization: Bearer <token>`` (realm keys, the
Traffic Cop service key, a gateway client's session token).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.protocol import ErrorCode

__all__ = [
    "bearer_token",
    "error_body",
    "error_middleware",
    "json_error",
    "json_error_exception",
    "json_response",
    "read_json_body",
]

log = logging.getLogger(__name__)

_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    410: ErrorCode.GONE,
    413: ErrorCode.TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


#: The statuses a handler raises JSON errors with (:func:`json_error_exception`).
_EXCEPTIONS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    410: web.HTTPGone,
    429: web.HTTPTooManyRequests,
    503: web.HTTPServiceUnavailable,
}


def error_body(code: ErrorCode | str, message: str) -> bytes:
    """The one JSON error shape: ``{"error": {"code": ..., "message": ...}}``."""
    return orjson.dumps({"error": {"code": str(code), "message": message}})


def json_error(
    status: int, code: ErrorCode | str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=error_body(code, message),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def json_error_exception(
    status: int, code: ErrorCode | str, message: str, headers: dict[str, str] | None = None
) -> web.HTTPException:
    """The JSON error as an exception to raise; :func:`error_middleware` lets it through as
    is. ``status`` is one of 400, 401, 403, 404, 410, 429, 503."""
    kind = _EXCEPTIONS.get(status)
    if kind is None:
        raise ValueError(f"no JSON error exception for status {status!r}")
    # text=, not body=: aiohttp deprecates body on HTTP exceptions.
    return kind(
        text=error_body(code, message).decode(), content_type="application/json", headers=headers
    )


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme in any case, spaces
    around the token ignored), or None when there is no such header or no token."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def read_json_body(request: web.Request) -> Any:
    """The request body parsed as JSON, or a 400 JSON error (413 past the size limit)."""
    body = await request.read()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise json_error_exception(
            400, ErrorCode.INVALID_JSON, f"body is not JSON: {exc.msg}"
        ) from None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    """The matched route's template (``/v1/sessions/{session_token}``), never the path itself:
    paths can carry secrets (Traffic Cop's revoke puts the token there) and logs must not."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "<unmatched route>"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, ErrorCode.BAD_REQUEST)
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            limit = request.app._client_max_size
            message = f"request body is larger than the limit of {limit} bytes"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_error(exc.status, code, message, headers)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("redis unavailable during %s %s: %r", request.method, _route(request), exc)
        return json_error(
            503, ErrorCode.UNAVAILABLE, "redis is unavailable; retry later", {"Retry-After": "1"}
        )
    except RedisError as exc:
        # Redis answered but refused (out of memory, read-only replica, busy script): a
        # dependency failure, not a bug in the request, so 503 rather than 500.
        log.error("redis refused a command during %s %s: %r", request.method, _route(request), exc)
        return json_error(
            503,
            ErrorCode.UNAVAILABLE,
            "redis refused the command; retry later",
            {"Retry-After": "1"},
        )
    except Exception:
        log.exception("unhandled error in %s %s", request.method, _route(request))
        return json_error(500, ErrorCode.INTERNAL, "internal error")
