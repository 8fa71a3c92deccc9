"""Async client for Traffic Cop's internal HTTP API (docs/architecture.md, "Traffic Cop HTTP API").

The gateway validates every upgrade through it and ties connections to sessions; the eviction
worker unregisters evicted connections. One keep-alive ``aiohttp.ClientSession`` per client
(created lazily, inside the running loop) carries every call, so validating a token costs one
request on a warm connection, not a TCP handshake.

Tokens are secrets: they are never logged, and never appear in an exception this module raises.
``DELETE /v1/sessions/{token}`` puts the token in the URL, and aiohttp's exceptions and their
``repr`` can carry that URL, so aiohttp errors are never chained or re-raised: each becomes a
fresh :class:`TrafficCopUnavailable` whose message names the call by its route template
(``DELETE /v1/sessions/{token}``), raised outside the ``except`` block so that not even
``__context__`` holds the original.

Exception tree::

    Exception
     └── TrafficCopError             base of everything this client raises
          ├── TrafficCopUnavailable  network error, timeout, 5xx, a body that is not the JSON
          │                          expected, discovery failure: retry later, fail closed
          └── TrafficCopRejected     a 4xx the call does not expect: a request Traffic Cop
                                     refuses (bad input, 413) or a wrong service key (401
                                     ``unauthorized``); ``status`` and ``code`` say which

A 401 about the *session* (``code`` ``session_invalid``) is an answer, not an error:
:meth:`TrafficCopClient.validate` returns ``None`` and
:meth:`TrafficCopClient.register_connection` returns ``False``. A 401 about the *service key*
raises :class:`TrafficCopRejected`, so a misconfigured key shows up as an error in the
caller's logs instead of every user's token looking invalid.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

__all__ = [
    "SESSION_INVALID_CODE",
    "SessionInfo",
    "TrafficCopClient",
    "TrafficCopError",
    "TrafficCopRejected",
    "TrafficCopUnavailable",
]

log = logging.getLogger(__name__)

#: ``error.code`` of Traffic Cop's 401 answers about a session (unknown, expired, revoked);
#: a 401 with any other code is about the caller's service key.
SESSION_INVALID_CODE = "session_invalid"


class TrafficCopError(Exception):
    """Base of every error :class:`TrafficCopClient` raises; see the module docstring."""


class TrafficCopUnavailable(TrafficCopError):
    """Traffic Cop could not be reached or answered unusably (network, timeout, 5xx, bad JSON)."""


class TrafficCopRejected(TrafficCopError):
    """Traffic Cop refused the request with a 4xx the call does not expect."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A valid session, as ``POST /v1/sessions/validate`` describes it."""

    session_id: str
    user_id: str
    expires_at: float  # unix seconds
    metadata: dict[str, Any]


def _unix_seconds(value: Any) -> float:
    """``expires_at`` from the wire (ISO-8601 UTC, or unix seconds) as unix seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError(f"expires_at {value!r} has no time zone")
        return parsed.timestamp()
    raise ValueError(f"expires_at has type {type(value).__name__}")


class _Answer:
    """One HTTP answer, read completely (status, JSON body or ``None``, error code)."""

    __slots__ = ("body", "code", "status")

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        self.code = code if isinstance(code, str) else ""


class TrafficCopClient:
    """Calls Traffic Cop with ``Authorization: Bearer <service_key>``.

    ``base_url`` is either a fixed URL or a coroutine function returning one (discovery:
    resolved on every call, so a Traffic Cop that moves is followed; the resolver is expected
    to cache). ``timeout`` bounds each call end to end; ``pool_limit`` bounds the connections
    kept to Traffic Cop.
    """

    def __init__(
        self,
        base_url: str | Callable[[], Awaitable[str]],
        service_key: str,
        *,
        timeout: float = 5.0,
        pool_limit: int = 100,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if pool_limit < 1:
            raise ValueError(f"pool_limit must be at least 1, not {pool_limit!r}")
        self._base_url = base_url
        self._headers = {
            "Authorization": f"Bearer {service_key}",
            "Accept": "application/json",
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._pool_limit = pool_limit
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        target = self._base_url if isinstance(self._base_url, str) else "<discovery>"
        return f"TrafficCopClient({target!r})"

    # -- the API -------------------------------------------------------------------------

    async def create_session(
        self,
        user_id: str,
        ttl_seconds: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Issue a session; the 201 body ``{session_token, session_id, user_id, expires_at}``."""
        body: dict[str, Any] = {"user_id": user_id}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if metadata is not None:
            body["metadata"] = metadata
        route = "POST /v1/sessions"
        answer = await self._call("POST", "/v1/sessions", route, body)
        if answer.status != 201:
            raise self._unexpected(route, answer)
        if not isinstance(answer.body, dict) or not isinstance(
            answer.body.get("session_token"), str
        ):
            raise TrafficCopUnavailable(f"{route}: the answer lacks session_token")
        return answer.body

    async def validate(self, token: str) -> SessionInfo | None:
        """The session behind ``token``; ``None`` when it is unknown, expired or revoked."""
        route = "POST /v1/sessions/validate"
        answer = await self._call("POST", "/v1/sessions/validate", route, {"session_token": token})
        if answer.status == 401 and answer.code == SESSION_INVALID_CODE:
            return None
        if answer.status != 200:
            raise self._unexpected(route, answer)
        body = answer.body
        error: TrafficCopUnavailable | None = None
        try:
            if not isinstance(body, dict):
                raise ValueError("the answer is not a JSON object")
            session_id, user_id = body["session_id"], body["user_id"]
            metadata = body.get("metadata") or {}
            if not isinstance(session_id, str) or not isinstance(user_id, str):
                raise ValueError("session_id and user_id must be strings")
            if not isinstance(metadata, dict):
                raise ValueError("metadata must be an object")
            return SessionInfo(session_id, user_id, _unix_seconds(body["expires_at"]), metadata)
        except (KeyError, ValueError) as exc:
            error = TrafficCopUnavailable(f"{route}: malformed answer: {exc}")
        raise error

    async def revoke(self, token: str) -> bool:
        """Revoke the session; ``False`` when Traffic Cop does not know the token."""
        return await self._delete("DELETE /v1/sessions/{token}", "/v1/sessions/", token)

    async def register_connection(
        self, connection_id: str, session_id: str, user_id: str, gateway_instance: str
    ) -> bool:
        """Tie a connection to its session; ``False`` when the session is gone (revoked)."""
        route = "POST /v1/connections"
        body = {
            "connection_id": connection_id,
            "session_id": session_id,
            "user_id": user_id,
            "gateway_instance": gateway_instance,
        }
        answer = await self._call("POST", "/v1/connections", route, body)
        if answer.status == 201:
            return True
        if answer.status == 401 and answer.code == SESSION_INVALID_CODE:
            return False
        raise self._unexpected(route, answer)

    async def unregister_connection(self, connection_id: str) -> bool:
        """Forget a connection; ``False`` when Traffic Cop does not know it."""
        return await self._delete(
            "DELETE /v1/connections/{connection_id}", "/v1/connections/", connection_id
        )

    async def _delete(self, route: str, collection: str, item: str) -> bool:
        """``DELETE collection/item``: True on 204, False on 404 (unknown), else an error."""
        answer = await self._call("DELETE", collection + quote(item, safe=""), route, None)
        if answer.status == 204:
            return True
        if answer.status == 404:
            return False
        raise self._unexpected(route, answer)

    async def ping(self) -> None:
        """``GET /health``; raises :class:`TrafficCopUnavailable` unless it answers 200."""
        route = "GET /health"
        answer = await self._call("GET", "/health", route, None)
        if answer.status != 200:
            raise TrafficCopUnavailable(f"{route}: HTTP {answer.status}")

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- plumbing ------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_limit, keepalive_timeout=30),
                timeout=self._timeout,
                headers=self._headers,
            )
        return self._session

    async def _resolve(self, route: str) -> str:
        if isinstance(self._base_url, str):
            return self._base_url.rstrip("/")
        error: TrafficCopUnavailable | None = None
        try:
            return (await self._base_url()).rstrip("/")
        except Exception as exc:  # any discovery failure means "cannot reach Traffic Cop now"
            error = TrafficCopUnavailable(f"{route}: cannot locate Traffic Cop: {exc}")
        raise error

    async def _call(self, method: str, path: str, route: str, body: Any) -> _Answer:
        """One request, read to the end. ``route`` names it in errors instead of the URL."""
        url = URL(await self._resolve(route) + path, encoded=True)
        data = None if body is None else orjson.dumps(body)
        headers = None if body is None else {"Content-Type": "application/json"}
        error: TrafficCopUnavailable | None = None
        try:
            async with self._client().request(method, url, data=data, headers=headers) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError:
            error = TrafficCopUnavailable(f"{route}: no answer within {self._timeout.total}s")
        except aiohttp.ClientError as exc:
            # Only the class name: aiohttp messages may quote the URL, and the URL may hold a token.
            error = TrafficCopUnavailable(f"{route}: {type(exc).__name__}{_safe_detail(exc)}")
        if error is not None:
            raise error
        if status >= 500:
            raise TrafficCopUnavailable(f"{route}: HTTP {status}")
        parsed: Any = None
        if raw:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                error = TrafficCopUnavailable(
                    f"{route}: HTTP {status} with a body that is not JSON"
                )
            if error is not None:
                raise error
        return _Answer(status, parsed)

    @staticmethod
    def _unexpected(route: str, answer: _Answer) -> TrafficCopError:
        if 400 <= answer.status < 500:
            message = ""
            if isinstance(answer.body, dict) and isinstance(answer.body.get("error"), dict):
                detail = answer.body["error"].get("message")
                message = f": {detail}" if isinstance(detail, str) else ""
            log.warning("traffic cop refused %s: HTTP %d %s", route, answer.status, answer.code)
            return TrafficCopRejected(
                f"{route}: HTTP {answer.status} {answer.code}{message}", answer.status, answer.code
            )
        return TrafficCopUnavailable(f"{route}: unexpected HTTP {answer.status}")


def _safe_detail(exc: aiohttp.ClientError) -> str:
    """The part of an aiohttp error that never holds a URL path: host and OS error for
    connection failures, nothing for the rest."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f": cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or 'refused'})"
    return ""
