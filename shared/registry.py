"""The connection registry in Redis, and the agent-channel publish: every multi-key write.

Gateways register and unregister connections here, the eviction worker evicts and cleans up
after dead gateways here, the Post Office API removes stale records here. Each write that
touches several keys is one Lua script or one MULTI, so no caller can leave half a record.

Exactly-once events: :meth:`Registry.unregister` removes the record and announces it on
``websocket:events`` in the same script, and only the caller that actually removed the record
announces anything. A gateway closing a socket the eviction worker already evicted therefore
announces nothing, and two workers racing on one stale connection announce it once.

Index keys are passed to the scripts as templates built by :mod:`shared.redis_names`
(``"websocket:user:{}:connections"``), so names stay owned by that module.

This module owns the record layout too: callers get typed records (:class:`StoredConnection`)
and enum results (:class:`PublishResult`, :class:`UnregisterResult`, :class:`SendResult`),
never hash field names or bare script integers. Writers (gateways) build the Registry with a
record TTL; readers and removers (the API, the worker) build it without one.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from shared import raw_pipeline
from shared import redis_names as names
from shared.protocol import iso_now
from shared.streams import PUBLISH_BATCH_SCRIPT, PUBLISH_SCRIPT

__all__ = [
    "ConnectionRecord",
    "PublishResult",
    "Registry",
    "ScriptCall",
    "SendResult",
    "Sent",
    "StoredConnection",
    "UnregisterResult",
]

_T = "{}"  # the placeholder the scripts substitute


def _text(value: bytes | str) -> str:
    # The clients are built with decode_responses=False; stay correct either way.
    return value.decode() if isinstance(value, bytes) else value


_UNREGISTER = """
-- KEYS: 1 record hash, 2 last-seen zset, 3 events channel
-- ARGV: 1 connection id, 2 event type, 3 reason, 4 stale cutoff ('' = unconditional),
--       5 ISO timestamp, 6 user set tpl, 7 channel set tpl, 8 gateway set tpl, 9 session set tpl,
--       10 expected gateway ('' = any), 11 optional gateway control channel tpl,
--       12 optional close code: when both are given, the holding gateway is told to close the
--       socket in the same script, so an evicted connection is closed exactly once,
--       13 optional gateway liveness key tpl (with 10): returns -3 and touches nothing while the
--       expected gateway's liveness key exists, so cleaning up after a dead gateway never
--       removes connections of the instance that came back (same id) since it was found dead
local id = ARGV[1]
if ARGV[13] and ARGV[13] ~= '' and ARGV[10] ~= '' then
  if redis.call('EXISTS', (string.gsub(ARGV[13], '{}', ARGV[10]))) == 1 then return -3 end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], id)
  return 0
end
if ARGV[4] ~= '' then
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score and tonumber(score) > tonumber(ARGV[4]) then return -1 end
end
local f = redis.call('HMGET', KEYS[1], 'user_id', 'gateway_instance', 'session_id', 'channels')
if ARGV[10] ~= '' and f[2] ~= ARGV[10] then return -2 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], id)
if f[1] then redis.call('SREM', (string.gsub(ARGV[6], '{}', f[1])), id) end
if f[2] then redis.call('SREM', (string.gsub(ARGV[8], '{}', f[2])), id) end
if f[3] then redis.call('SREM', (string.gsub(ARGV[9], '{}', f[3])), id) end
if f[4] then
  local ok, chans = pcall(cjson.decode, f[4])
  if ok and type(chans) == 'table' then
    for _, c in ipairs(chans) do redis.call('SREM', (string.gsub(ARGV[7], '{}', c)), id) end
  end
end
redis.call('PUBLISH', KEYS[3], cjson.encode({
  type = ARGV[2], connection_id = id, user_id = f[1] or '', gateway_instance = f[2] or '',
  session_id = f[3] or '', reason = ARGV[3], timestamp = ARGV[5]}))
if ARGV[11] and ARGV[11] ~= '' and f[2] then
  redis.call('PUBLISH', (string.gsub(ARGV[11], '{}', f[2])), cjson.encode({
    op = 'close', connection_id = id, code = tonumber(ARGV[12]), reason = ARGV[3]}))
end
return 1
"""

_FORGET_GATEWAY = """
-- KEYS: 1 instance liveness key, 2 instance connection set, 3 gateways set.  ARGV: 1 instance
-- Forgets a dead instance only while its liveness key is still absent, so an instance that
-- came back (same id) between the check and this call keeps its bookkeeping.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

_TOUCH = """
-- KEYS: 1 record hash, 2 last-seen zset, 3 optional session key (session:id:<sid>).
-- ARGV: 1 connection id, 2 last activity ('' = not seen), 3 record TTL,
--       4 full channel list as JSON ('' = unchanged), 5 channel set tpl, 6.. newly used channels
-- Returns 1 touched, 0 record gone, -1 record gone and the session key too.
-- Touches only a record that still exists: a gateway tick that lands just after the
-- eviction worker removed the connection must not bring back a half record (no user_id)
-- that lingers for the TTL, nor leave the id in channel sets. A record gone while its
-- session lives was removed on purpose (evicted, its gateway taken for dead); gone together
-- with its session, Redis most likely lost its data: the caller tells the two apart.
if redis.call('EXISTS', KEYS[1]) == 0 then
  if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
  return 0
end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[1], 'last_heartbeat', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'channels', ARGV[4])
  for i = 6, #ARGV do redis.call('SADD', (string.gsub(ARGV[5], '{}', ARGV[i])), ARGV[1]) end
end
return 1
"""

# The publish script appends to the channel's stream and publishes on its tap (shared/streams.py).
_PUBLISH_OR_QUEUE = PUBLISH_SCRIPT


_SEND = """
-- KEYS: 1 record hash, 2 the connection's message channel.
-- ARGV: 1 frame text, 2 gateway liveness key template ("{}" = instance).
-- Returns receivers (> 0 delivered); -1 no record; 0 nobody received and the holding gateway
-- is dead too (stale); -2 nobody received but the gateway is alive.
local gateway = redis.call('HGET', KEYS[1], 'gateway_instance')
if not gateway then return -1 end
local n = redis.call('PUBLISH', KEYS[2], ARGV[1])
if n > 0 then return n end
if redis.call('EXISTS', (string.gsub(ARGV[2], '{}', gateway))) == 1 then return -2 end
return 0
"""


class PublishResult(enum.IntEnum):
    """Outcome of :meth:`Registry.publish_or_queue` (the script's codes: compare raw results
    of :meth:`Registry.run_scripts` with the members, or wrap them: ``PublishResult(raw)``):
    appended to the channel's stream with an agent known to listen (``PUBLISHED``: a tap
    subscriber or a live group consumer) or none known (``QUEUED``), or refused because the
    slowest group has ``STREAM_MAX_PENDING`` unconsumed entries (``REFUSED``)."""

    REFUSED = 0
    PUBLISHED = 1
    QUEUED = 2

    @property
    def status(self) -> str:
        """``published``, ``queued`` or ``refused``: the ack ``status`` / API answer."""
        return self.name.lower()


class UnregisterResult(enum.IntEnum):
    """Outcome of :meth:`Registry.unregister` for one connection."""

    #: This call removed the record and announced it.
    REMOVED = 1
    #: There was no record.
    NOT_FOUND = 0
    #: ``stale_before`` was given and the connection was seen after it: left alone.
    SEEN_SINCE = -1
    #: Held by another gateway than ``expected_gateway``: left alone.
    HELD_ELSEWHERE = -2
    #: ``unless_gateway_alive``: the expected gateway's liveness key exists again.
    GATEWAY_BACK = -3


class SendResult(enum.Enum):
    """Outcome of :meth:`Registry.send` for one connection."""

    DELIVERED = "delivered"
    #: No registry record: unknown or disconnected.
    NO_RECORD = "no_record"
    #: Nobody received and the holding gateway is dead too: the record is stale.
    STALE = "stale"
    #: Nobody received but the holding gateway is alive (most likely re-subscribing).
    NOT_RECEIVED = "not_received"


_SEND_CODES = {-1: SendResult.NO_RECORD, 0: SendResult.STALE, -2: SendResult.NOT_RECEIVED}


@dataclass(frozen=True, slots=True)
class Sent:
    """What :meth:`Registry.send` did: its result, and how many gateways received."""

    result: SendResult
    receivers: int = 0

    @classmethod
    def of(cls, code: int) -> Sent:
        if code > 0:
            return cls(SendResult.DELIVERED, code)
        return cls(_SEND_CODES[code])


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    connection_id: str
    user_id: str
    session_id: str
    gateway_instance: str
    connected_at: float
    channels: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_hash(self, now: float) -> dict[str, str]:
        return {
            "user_id": self.user_id,
            "session_id": self.session_id,
            "gateway_instance": self.gateway_instance,
            "channels": orjson.dumps(list(self.channels)).decode(),
            "connected_at": repr(self.connected_at),
            "last_heartbeat": repr(now),
            "metadata": orjson.dumps(dict(self.metadata)).decode(),
        }


def _json_field(text: Mapping[str, str], key: str) -> Any:
    try:
        return orjson.loads(text.get(key, "null"))
    except orjson.JSONDecodeError:
        return None


def _float_field(text: Mapping[str, str], key: str) -> float | None:
    try:
        return float(text[key])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class StoredConnection:
    """A record as read back from Redis; a field the hash lacks or cannot be read is None."""

    connection_id: str
    user_id: str | None
    session_id: str | None
    gateway_instance: str | None
    channels: list[str] | None
    metadata: dict[str, Any] | None
    connected_at: float | None
    last_heartbeat: float | None

    @classmethod
    def from_hash(cls, connection_id: str, raw: Mapping[bytes, bytes]) -> StoredConnection:
        text = {k.decode(): v.decode() for k, v in raw.items()}
        channels = _json_field(text, "channels")
        metadata = _json_field(text, "metadata")
        return cls(
            connection_id=connection_id,
            user_id=text.get("user_id"),
            session_id=text.get("session_id"),
            gateway_instance=text.get("gateway_instance"),
            channels=channels if isinstance(channels, list) else None,
            metadata=metadata if isinstance(metadata, dict) else None,
            connected_at=_float_field(text, "connected_at"),
            last_heartbeat=_float_field(text, "last_heartbeat"),
        )

    def as_json(self) -> dict[str, Any]:
        """The public view (``GET /v1/connections/{id}``): every field the hash had."""
        view: dict[str, Any] = {
            "connection_id": self.connection_id,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "gateway_instance": self.gateway_instance,
        }
        out = {k: v for k, v in view.items() if v is not None}
        out.update(
            channels=self.channels,
            metadata=self.metadata,
            connected_at=self.connected_at,
            last_heartbeat=self.last_heartbeat,
        )
        return out


#: One script run for :meth:`Registry.run_scripts`: the script, its KEYS and its ARGV.
ScriptCall = tuple[AsyncScript, list[str], list[Any]]


class Registry:
    """Registry operations on one Redis client. Cheap to build; holds no state but scripts."""

    def __init__(self, redis: Redis, record_ttl: float | None = None) -> None:
        self.redis = redis
        # Only writers of records (gateways: register, touch) need a TTL; readers and removers
        # (the API, the worker) pass none.
        self.record_ttl: int | None = None if record_ttl is None else max(1, int(record_ttl))
        self._unregister = redis.register_script(_UNREGISTER)
        self._publish_or_queue = redis.register_script(_PUBLISH_OR_QUEUE)
        self._publish_batch = redis.register_script(PUBLISH_BATCH_SCRIPT)
        self._forget_gateway = redis.register_script(_FORGET_GATEWAY)
        self._touch = redis.register_script(_TOUCH)
        self._send = redis.register_script(_SEND)

    def _writer_ttl(self) -> int:
        if self.record_ttl is None:
            raise RuntimeError(
                "this Registry was built without record_ttl: it cannot write records"
            )
        return self.record_ttl

    async def run_scripts(self, calls: list[ScriptCall]) -> list[Any]:
        """Many script runs in one pipelined round trip; results (or exceptions) in order.

        redis-py's pipelines send ``SCRIPT EXISTS`` before every ``execute`` that holds a
        script, doubling the round trips of each batch. This sends bare ``EVALSHA`` commands
        instead; a script Redis does not know (a restart, ``SCRIPT FLUSH``) fails that command
        with NOSCRIPT without running it, so only those runs are repeated, once, after loading.
        """
        results = await self._evalsha_all(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
                await self.redis.script_load(script.script)
            retried = await self._evalsha_all([calls[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        return results

    async def _evalsha_all(self, calls: list[ScriptCall]) -> list[Any]:
        # shared.raw_pipeline: the same bytes as a redis-py pipeline, without its per-command
        # overhead (a fifth of the gateway's CPU in the closed-loop profile).
        return await raw_pipeline.execute(
            self.redis,
            [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls],
        )

    def publish_or_queue_call(self, channel: str, data: bytes, queue_bound: int) -> ScriptCall:
        """One :meth:`publish_or_queue` for :meth:`run_scripts` (the gateway's batches);
        ``queue_bound`` is ``STREAM_MAX_PENDING``."""
        return (
            self._publish_or_queue,
            [names.stream(channel), names.agent_channel(channel), names.stream_consumers(channel)],
            [data, queue_bound],
        )

    def publish_batch_call(
        self, channel: str, data: Sequence[bytes], queue_bound: int
    ) -> ScriptCall:
        """Several :meth:`publish_or_queue` of one channel, in order, as one script run whose
        reply is the list of their codes (the gateway's batches: one command per channel)."""
        return (
            self._publish_batch,
            [names.stream(channel), names.agent_channel(channel), names.stream_consumers(channel)],
            [queue_bound, *data],
        )

    async def register(self, record: ConnectionRecord, now: float | None = None) -> None:
        now = time.time() if now is None else now
        cid = record.connection_id
        async with self.redis.pipeline(transaction=True) as pipe:
            # redis-py's stubs want Mapping[EncodableT, EncodableT]; Mapping is invariant in
            # its key type, so a dict[str, str] needs the cast.
            pipe.hset(names.connection(cid), mapping=cast("dict[Any, Any]", record.to_hash(now)))
            pipe.expire(names.connection(cid), self._writer_ttl())
            pipe.sadd(names.user_connections(record.user_id), cid)
            pipe.sadd(names.gateway_connections(record.gateway_instance), cid)
            for channel in record.channels:
                pipe.sadd(names.channel_connections(channel), cid)
            pipe.zadd(names.LAST_SEEN, {cid: now})
            pipe.publish(
                names.EVENTS,
                orjson.dumps(
                    {
                        "type": "connected",
                        "connection_id": cid,
                        "user_id": record.user_id,
                        "gateway_instance": record.gateway_instance,
                        "session_id": record.session_id,
                        "reason": "",
                        "timestamp": iso_now(),
                    }
                ),
            )
            await pipe.execute()

    async def unregister(
        self,
        connection_id: str,
        *,
        event: str = "disconnected",
        reason: str = "",
        stale_before: float | None = None,
        expected_gateway: str | None = None,
    ) -> UnregisterResult:
        """Remove the record and its index entries and announce ``event`` — atomically.

        :attr:`~UnregisterResult.REMOVED` only for the one caller that removed the record (and
        announced it); see :class:`UnregisterResult` for the others.
        """
        result = await self._unregister(
            keys=[names.connection(connection_id), names.LAST_SEEN, names.EVENTS],
            args=[
                connection_id,
                event,
                reason,
                "" if stale_before is None else repr(stale_before),
                iso_now(),
                names.user_connections(_T),
                names.channel_connections(_T),
                names.gateway_connections(_T),
                names.session_connections(_T),
                expected_gateway or "",
            ],
        )
        return UnregisterResult(int(result))

    async def unregister_many(
        self,
        connection_ids: Iterable[str],
        *,
        event: str = "evicted",
        reason: str = "",
        stale_before: float | None = None,
        expected_gateway: str | None = None,
        close_code: int | None = None,
        unless_gateway_alive: bool = False,
    ) -> list[UnregisterResult | Exception]:
        """:meth:`unregister` for many connections in one pipelined round trip.

        Each id gets its own atomic script run, so the exactly-once guarantees are those of
        :meth:`unregister`. With ``close_code`` the script that removes a record also publishes
        ``{"op": "close", "connection_id", "code", "reason"}`` on the holding gateway's control
        channel. With ``unless_gateway_alive`` (and ``expected_gateway``) a run does nothing and
        answers :attr:`~UnregisterResult.GATEWAY_BACK` while that gateway's liveness key
        exists: the check and the removal are one atomic step, so a gateway that restarted with
        the same instance id keeps its new connections. Results come back in order: the
        :class:`UnregisterResult`, or the exception a failing run raised (one bad id does not
        hide the others' outcomes).
        """
        ids = list(connection_ids)
        if not ids:
            return []
        timestamp = iso_now()
        common = [
            names.user_connections(_T),
            names.channel_connections(_T),
            names.gateway_connections(_T),
            names.session_connections(_T),
            expected_gateway or "",
            names.gateway_control(_T) if close_code is not None else "",
            "" if close_code is None else str(int(close_code)),
            names.gateway_instance(_T) if unless_gateway_alive and expected_gateway else "",
        ]
        cutoff = "" if stale_before is None else repr(stale_before)
        raw = await self.run_scripts(
            [
                (
                    self._unregister,
                    [names.connection(cid), names.LAST_SEEN, names.EVENTS],
                    [cid, event, reason, cutoff, timestamp, *common],
                )
                for cid in ids
            ]
        )
        return [r if isinstance(r, Exception) else UnregisterResult(int(r)) for r in raw]

    async def forget_gateway(self, instance: str) -> bool:
        """Drop a dead instance's connection set and its ``websocket:gateways`` membership,
        unless its liveness key exists again. True when forgotten."""
        result = await self._forget_gateway(
            keys=[
                names.gateway_instance(instance),
                names.gateway_connections(instance),
                names.GATEWAYS,
            ],
            args=[instance],
        )
        return bool(result)

    async def touch(
        self,
        seen: Mapping[str, float],
        channels_used: Mapping[str, Iterable[str]] | None = None,
        all_channels: Mapping[str, Iterable[str]] | None = None,
        sessions: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Record liveness for many connections in one round trip (the gateway's tick).

        ``seen`` maps connection id to last activity; ``channels_used`` adds newly used
        channels to the channel indexes, with ``all_channels`` the full list to store.

        Returns the ids whose record no longer exists (nothing is written for them). With
        ``sessions`` (connection id to session id), an id whose session key is gone as well is
        left out: a record and its session vanishing together means Redis lost its data (a
        restart without persistence), not that someone removed the connection.
        """
        used = channels_used or {}
        if not seen and not used:
            return []
        sids = sessions or {}
        ttl = self._writer_ttl()
        template = names.channel_connections(_T)
        ids = list({**seen, **used})
        calls: list[ScriptCall] = []
        for cid in ids:
            ts = seen.get(cid)
            new = list(used.get(cid, ()))
            full = list((all_channels or {}).get(cid, new)) if cid in used else None
            sid = sids.get(cid)
            keys = [names.connection(cid), names.LAST_SEEN]
            if sid is not None:
                keys.append(names.session_by_id(sid))
            calls.append(
                (
                    self._touch,
                    keys,
                    [
                        cid,
                        "" if ts is None else repr(ts),
                        ttl,
                        "" if full is None else orjson.dumps(full).decode(),
                        template,
                        *new,
                    ],
                )
            )
        gone: list[str] = []
        for cid, result in zip(ids, await self.run_scripts(calls), strict=True):
            if isinstance(result, Exception):
                raise result
            if int(result) == 0:
                gone.append(cid)
        return gone

    async def get(self, connection_id: str) -> StoredConnection | None:
        # The client is built with decode_responses=False: keys and values are bytes.
        raw = cast("dict[bytes, bytes]", await self.redis.hgetall(names.connection(connection_id)))
        return StoredConnection.from_hash(connection_id, raw) if raw else None

    async def gateway_of(self, connection_id: str) -> str | None:
        """The instance holding ``connection_id``, or None when there is no record."""
        raw = await self.redis.hget(names.connection(connection_id), "gateway_instance")
        return None if raw is None else _text(raw)

    async def gateways(self) -> list[str]:
        """Every instance in ``websocket:gateways`` (live or not), sorted."""
        return sorted(_text(m) for m in await self.redis.smembers(names.GATEWAYS))

    async def alive(self, instances: Sequence[str]) -> list[bool]:
        """Whether each instance's liveness key exists, in one round trip."""
        if not instances:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance in instances:
                pipe.exists(names.gateway_instance(instance))
            return [bool(n) for n in await pipe.execute()]

    async def gateway_connections(
        self, instance: str, cursor: int, count: int
    ) -> tuple[int, list[str]]:
        """One ``SSCAN`` page of the connections ``instance`` registered: (next cursor, ids);
        the cursor is 0 once the set is done."""
        cursor, raw = await self.redis.sscan(
            names.gateway_connections(instance), cursor, count=count
        )
        return int(cursor), [_text(i) for i in raw]

    async def user_connections(self, user_id: str) -> list[str]:
        """The ids in ``user_id``'s connection set, sorted."""
        return sorted(_text(i) for i in await self.redis.smembers(names.user_connections(user_id)))

    async def forget_user_connections(self, user_id: str, connection_ids: Sequence[str]) -> None:
        """Drop ids whose record expired without an unregister from the user's set (nothing
        else removes them: the unregister script needs the record to find its index entries)."""
        if connection_ids:
            await self.redis.srem(names.user_connections(user_id), *connection_ids)

    async def stale(self, cutoff: float, limit: int, offset: int = 0) -> list[str]:
        """Up to ``limit`` connection ids last seen at or before ``cutoff`` (oldest first),
        skipping the ``offset`` oldest."""
        ids = cast(
            "list[bytes]",
            await self.redis.zrangebyscore(
                names.LAST_SEEN, "-inf", cutoff, start=offset, num=limit
            ),
        )
        return [_text(i) for i in ids]

    async def publish_or_queue(self, channel: str, data: bytes, queue_bound: int) -> PublishResult:
        """Append an agent message to the channel's stream and publish it on the tap, unless
        the slowest group has ``queue_bound`` (``STREAM_MAX_PENDING``) unconsumed entries."""
        script, keys, args = self.publish_or_queue_call(channel, data, queue_bound)
        return PublishResult(int(await script(keys=keys, args=args)))

    async def send(self, connection_id: str, frame: bytes) -> Sent:
        """Publish ``frame`` to the one connection, checking its record in the same script, so
        :attr:`SendResult.NO_RECORD` really means nothing was sent."""
        return Sent.of(int(await self._send(**self._send_call(connection_id, frame))))

    async def send_many(self, connection_ids: Sequence[str], frame: bytes) -> list[Sent]:
        """:meth:`send` to many connections in one pipelined round trip, results in order."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in connection_ids:
                await self._send(**self._send_call(cid, frame), client=pipe)
            return [Sent.of(int(r)) for r in await pipe.execute()]

    @staticmethod
    def _send_call(connection_id: str, frame: bytes) -> dict[str, Any]:
        return {
            "keys": [names.connection(connection_id), names.connection_messages(connection_id)],
            "args": [frame, names.gateway_instance(_T)],
        }
