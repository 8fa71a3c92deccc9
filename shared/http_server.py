"""The HTTP server every service runs: aiohttp's, with the limits a hostile client needs.

:func:`serve` is ``web.run_app`` (uvloop, SIGTERM/SIGINT drain, cleanup contexts) with
aiohttp's own server in two places replaced by a guarded one:

* a connection that has not yet sent one whole request head is *pending*: at most
  ``HTTP_MAX_PENDING_CONNECTIONS`` are held (past it a new one is answered 503 JSON and
  closed before anything is parsed), and each gets ``HTTP_HEADER_TIMEOUT_SECONDS`` to send
  it (then 408 JSON and closed). A kept-alive connection's next request head, and an idle
  kept-alive connection, get ``HTTP_KEEPALIVE_TIMEOUT_SECONDS`` (aiohttp's keep-alive timer,
  which only closes a connection that has no complete request waiting). Slowloris and
  half-open connections are so bounded in time and in number; a WebSocket upgrade is a
  request like any other, so its handshake is bounded the same way;
* aiohttp's answer to a malformed request (bad request line, header too long, invalid
  characters): one WARNING line naming the error's type, never a traceback and never the
  request's bytes (they can hold a realm key), and a JSON error body that echoes nothing,
  without aiohttp's ``Server`` header naming versions.

Request bodies are never inflated (``auto_decompress=False``): aiohttp would otherwise
decompress a ``Content-Encoding: gzip`` body while parsing, before any handler or
authentication ran (a 194 KB body inflating to 200 MB cost 0.6 s of CPU). Such requests are
answered 415 by :func:`shared.http.encoding_middleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import orjson
import prometheus_client
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_runner import GracefulExit
from aiohttp.web_server import Server

from shared.http import SERVER_NAME, json_error
from shared.protocol import ErrorCode
from shared.settings import HttpLimitSettings

__all__ = ["PENDING", "REFUSED", "ServerLimits", "serve"]

log = logging.getLogger(__name__)

PENDING = prometheus_client.Gauge(
    "postoffice_http_pending_connections",
    "TCP connections that have not yet sent a whole request head",
)
REFUSED = prometheus_client.Counter(
    "postoffice_http_connections_dropped",
    "Connections closed before their first request: pending_limit, header_timeout",
    ["reason"],
)


@dataclass(frozen=True)
class ServerLimits:
    """What the server bounds before any handler runs; every field is a setting
    (``<PREFIX>HTTP_*``, see :class:`shared.settings.ServiceSettings`)."""

    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_pending_connections: int = 1000
    max_line_bytes: int = 8190
    max_headers: int = 128

    @classmethod
    def of(cls, settings: HttpLimitSettings) -> ServerLimits:
        return cls(
            header_timeout=settings.http_header_timeout_seconds,
            keepalive_timeout=settings.http_keepalive_timeout_seconds,
            max_pending_connections=settings.http_max_pending_connections,
            max_line_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
        )


def _raw_error(status: str, code: ErrorCode, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for connections no request was parsed on."""
    body = orjson.dumps({"error": {"code": str(code), "message": message}})
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: {SERVER_NAME}\r\n"
        "Retry-After: 1\r\n\r\n"
    )
    return head.encode() + body


_OVERLOADED = _raw_error(
    "503 Service Unavailable", ErrorCode.UNAVAILABLE, "too many connections; retry later"
)
_HEADER_TIMEOUT = _raw_error(
    "408 Request Timeout", ErrorCode.TIMEOUT, "the request head took too long to arrive"
)
#: The one message a malformed request gets, per status: nothing of the request is echoed.
_MALFORMED = {
    400: (ErrorCode.BAD_REQUEST, "malformed HTTP request"),
    413: (ErrorCode.TOO_LARGE, "request line or headers too large"),
    504: (ErrorCode.TIMEOUT, "the request took too long"),
}


class _Guard:
    """The process's count of pending connections."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.pending = 0


class _GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, counting and timing the wait for a request head."""

    def __init__(self, manager: Server, *, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._pending = False
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        if guard.pending >= guard.limits.max_pending_connections:
            REFUSED.labels("pending_limit").inc()
            self._drop(_OVERLOADED)
            return
        guard.pending += 1
        PENDING.inc()
        self._pending = True
        self._header_timer = self._loop.call_later(
            guard.limits.header_timeout, self._header_timed_out
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A parsed head (or a parse error, answered 400 next) ends the wait.
        if self._pending and self._request_count:
            self._settle()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._settle()
        super().connection_lost(exc)

    def _settle(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._pending:
            self._pending = False
            self._guard.pending -= 1
            PENDING.dec()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._pending:
            REFUSED.labels("header_timeout").inc()
            self._settle()
            self._drop(_HEADER_TIMEOUT)

    def _drop(self, answer: bytes) -> None:
        transport = self.transport
        if transport is not None:
            with contextlib.suppress(Exception):  # the peer may be gone already
                transport.write(answer)
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own errors: a malformed request (400), a handler timeout (504), or an
        exception that escaped every middleware (500, a bug: the only one with a traceback)."""
        if status >= 500 and status != 504:
            log.error("unhandled error answering a request", exc_info=exc)
        else:
            log.warning(
                "refused a malformed HTTP request: %d %s",
                status,
                type(exc).__name__ if exc is not None else "timeout",
            )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        code, text = _MALFORMED.get(status, (ErrorCode.INTERNAL, "internal error"))
        response = json_error(status, code, text, {"Server": SERVER_NAME})
        response.force_close()
        return response


class _GuardedServer(Server):
    def __init__(self, guard: _Guard, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> Server:
        # aiohttp's server, rebuilt as the guarded one with the very same arguments.
        server = await super()._make_server()
        return _GuardedServer(
            self._guard,
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,
        )


async def _run(
    app: web.Application | Awaitable[web.Application],
    host: str,
    port: int,
    shutdown_timeout: float,
    limits: ServerLimits,
) -> None:
    if not isinstance(app, web.Application):
        app = await app
    limits_kwargs: dict[str, Any] = {
        "keepalive_timeout": limits.keepalive_timeout,
        "max_line_size": limits.max_line_bytes,
        "max_field_size": limits.max_line_bytes,
        "max_headers": limits.max_headers,
        "auto_decompress": False,
    }
    runner = _Runner(
        app,
        _Guard(limits),
        handle_signals=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        **limits_kwargs,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()  # until cancelled by the drain
    finally:
        await runner.cleanup()


def serve(
    app: web.Application | Awaitable[web.Application],
    host: str,
    port: int,
    shutdown_timeout: float,
    limits: ServerLimits,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Serve until SIGTERM/SIGINT (or :class:`GracefulExit`), then drain: what
    ``web.run_app`` does, with the guarded server."""
    main = loop.create_task(_run(app, host, port, shutdown_timeout, limits))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            if rest:
                loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
