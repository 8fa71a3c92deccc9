"""An async client of the Post Office HTTP API, for agents written in Python.

::

    async with PostOfficeClient("http://127.0.0.1:8200", "dev-smart_city") as po:
        async for msg in po.subscribe("guide"):
            await po.send_to_connection(msg.connection_id, {"type": "response", ...})

One ``aiohttp.ClientSession`` per client (keep-alive), every answer typed, every failure a
:class:`~post_office_client.errors.PostOfficeError` subclass carrying the status and the API's
error code. :meth:`PostOfficeClient.subscribe` reads the Server-Sent Events stream of a
channel and, unless told not to, reconnects with capped, jittered exponential backoff when the
stream breaks (the API restarts, the network drops, the server found the reader too slow),
sending ``Last-Event-ID``. That stream is the channel's tap, at most once: messages published
while no stream was open are not replayed. Agents that must handle every message once consume
a group instead (:class:`post_office_client.consumer.GroupConsumer`).

One bad event never ends a subscription: an event that is not an agent message, or larger
than ``max_event_bytes``, is skipped (and logged), and the stream goes on.

Deliveries (:meth:`~PostOfficeClient.publish`, ``send_to_connection``, ``send_to_user``,
``broadcast``) are retried for up to ``retry_deadline`` seconds when retrying is safe: a 429 or
a 503 (the API refused before delivering anything) and a connection that failed (status 0
``connection_failed``: the API was not reached or went away). Each retry waits the same backoff
as the server (``post_office_client._backoff``), or the answer's ``Retry-After`` when longer; a
wait that would pass the deadline is not started and the last error is raised. A timeout
(status 0 ``timeout``) is not retried: the API may have delivered, and a second copy would be a
duplicate. A retry after a dropped connection can still duplicate (the API may have delivered
before it went away); every copy carries the same message, so a receiver that keys on
``message_id`` / ``in_reply_to`` drops it."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from post_office_client._backoff import backoff
from post_office_client.errors import PostOfficeError, StreamError, Unavailable, error_for
from post_office_client.models import (
    AgentMessage,
    BroadcastResult,
    PublishResult,
    UserDelivery,
    WebSocketEndpoint,
)

__all__ = ["PostOfficeClient", "Subscription"]

log = logging.getLogger(__name__)

#: Statuses that retrying cannot fix: a subscription raises them instead of reconnecting.
_FATAL = frozenset({400, 401, 403, 404, 405})
#: Default largest SSE event a subscription reads; the API forwards at most 4 MiB.
DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024
#: A stream that lasted this long (or delivered an event) was healthy: the reconnect backoff
#: starts over. A stream that opens and ends at once keeps the backoff growing.
HEALTHY_STREAM_SECONDS = 5.0
#: The longest ``Retry-After`` a subscription honours.
MAX_RETRY_AFTER = 300.0
#: Statuses of a delivery that refused before doing anything: safe to send again.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Status-0 codes that are safe enough to retry (the API was not reached, or dropped the
#: connection); a ``timeout`` is not among them: the API may have delivered.
_RETRY_CODES = frozenset({"connection_failed"})
#: What an over-long line is replaced with by the line reader.
_OVERSIZED = object()
#: The shape of a W3C traceparent; only such a value is also sent as the header.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")


class _Invalid(Exception):
    """An answer of the wrong shape (a 2xx whose body lacks a field)."""


def _segment(value: str) -> str:
    return quote(value, safe="")


class PostOfficeClient:
    """Calls of ``/v1`` as a realm (``Authorization: Bearer <realm_key>``)."""

    def __init__(
        self,
        base_url: str,
        realm_key: str,
        *,
        timeout: float = 10.0,
        session: aiohttp.ClientSession | None = None,
        retry_deadline: float = 0.0,
        retry_base: float = 0.1,
        retry_cap: float = 5.0,
    ) -> None:
        """``retry_deadline``: seconds a delivery keeps retrying what is safe to retry (0: no
        retry); ``retry_base`` and ``retry_cap`` shape the backoff between tries."""
        self.base_url = base_url.rstrip("/")
        self.retry_deadline = retry_deadline
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        #: Deliveries sent again after a refusal or a dropped connection (for metrics, tests).
        self.retries = 0
        # Sent with every request (not set on the session): a caller's session gets them too.
        self._headers = {"Authorization": f"Bearer {realm_key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None
        self._closed = False

    def __repr__(self) -> str:  # the realm key stays out of reprs and logs
        return f"PostOfficeClient({self.base_url!r})"

    async def __aenter__(self) -> PostOfficeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client (and its session, unless the caller gave one). Calls made after
        this raise ``RuntimeError``."""
        self._closed = True
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this PostOfficeClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        elif self._session.closed:
            raise RuntimeError("the aiohttp session given to PostOfficeClient is closed")
        return self._session

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**self._headers, **extra} if extra else dict(self._headers)

    def url(self, path: str) -> URL:
        return URL(self.base_url + path, encoded=True)

    # -- calls --------------------------------------------------------------------------------

    async def publish(
        self, channel: str, message: dict[str, Any], *, traceparent: str | None = None
    ) -> PublishResult:
        """Publish an agent message on ``channel`` (queued while no agent listens)."""
        body = await self._deliver(
            "POST", f"/v1/channels/{_segment(channel)}/messages", _body(message, traceparent)
        )
        return _typed(
            body,
            lambda: PublishResult(message_id=_str(body, "message_id"), status=_str(body, "status")),
        )

    async def send_to_connection(
        self,
        connection_id: str,
        message: dict[str, Any],
        *,
        traceparent: str | None = None,
        ack: dict[str, Any] | None = None,
    ) -> int:
        """Deliver ``message`` to one connection; the number of gateways that received it.
        Raises :class:`~post_office_client.errors.Gone` when the connection no longer exists.
        ``ack`` (``{"channel", "group", "ids"}``) acks those stream entries in the same call,
        once the frame went out or the connection is gone."""
        payload = _body(message, traceparent)
        if ack is not None:
            payload["ack"] = ack
        body = await self._deliver(
            "POST", f"/v1/connections/{_segment(connection_id)}/messages", payload
        )
        return _typed(body, lambda: _int(body, "delivered"))

    async def ack(self, channel: str, group: str, ids: list[str]) -> int:
        """Ack stream entries of a consumer group in one call; how many were still pending
        (acking again is harmless, so it is retried like a delivery)."""
        body = await self._deliver(
            "POST",
            f"/v1/channels/{_segment(channel)}/groups/{_segment(group)}/acks",
            {"ids": ids},
        )
        return _typed(body, lambda: _int(body, "acked"))

    async def send_to_user(
        self, user_id: str, message: dict[str, Any], *, traceparent: str | None = None
    ) -> UserDelivery:
        body = await self._deliver(
            "POST", f"/v1/users/{_segment(user_id)}/messages", _body(message, traceparent)
        )
        return _typed(
            body,
            lambda: UserDelivery(
                delivered=_int(body, "delivered"),
                connections=_int(body, "connections"),
                stale_removed=_int(body, "stale_removed"),
            ),
        )

    async def broadcast(
        self, channel: str, message: dict[str, Any], *, traceparent: str | None = None
    ) -> BroadcastResult:
        body = await self._deliver(
            "POST", f"/v1/channels/{_segment(channel)}/broadcast", _body(message, traceparent)
        )
        return _typed(
            body,
            lambda: BroadcastResult(
                gateways=_int(body, "gateways"), connections=_int(body, "connections")
            ),
        )

    async def get_connection(self, connection_id: str) -> dict[str, Any]:
        body = await self._call("GET", f"/v1/connections/{_segment(connection_id)}")
        return body

    async def close_connection(
        self, connection_id: str, *, code: int = 1000, reason: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, str] = {"code": str(code)}
        if reason is not None:
            params["reason"] = reason
        return await self._call(
            "DELETE", f"/v1/connections/{_segment(connection_id)}", params=params
        )

    async def websocket_endpoint(self, session_token: str) -> WebSocketEndpoint:
        body = await self._call(
            "GET", "/v1/websocket-endpoint", params={"session_token": session_token}
        )

        def build() -> WebSocketEndpoint:
            channels = body.get("channels")
            message_format = body.get("message_format")
            if not isinstance(channels, list) or not isinstance(message_format, dict):
                raise _Invalid("channels or message_format")
            return WebSocketEndpoint(
                websocket_url=_str(body, "websocket_url"),
                channels=tuple(str(c) for c in channels),
                message_format=message_format,
            )

        return _typed(body, build)

    def subscribe(
        self,
        channel: str,
        *,
        reconnect: bool = True,
        backoff_min: float = 0.1,
        backoff_max: float = 10.0,
        idle_timeout: float = 60.0,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> Subscription:
        """The channel's agent messages as an async iterator (also an async context manager,
        whose entry waits until the stream is open). ``idle_timeout``: a stream silent for that
        long (no event, no keep-alive) counts as broken. ``max_event_bytes``: larger events
        are skipped."""
        return Subscription(
            self,
            channel,
            reconnect=reconnect,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            idle_timeout=idle_timeout,
            max_event_bytes=max_event_bytes,
        )

    # -- plumbing -----------------------------------------------------------------------------

    async def _deliver(self, method: str, path: str, json_body: dict[str, Any]) -> dict[str, Any]:
        """:meth:`_call`, retried within ``retry_deadline`` while retrying is safe."""
        deadline = time.monotonic() + self.retry_deadline
        attempt = 0
        while True:
            try:
                return await self._call(method, path, json_body)
            except PostOfficeError as exc:
                if not _retryable(exc):
                    raise
                delay = backoff(attempt, self.retry_base, self.retry_cap)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER))
                if time.monotonic() + delay > deadline:
                    raise
                attempt += 1
                self.retries += 1
                log.info("%s %s: %s; retry %d in %.2fs", method, path, exc, attempt, delay)
                await asyncio.sleep(delay)

    async def _call(
        self,
        method: str,
        path: str,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        data = None if json_body is None else orjson.dumps(json_body)
        extra = {"Content-Type": "application/json"} if data is not None else None
        traceparent = json_body.get("traceparent") if json_body is not None else None
        if extra is not None and isinstance(traceparent, str) and _TRACEPARENT.match(traceparent):
            # The body's traceparent is the delivery contract; the W3C header too lets any
            # HTTP hop (proxy, the API's tracing) continue the trace without reading the body.
            extra["traceparent"] = traceparent
        headers = self.headers(extra)
        try:
            async with self.session.request(
                method,
                self.url(path),
                data=data,
                params=params,
                headers=headers,
                timeout=self._timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _error(resp.status, raw, resp.headers.get("Retry-After"))
        except aiohttp.ClientError as exc:
            raise Unavailable(0, "connection_failed", f"{method} {path}: {exc!r}") from exc
        except TimeoutError as exc:
            raise Unavailable(0, "timeout", f"{method} {path} timed out") from exc
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PostOfficeError(resp.status, "invalid_response", "answer is not JSON") from exc
        if not isinstance(body, dict):
            raise PostOfficeError(resp.status, "invalid_response", "answer is not an object")
        return body


def _body(message: dict[str, Any], traceparent: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message}
    if traceparent is not None:
        body["traceparent"] = traceparent
    return body


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise _Invalid(name)
    return value


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(name)
    return value


T = TypeVar("T")


def _typed(body: dict[str, Any], build: Callable[[], T]) -> T:
    """``build()``, or :class:`PostOfficeError` ``invalid_response`` when a field is missing or
    of the wrong type (an API of another version, a proxy's page)."""
    try:
        return build()
    except _Invalid as exc:
        raise PostOfficeError(
            200, "invalid_response", f"answer lacks a valid {exc}: {str(body)[:200]}"
        ) from None


def _retryable(exc: PostOfficeError) -> bool:
    if exc.status == 0:
        return exc.code in _RETRY_CODES
    return exc.status in _RETRY_STATUSES


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds form; an HTTP date is ignored)."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return float(min(int(value), 86400))


def _error(status: int, raw: bytes, retry_after: str | None = None) -> PostOfficeError:
    code, message = "http_error", raw[:200].decode("utf-8", "replace")
    try:
        parsed = orjson.loads(raw)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
    except orjson.JSONDecodeError:
        pass
    return error_for(status, code, message, retry_after=_retry_after(retry_after))


class Subscription:
    """A channel's SSE stream; iterate it for :class:`AgentMessage` objects.

    ``reconnects`` counts re-opened streams; ``last_event_id`` is the id of the last event
    read (sent as ``Last-Event-ID`` when reconnecting); ``skipped`` counts events that were
    not agent messages or were larger than ``max_event_bytes``. ``connected`` is set while a
    stream is open. Fatal answers (400, 401, 403, 404, 405) are raised, never retried.

    Every re-open waits a capped, jittered exponential backoff (or the server's
    ``Retry-After``, when longer); the backoff starts over only after a stream that delivered
    an event or lasted :data:`HEALTHY_STREAM_SECONDS`, so a stream that opens and ends at
    once cannot make the client spin.
    """

    def __init__(
        self,
        client: PostOfficeClient,
        channel: str,
        *,
        reconnect: bool,
        backoff_min: float,
        backoff_max: float,
        idle_timeout: float,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.client = client
        self.channel = channel
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_min, backoff_max)
        self.idle_timeout = idle_timeout
        self.max_event_bytes = max_event_bytes
        self.last_event_id: str | None = None
        self.reconnects = 0
        self.skipped = 0
        self.connected = asyncio.Event()
        self._response: aiohttp.ClientResponse | None = None
        self._buffer = bytearray()
        self._discarding = False
        self._opened_once = False
        self._closed = False
        self._attempt = 0
        self._retry_after: float | None = None
        self._opened_at = 0.0
        self._events_in_stream = 0

    def __aiter__(self) -> Subscription:
        return self

    async def __aenter__(self) -> Subscription:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the stream now (retrying while the API is unreachable, if reconnecting)."""
        if self._response is None:
            await self._connect_with_retry()

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()

    async def __anext__(self) -> AgentMessage:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._response is None:
                await self._connect_with_retry()
            try:
                event = await self._read_event()
            except (aiohttp.ClientError, TimeoutError, ConnectionError, HttpProcessingError) as exc:
                log.info("stream of %s broke: %r", self.channel, exc)
                event = None
            if event is None:
                await self._drop()
                if self._closed:
                    raise StopAsyncIteration
                if not self.reconnect:
                    raise Unavailable(0, "stream_ended", f"the stream of {self.channel!r} ended")
                continue
            kind, data = event
            if kind == "message":
                self._events_in_stream += 1
                try:
                    return AgentMessage.from_json(data)
                except (ValueError, TypeError) as exc:
                    self.skipped += 1
                    log.warning(
                        "skipped an event of %s that is not an agent message: %s", self.channel, exc
                    )
                    continue
            if kind == "error":
                code, message = "stream_error", data[:200]
                try:
                    parsed = orjson.loads(data)
                    code = str(parsed.get("code", code))
                    message = str(parsed.get("message", message))
                except (orjson.JSONDecodeError, AttributeError):
                    pass
                await self._drop()
                if not self.reconnect:
                    raise StreamError(200, code, message)
                log.warning(
                    "stream of %s ended with %s (%s); reconnecting", self.channel, code, message
                )
                continue
            # Other event types are for other readers; skip them.

    # -- internals ----------------------------------------------------------------------------

    def _path(self) -> str:
        return f"/v1/channels/{_segment(self.channel)}/events"

    def _params(self) -> dict[str, str] | None:
        return None

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, self.backoff_min, self.backoff_max)

    async def _connect_with_retry(self) -> None:
        while True:
            if self._opened_once or self._attempt:
                # Every re-open waits, whatever ended the previous stream.
                delay = self._backoff(self._attempt)
                if self._retry_after is not None:
                    delay = max(delay, min(self._retry_after, MAX_RETRY_AFTER))
                self._retry_after = None
                self._attempt += 1
                log.info(
                    "re-opening the stream of %s in %.2fs (attempt %d)",
                    self.channel,
                    delay,
                    self._attempt,
                )
                await asyncio.sleep(delay)
            try:
                await self._connect()
            except PostOfficeError as exc:
                if exc.status in _FATAL or not self.reconnect:
                    raise
                self._retry_after = exc.retry_after
                if not self._attempt:
                    self._attempt = 1
                log.info("subscribing to %s failed (%s)", self.channel, exc)
                continue
            if self._opened_once:
                self.reconnects += 1
            self._opened_once = True
            return

    async def _connect(self) -> None:
        headers = self.client.headers({"Accept": "text/event-stream"})
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        url = self.client.url(self._path())
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.idle_timeout)
        try:
            resp = await self.client.session.get(
                url, headers=headers, params=self._params(), timeout=timeout
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(
                0, "connection_failed", f"subscribe {self.channel!r}: {exc!r}"
            ) from exc
        if resp.status != 200:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            resp.release()
            raise _error(resp.status, raw, resp.headers.get("Retry-After"))
        if resp.content_type != "text/event-stream":
            resp.close()
            raise PostOfficeError(
                200,
                "invalid_response",
                f"subscribe {self.channel!r}: expected text/event-stream, "
                f"got {resp.content_type!r}",
            )
        self._response = resp
        self._buffer.clear()
        self._discarding = False
        self._opened_at = asyncio.get_running_loop().time()
        self._events_in_stream = 0
        self.connected.set()

    async def _drop(self) -> None:
        self.connected.clear()
        resp, self._response = self._response, None
        if resp is not None:
            lasted = asyncio.get_running_loop().time() - self._opened_at
            if self._events_in_stream or lasted >= HEALTHY_STREAM_SECONDS:
                self._attempt = 0
            resp.close()

    async def _readline(self, resp: aiohttp.ClientResponse) -> bytes | object | None:
        """The next line without its terminator; :data:`_OVERSIZED` for a line longer than
        ``max_event_bytes`` (dropped while reading, so memory stays bounded); None at the end
        of the stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if self._discarding:
                    self._discarding = False
                    return _OVERSIZED
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buffer) > self.max_event_bytes:
                self._buffer.clear()
                self._discarding = True
            chunk = await resp.content.readany()
            if not chunk:
                return None
            self._buffer.extend(chunk)

    async def _read_event(self) -> tuple[str, str] | None:
        """The next (event type, data) of the stream, or None at its end."""
        resp = self._response
        if resp is None:
            return None
        kind = "message"
        data: list[str] = []
        size = 0
        oversized = False
        while True:
            raw = await self._readline(resp)
            if raw is None:
                return None
            if raw is _OVERSIZED:
                oversized = True
                continue
            assert isinstance(raw, bytes)
            line = raw.decode("utf-8", "replace")
            if not line:
                if oversized:
                    self.skipped += 1
                    self._events_in_stream += 1
                    log.warning(
                        "skipped an event of %s larger than %d bytes",
                        self.channel,
                        self.max_event_bytes,
                    )
                elif data:
                    return kind, "\n".join(data)
                kind, data, size, oversized = "message", [], 0, False
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                size += len(raw)
                if size > self.max_event_bytes:
                    oversized = True
                    data = []
                elif not oversized:
                    data.append(value)
            elif name == "event":
                kind = value or "message"
            elif name == "id" and "\0" not in value:
                self.last_event_id = value or None
