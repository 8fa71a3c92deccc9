"""HTTP pieces every service shares: JSON errors and the bearer-token parser.

Errors are ``{"error": {"code": ..., "message": ...}}``, built in one place
(:func:`error_body`): :func:`json_error` answers with one, :func:`json_error_exception` makes
one an exception to raise from deep in a handler. :func:`error_middleware` turns aiohttp's own
HTTP exceptions (404, 405, 413 ...) and any unexpected exception into that shape, so no
request ever gets an HTML page or a bare 500, and a Redis outage during a request is a 503
naming the dependency rather than a crash.

:func:`bearer_token` is the one reader of ``Authorization: Bearer <token>`` (realm keys, the
Traffic Cop service key, a gateway client's session token).
:func:`error_middleware` turns aiohttp's own HTTP exceptions (404, 405, 413 ...) and any
unexpected exception into that shape, so no request ever gets an HTML page or a bare 500, and
a Redis outage during a request is a 503 naming the dependency rather than a crash. A body
that cannot be read (broken chunked encoding, a connection cut mid-body) is a 400.

:func:`encoding_middleware` refuses ``Content-Encoding`` other than ``identity`` with 415
before anything reads the body (the server never inflates bodies, shared/http_server.py), and
:func:`body_timeout_middleware` reads a body within its time limit or answers 408.
:func:`server_header` replaces aiohttp's ``Server: Python/3.x aiohttp/3.y`` with a name
without versions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import hdrs, web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.protocol import ErrorCode

__all__ = [
    "SERVER_NAME",
    "Handler",
    "bearer_token",
    "body_timeout_middleware",
    "encoding_middleware",
    "error_body",
    "error_middleware",
    "json_error",
    "json_error_exception",
    "json_response",
    "read_json_body",
    "server_header",
]

log = logging.getLogger(__name__)

#: The ``Server`` header of every response: which software, never which versions.
SERVER_NAME = "post-office"

_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    410: ErrorCode.GONE,
    408: ErrorCode.TIMEOUT,
    413: ErrorCode.TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_ENCODING,
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
    except web.RequestPayloadError as exc:
        # The body's framing broke (chunked encoding, a cut connection): the client's fault.
        # Nothing of the body is echoed.
        log.warning(
            "unreadable body in %s %s: %s", request.method, _route(request), type(exc).__name__
        )
        return json_error(400, ErrorCode.BAD_REQUEST, "request body could not be read")
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


@web.middleware
async def encoding_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for a compressed body, before anything reads it: bodies are JSON of at most
    ``client_max_size`` bytes, and inflating one would let a small request cost much CPU."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        response = json_error(
            415,
            ErrorCode.UNSUPPORTED_ENCODING,
            "compressed request bodies are not accepted; send Content-Encoding: identity",
        )
        # The unread body is not worth reading to keep the connection.
        response.force_close()
        return response
    return await handler(request)


def body_timeout_middleware(timeout: float) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Read a request's body within ``timeout`` seconds (then aiohttp keeps it for the
    handler), else 408: a client trickling its body holds no handler forever."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                await asyncio.wait_for(request.read(), timeout)
            except TimeoutError:
                response = json_error(
                    408, ErrorCode.TIMEOUT, f"the request body took longer than {timeout:g} s"
                )
                response.force_close()
                return response
        return await handler(request)

    return middleware


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: aiohttp only sets ``Server`` when absent."""
    response.headers[hdrs.SERVER] = SERVER_NAME
