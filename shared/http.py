"""JSON errors for every HTTP service: ``{"error": {"code": ..., "message": ...}}``.

:func:`error_middleware` turns aiohttp's own HTTP exceptions (404, 405, 413 ...) and any
unexpected exception into that shape, so no request ever gets an HTML page or a bare 500, and
a Redis outage during a request is a 503 naming the dependency rather than a crash.
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

__all__ = ["error_middleware", "json_error", "json_response", "read_json_body"]

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


def json_error(
    status: int, code: ErrorCode | str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": {"code": str(code), "message": message}}, status, headers)


async def read_json_body(request: web.Request) -> Any:
    """The request body parsed as JSON, or a 400 JSON error (413 past the size limit)."""
    body = await request.read()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # text=, not body=: aiohttp deprecates body on HTTP exceptions.
        error = {"code": str(ErrorCode.INVALID_JSON), "message": f"body is not JSON: {exc.msg}"}
        raise web.HTTPBadRequest(
            text=orjson.dumps({"error": error}).decode(), content_type="application/json"
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
