"""Redis side of the API's calls: publishing to agent channels and delivering to sockets.

Handlers (handlers.py) parse and answer HTTP; this module does the Redis work, in as few round
trips as the semantics allow:

* to one connection: one script run checks the registry record and publishes the frame
  atomically, so "no record" really means nothing was sent;
* to a user: ``SMEMBERS`` and one pipeline of those script runs;
* broadcast: ``PUBLISH`` and ``SCARD`` in one pipeline.

Stale records: when a publish finds no receiver, the connection is gone. Its record is removed
(``Registry.unregister``, which announces ``disconnected``/``stale`` exactly once) only when the
holding gateway's liveness key has expired too. A live gateway that did not receive is most
likely re-subscribing after a Redis hiccup; removing the record then would make a connection
that is about to be reachable again unreachable for good, so the caller gets 410 for this
message and the record stays (idle eviction removes it if the socket is really gone). The
removal of a stale record is reported to Traffic Cop (``on_stale``, see stale.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from services.post_office_api import metrics
from shared import redis_names as names
from shared.protocol import iso_now, new_message_id
from shared.registry import PublishResult, Registry

__all__ = [
    "API_SOURCE",
    "BroadcastOutcome",
    "CloseOutcome",
    "Deliveries",
    "PublishOutcome",
    "SendOutcome",
    "UserOutcome",
]

#: ``gateway_instance`` of agent messages the API publishes (their ``connection_id`` and
#: ``user_id`` are empty): agents tell them apart from client messages by it.
API_SOURCE = "post-office-api"

# KEYS: 1 record hash, 2 the connection's message channel.
# ARGV: 1 frame text, 2 gateway liveness key template ("{}" = instance).
# Returns receivers (> 0 delivered); -1 no record; 0 nobody received and the holding gateway is
# dead too (stale: remove the record); -2 nobody received but the gateway is alive (keep it).
_SEND = """
local gateway = redis.call('HGET', KEYS[1], 'gateway_instance')
if not gateway then return -1 end
local n = redis.call('PUBLISH', KEYS[2], ARGV[1])
if n > 0 then return n end
if redis.call('EXISTS', (string.gsub(ARGV[2], '{}', gateway))) == 1 then return -2 end
return 0
"""

_T = "{}"  # the placeholder the script substitutes


def _text(value: bytes | str) -> str:
    # The clients here are built with decode_responses=False; stay correct either way.
    return value.decode() if isinstance(value, bytes) else value


class SendOutcome(enum.IntEnum):
    NO_RECORD = -1
    GATEWAY_ALIVE_NOT_RECEIVED = -2
    STALE = 0


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    status: str  # "published" | "queued" | "refused"
    message_id: str


@dataclass(frozen=True, slots=True)
class UserOutcome:
    delivered: int
    connections: int
    stale_removed: int


@dataclass(frozen=True, slots=True)
class BroadcastOutcome:
    gateways: int
    connections: int


class CloseOutcome(enum.Enum):
    SENT = "sent"  # the holding gateway received the close command
    NOT_FOUND = "not_found"  # no registry record
    GATEWAY_GONE = "gateway_gone"  # nobody received and the gateway is dead: record removed
    NOT_RECEIVED = "not_received"  # nobody received but the gateway is alive: retry later


class Deliveries:
    def __init__(
        self,
        redis: Redis,
        registry: Registry,
        *,
        stream_max_pending: int,
        on_stale: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.registry = registry
        self.stream_max_pending = stream_max_pending
        self.on_stale = on_stale
        self._send = redis.register_script(_SEND)

    async def publish(
        self, channel: str, message: dict[str, Any], traceparent: str, realm: str
    ) -> PublishOutcome:
        """Append an agent message (SPEC shape) to the channel's stream and its tap."""
        message_id = new_message_id()
        data = orjson.dumps(
            {
                "message_id": message_id,
                "connection_id": "",
                "user_id": "",
                "gateway_instance": API_SOURCE,
                "message": message,
                "timestamp": iso_now(),
                "traceparent": traceparent,
                "realm": realm,
            }
        )
        result = await self.registry.publish_or_queue(channel, data, self.stream_max_pending)
        status = {PublishResult.PUBLISHED: "published", PublishResult.QUEUED: "queued"}
        return PublishOutcome(status.get(result, "refused"), message_id)

    async def to_connection(self, connection_id: str, frame: bytes) -> int:
        """Receivers of ``frame`` (> 0), or a :class:`SendOutcome`; a stale record is removed."""
        result = int(
            await self._send(
                keys=[names.connection(connection_id), names.connection_messages(connection_id)],
                args=[frame, names.gateway_instance(_T)],
            )
        )
        if result == SendOutcome.STALE:
            await self._remove_stale(connection_id)
        return result

    async def to_user(self, user_id: str, frame: bytes) -> UserOutcome:
        members = await self.redis.smembers(names.user_connections(user_id))
        ids = sorted(_text(i) for i in members)
        if not ids:
            return UserOutcome(0, 0, 0)
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in ids:
                await self._send(
                    keys=[names.connection(cid), names.connection_messages(cid)],
                    args=[frame, names.gateway_instance(_T)],
                    client=pipe,
                )
            results = [int(r) for r in await pipe.execute()]
        delivered = sum(1 for r in results if r > 0)
        stale = [cid for cid, r in zip(ids, results, strict=True) if r == SendOutcome.STALE]
        orphans = [cid for cid, r in zip(ids, results, strict=True) if r == SendOutcome.NO_RECORD]
        for cid in stale:
            await self._remove_stale(cid)
        if orphans:
            # Set members whose record expired without an unregister (nothing else removes
            # them: the unregister script needs the record to find its index entries).
            await self.redis.srem(names.user_connections(user_id), *orphans)
        return UserOutcome(delivered, len(ids), len(stale) + len(orphans))

    async def broadcast(self, channel: str, frame: bytes) -> BroadcastOutcome:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(names.channel_broadcast(channel), frame)
            pipe.scard(names.channel_connections(channel))
            gateways, connections = await pipe.execute()
        return BroadcastOutcome(int(gateways), int(connections))

    async def close(self, connection_id: str, code: int, reason: str) -> tuple[CloseOutcome, str]:
        """Ask the holding gateway to close the socket; also returns that gateway's instance."""
        gateway = await self.redis.hget(names.connection(connection_id), "gateway_instance")
        if gateway is None:
            return CloseOutcome.NOT_FOUND, ""
        instance = _text(gateway)
        command = orjson.dumps(
            {"op": "close", "connection_id": connection_id, "code": code, "reason": reason}
        )
        if await self.redis.publish(names.gateway_control(instance), command) > 0:
            return CloseOutcome.SENT, instance
        if await self.redis.exists(names.gateway_instance(instance)):
            return CloseOutcome.NOT_RECEIVED, instance
        await self._remove_stale(connection_id, reason="gateway_lost")
        return CloseOutcome.GATEWAY_GONE, instance

    async def _remove_stale(self, connection_id: str, reason: str = "stale") -> None:
        if await self.registry.unregister(connection_id, event="disconnected", reason=reason) == 1:
            metrics.STALE_REMOVED.inc()
            if self.on_stale is not None:
                self.on_stale(connection_id)  # Traffic Cop forgets it too (stale.py)
