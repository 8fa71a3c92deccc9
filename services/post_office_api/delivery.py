"""Redis side of the API's calls: publishing to agent channels and delivering to sockets.

Handlers (handlers.py) parse and answer HTTP; this module decides what a delivery does, with
the registry (:mod:`shared.registry`, which owns the record layout and its scripts) doing the
Redis work, in as few round trips as the semantics allow:

* to one connection: one script run checks the registry record and publishes the frame
  atomically, so "no record" really means nothing was sent (:meth:`Registry.send`);
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
from shared.registry import Registry, SendResult, Sent, UnregisterResult
from shared.service_names import API_SERVICE

__all__ = [
    "API_SOURCE",
    "BroadcastOutcome",
    "CloseOutcome",
    "Deliveries",
    "PublishOutcome",
    "UserOutcome",
]

#: ``gateway_instance`` of agent messages the API publishes (their ``connection_id`` and
#: ``user_id`` are empty): agents tell them apart from client messages by it.
API_SOURCE = API_SERVICE.name


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
        return PublishOutcome(result.status, message_id)

    async def to_connection(self, connection_id: str, frame: bytes) -> Sent:
        """Send ``frame`` to one connection; a stale record is removed."""
        sent = await self.registry.send(connection_id, frame)
        if sent.result is SendResult.STALE:
            await self._remove_stale(connection_id)
        return sent

    async def to_user(self, user_id: str, frame: bytes) -> UserOutcome:
        ids = await self.registry.user_connections(user_id)
        if not ids:
            return UserOutcome(0, 0, 0)
        results = [s.result for s in await self.registry.send_many(ids, frame)]
        delivered = results.count(SendResult.DELIVERED)
        by_id = list(zip(ids, results, strict=True))
        stale = [cid for cid, r in by_id if r is SendResult.STALE]
        orphans = [cid for cid, r in by_id if r is SendResult.NO_RECORD]
        for cid in stale:
            await self._remove_stale(cid)
        # Set members whose record expired without an unregister.
        await self.registry.forget_user_connections(user_id, orphans)
        return UserOutcome(delivered, len(ids), len(stale) + len(orphans))

    async def broadcast(self, channel: str, frame: bytes) -> BroadcastOutcome:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(names.channel_broadcast(channel), frame)
            pipe.scard(names.channel_connections(channel))
            gateways, connections = await pipe.execute()
        return BroadcastOutcome(int(gateways), int(connections))

    async def close(self, connection_id: str, code: int, reason: str) -> tuple[CloseOutcome, str]:
        """Ask the holding gateway to close the socket; also returns that gateway's instance."""
        instance = await self.registry.gateway_of(connection_id)
        if instance is None:
            return CloseOutcome.NOT_FOUND, ""
        command = orjson.dumps(
            {"op": "close", "connection_id": connection_id, "code": code, "reason": reason}
        )
        if await self.redis.publish(names.gateway_control(instance), command) > 0:
            return CloseOutcome.SENT, instance
        if (await self.registry.alive([instance]))[0]:
            return CloseOutcome.NOT_RECEIVED, instance
        await self._remove_stale(connection_id, reason="gateway_lost")
        return CloseOutcome.GATEWAY_GONE, instance

    async def _remove_stale(self, connection_id: str, reason: str = "stale") -> None:
        removed = await self.registry.unregister(connection_id, event="disconnected", reason=reason)
        if removed is UnregisterResult.REMOVED:
            metrics.STALE_REMOVED.inc()
            if self.on_stale is not None:
                self.on_stale(connection_id)  # Traffic Cop forgets it too (stale.py)
