"""Consumer groups over HTTP: the group SSE stream, acks, acks in a reply, dead letters.

``GET /v1/channels/{channel}/groups/{group}/events?consumer=<name>`` is one consumer of the
group (created at ``0`` with the stream if missing). Redis hands each stream entry to exactly
one consumer of the group; the event ``id`` is the stream id, and the data is the agent message
with ``stream_id``, ``channel``, ``group`` and ``deliveries`` added. A consumer holds at most
``GROUP_MAX_IN_FLIGHT`` unacked entries: it is sent more as it acks, through any API instance
or a raw ``XACK`` (each step reads the consumer's pending list in Redis, so acks made elsewhere
count). Entries the eviction worker handed to this consumer (reclaimed from a dead one) and
entries left pending by an earlier stream of the same consumer name are sent too; with
``Last-Event-ID`` those up to that id are taken as received and not sent again.

A message read from Redis while the client leaves stays in the consumer's pending list: the
consumer gets it again when it comes back, or the worker hands it to another consumer after
``ACK_TIMEOUT_SECONDS``. Delivery is at least once; agents dedupe by ``message_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from redis.exceptions import RedisError

from services.post_office_api import metrics
from services.post_office_api.auth import REALM_CAPABILITIES, Capability
from services.post_office_api.groups import GROUPS_CLIENT_NAME, GroupConsumers, GroupsFull
from services.post_office_api.keys import GROUPS, SETTINGS
from services.post_office_api.params import channel_param, fail
from shared.http import json_response
from shared.protocol import ErrorCode
from shared.redis_client import make_redis
from shared.service import REDIS
from shared.streams import (
    Entry,
    is_valid_consumer_name,
    is_valid_group_name,
    is_valid_stream_id,
)

__all__ = [
    "ack_group",
    "ack_in_reply",
    "check_reply_ack",
    "consume_group",
    "end_group_streams",
    "groups_context",
    "list_dead_letters",
    "requeue_dead_letters",
]

log = logging.getLogger(__name__)


async def groups_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the clients of the group streams (the blocking reads get a pool of
    their own: a read waits up to GROUP_BLOCK_SECONDS holding its connection)."""
    settings = app[SETTINGS]
    blocking = make_redis(
        settings.redis_url,
        max_connections=settings.group_max_consumers,
        socket_timeout=settings.group_block_seconds + 5.0,
        name=GROUPS_CLIENT_NAME,
    )
    app[GROUPS] = GroupConsumers(app[REDIS], blocking, settings.group_max_consumers)
    try:
        yield
    finally:
        await blocking.aclose()


async def end_group_streams(app: web.Application) -> None:
    groups = app.get(GROUPS)
    if groups is not None:
        log.info("draining: ending %d group stream(s)", len(groups.open))
        groups.close_all()


# -- parameters -------------------------------------------------------------------------------


def _group(request: web.Request) -> str:
    group = request.match_info["group"]
    if not is_valid_group_name(group):
        fail(400, ErrorCode.BAD_REQUEST, f"malformed group {group[:80]!r}: [A-Za-z0-9_.-]{{1,64}}")
    return group


def _ids(raw: Any, limit: int, what: str = "ids") -> list[str]:
    if not isinstance(raw, list) or not raw:
        fail(400, ErrorCode.BAD_REQUEST, f'"{what}" must be a non-empty list of stream ids')
    if len(raw) > limit:
        fail(400, ErrorCode.BAD_REQUEST, f'"{what}" names {len(raw)} ids; at most {limit}')
    bad = [i for i in raw if not is_valid_stream_id(i)]
    if bad:
        fail(400, ErrorCode.BAD_REQUEST, f"malformed stream id {str(bad[0])[:40]!r}: <ms>-<seq>")
    return list(dict.fromkeys(raw))


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        fail(400, ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc.msg}")
    if not isinstance(body, dict):
        fail(400, ErrorCode.BAD_REQUEST, "body must be a JSON object")
    return body


def _event(entry: Entry, channel: str, group: str) -> str:
    try:
        message = orjson.loads(entry.data)
    except orjson.JSONDecodeError:
        message = None
    if not isinstance(message, dict):
        # Something else than a Post Office publisher appended it: still delivered (it must
        # be acked or it comes back), marked so the agent can tell.
        message = {"invalid": True, "data": entry.data.decode("utf-8", "replace")}
    message.update(
        stream_id=entry.id, channel=channel, group=group, deliveries=max(1, entry.deliveries)
    )
    return orjson.dumps(message).decode()


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


# -- handlers ---------------------------------------------------------------------------------


async def consume_group(request: web.Request) -> web.StreamResponse:
    """One consumer of a group, over Server-Sent Events (see the module docstring)."""
    channel = channel_param(request)
    group = _group(request)
    consumer = request.query.get("consumer", "")
    if not is_valid_consumer_name(consumer):
        fail(
            400,
            ErrorCode.BAD_REQUEST,
            "the consumer query parameter is required: [A-Za-z0-9_.:-]{1,128}, stable across "
            "reconnects (a replica's name)",
        )
    settings = request.app[SETTINGS]
    in_flight = settings.group_max_in_flight
    raw_limit = request.query.get("max_in_flight")
    if raw_limit is not None:
        if not (raw_limit.isascii() and raw_limit.isdigit() and 0 < int(raw_limit) <= in_flight):
            fail(400, ErrorCode.BAD_REQUEST, f"max_in_flight must be an integer 1-{in_flight}")
        in_flight = int(raw_limit)
    last_id = request.headers.get("Last-Event-ID") or None
    if last_id is not None and not is_valid_stream_id(last_id):
        fail(400, ErrorCode.BAD_REQUEST, "Last-Event-ID must be a stream id <ms>-<seq>")
    groups = request.app[GROUPS]
    if groups.closing.is_set():
        fail(503, ErrorCode.UNAVAILABLE, "this process is draining", {"Retry-After": "1"})
    await groups.streams.ensure_group(channel, group)
    key = (channel, group, consumer)
    try:
        stop = groups.enter(key)
    except GroupsFull as exc:
        fail(503, ErrorCode.UNAVAILABLE, str(exc), {"Retry-After": "5"})
    stream = EventSourceResponse(
        ping_interval=settings.sse_keepalive_seconds,
        send_timeout=settings.sse_send_timeout_seconds,
    )
    watcher: asyncio.Task[None] | None = None
    block_ms = max(1, int(settings.group_block_seconds * 1000))
    try:
        await stream.prepare(request)
        async with stream:
            watcher = asyncio.create_task(stream.wait(), name="group-sse-client-watch")
            watcher.add_done_callback(lambda _t: stop.set())
            await stream.write(
                f"retry: {settings.sse_retry_ms}\r\n: subscribed to {channel} as {group}/{consumer}"
                "\r\n\r\n".encode()
            )
            # Sent on this stream and still pending, with the delivery count it had then: a
            # higher count means the worker handed it back to this consumer (it holds it
            # again after ACK_TIMEOUT_SECONDS), so it is sent again.
            sent: dict[str, int] = {}
            first = True
            while not stop.is_set():
                step = await groups.streams.consume_step(
                    channel, group, consumer, in_flight, list(sent)
                )
                pending = step.pending
                again = [i for i, n in sent.items() if i in pending and pending[i] > n]
                sent = {i: n for i, n in sent.items() if i in pending}
                out = step.unsent
                if again:
                    data = await groups.streams.entries(channel, again)
                    out += [Entry(i, data[i], pending[i]) for i in again if i in data]
                out = sorted(out, key=lambda e: _id_key(e.id))
                if first and last_id is not None:
                    # Received before the reconnect (the client says so): not sent again.
                    cut = _id_key(last_id)
                    for entry in out:
                        if _id_key(entry.id) <= cut:
                            sent[entry.id] = entry.deliveries
                    out = [e for e in out if _id_key(e.id) > cut]
                first = False
                out += step.fresh
                room = in_flight - len(pending) - len(step.fresh)
                if not out:
                    if room > 0:
                        out = await groups.blocking.read_new(
                            channel, group, consumer, room, block_ms
                        )
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), settings.group_poll_seconds)
                for entry in out:
                    sent[entry.id] = entry.deliveries
                    await stream.send(_event(entry, channel, group), id=entry.id)
                    metrics.GROUP_EVENTS.inc()
    except (ConnectionResetError, TimeoutError) as exc:
        log.info("group stream %s/%s/%s ended: %r", channel, group, consumer, exc)
    except RedisError as exc:
        # Redis went away mid-stream (or NOGROUP: the group was destroyed under it). The
        # headers are out, so no 503 can be sent: the stream ends and the client reconnects
        # with its backoff; what this consumer holds stays pending for it.
        log.warning("group stream %s/%s/%s ended by redis: %r", channel, group, consumer, exc)
    finally:
        groups.leave(key, stop)
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])
    return stream


async def ack_group(request: web.Request) -> web.Response:
    """``{"ids": [...]}``: ack a batch of the group's entries; answers how many were pending."""
    channel = channel_param(request)
    group = _group(request)
    body = await _json_object(request)
    if set(body) - {"ids"}:
        fail(400, ErrorCode.BAD_REQUEST, 'the body has one field: "ids"')
    ids = _ids(body.get("ids"), request.app[SETTINGS].group_max_ack_ids)
    acked = await request.app[GROUPS].streams.ack(channel, group, ids)
    metrics.GROUP_ACKS.inc(acked)
    return json_response({"acked": acked, "ids": len(ids)})


async def ack_in_reply(request: web.Request, ack: tuple[str, str, list[str]]) -> int:
    """Ack what :func:`check_reply_ack` accepted (the ``ack`` of a reply); how many were
    pending."""
    channel, group, ids = ack
    acked = await request.app[GROUPS].streams.ack(channel, group, ids)
    metrics.GROUP_ACKS.inc(acked)
    return acked


def check_reply_ack(request: web.Request, realm: str, raw: Any) -> tuple[str, str, list[str]]:
    """Validate the ``ack`` field of a reply (400/403/404 before anything is sent)."""
    if Capability.AGENT_CHANNEL_SUBSCRIBE not in REALM_CAPABILITIES.get(realm, frozenset()):
        fail(
            403,
            ErrorCode.FORBIDDEN,
            f"realm {realm!r} lacks the capability agent_channel_subscribe needed by ack",
        )
    if not isinstance(raw, dict) or set(raw) - {"channel", "group", "id", "ids"}:
        fail(400, ErrorCode.BAD_REQUEST, '"ack" must be {"channel", "group", "ids"} (or "id")')
    settings = request.app[SETTINGS]
    channel = raw.get("channel")
    if channel not in settings.channels:
        fail(404, ErrorCode.UNKNOWN_CHANNEL, f"ack: unknown channel {str(channel)[:64]!r}")
    group = raw.get("group")
    if not is_valid_group_name(group):
        fail(400, ErrorCode.BAD_REQUEST, "ack: malformed or missing group")
    ids = raw.get("ids", [raw["id"]] if "id" in raw else None)
    return str(channel), str(group), _ids(ids, settings.group_max_ack_ids, "ack.ids")


async def list_dead_letters(request: web.Request) -> web.Response:
    """``?after=<id>&limit=N``: the channel's dead letters, oldest first."""
    channel = channel_param(request)
    after = request.query.get("after", "-")
    if after != "-" and not is_valid_stream_id(after):
        fail(400, ErrorCode.BAD_REQUEST, "after must be a stream id <ms>-<seq>")
    raw_limit = request.query.get("limit", "100")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 0 < int(raw_limit) <= 1000):
        fail(400, ErrorCode.BAD_REQUEST, "limit must be an integer 1-1000")
    letters = await request.app[GROUPS].streams.dead_letters(channel, after, int(raw_limit))
    out = []
    for letter in letters:
        try:
            message: Any = orjson.loads(letter.data)
        except orjson.JSONDecodeError:
            message = letter.data.decode("utf-8", "replace")
        out.append(
            {
                "id": letter.id,
                "stream_id": letter.stream_id,
                "group": letter.group,
                "deliveries": letter.deliveries,
                "reason": letter.reason,
                "dead_at": letter.dead_at,
                "message": message,
            }
        )
    return json_response(
        {"dead_letters": out, "next": out[-1]["id"] if len(out) == int(raw_limit) else None}
    )


async def requeue_dead_letters(request: web.Request) -> web.Response:
    """``{"ids": [...]}``: append those dead letters to the stream again (new stream ids)."""
    channel = channel_param(request)
    body = await _json_object(request)
    if set(body) - {"ids"}:
        fail(400, ErrorCode.BAD_REQUEST, 'the body has one field: "ids"')
    ids = _ids(body.get("ids"), request.app[SETTINGS].group_max_ack_ids)
    new = await request.app[GROUPS].streams.requeue(channel, ids)
    requeued = [{"id": i, "stream_id": s} for i, s in zip(ids, new, strict=True) if s]
    unknown = [i for i, s in zip(ids, new, strict=True) if not s]
    metrics.DEAD_LETTERS_REQUEUED.inc(len(requeued))
    return json_response({"requeued": requeued, "unknown": unknown})
