"""Durable agent delivery: the per-channel Redis Stream, its consumer groups and dead letters.

Every accepted client message is appended to ``websocket:stream:{<channel>}`` by the publish
script (:data:`PUBLISH_SCRIPT`, run by :class:`shared.registry.Registry` in the gateway's
pipelined batches and by the API), which also PUBLISHes it on the live tap ``websocket:<channel>``.

Agents of one kind share a consumer group (``XGROUP CREATE ... 0 MKSTREAM``: a new group starts
at the beginning of what the stream still holds, so messages accepted before any agent of that
kind ran are delivered to it). Redis hands each entry to exactly one consumer of each group;
the consumer acks it (``XACK``). What is not acked within ``ACK_TIMEOUT_SECONDS`` is reclaimed
by the eviction worker (:meth:`Streams.reclaim`, ``XAUTOCLAIM``) for another live consumer, its
delivery count carried along; past ``MAX_DELIVERIES`` it moves to ``websocket:dead:{<channel>}``.

Nothing a group has not acked is trimmed: :meth:`Streams.trim` removes only entries older than
every group's oldest pending entry and last-delivered id (``XTRIM MINID``). The publish script
refuses a message (:class:`~shared.registry.PublishResult` ``REFUSED``, the client's
``unavailable``) once the slowest group has ``STREAM_MAX_PENDING`` unconsumed entries (not yet
delivered plus delivered and not acked), or the stream holds that many with no group at all.

Every script touches only keys of one channel, which share the hash tag ``{<channel>}``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import redis_names as names

__all__ = [
    "DATA_FIELD",
    "DEFAULT_GROUP_START",
    "PUBLISH_BATCH_SCRIPT",
    "PUBLISH_SCRIPT",
    "UNCONSUMED_SCRIPT",
    "ConsumerInfo",
    "DeadLetter",
    "Entry",
    "GroupInfo",
    "ReclaimResult",
    "StreamInfo",
    "Streams",
    "is_valid_consumer_name",
    "is_valid_group_name",
    "is_valid_stream_id",
]

#: The one field of a stream entry: the agent message JSON (the same bytes the tap carries).
DATA_FIELD = "data"
#: Where a new group starts: ``0``, the oldest entry the stream still holds.
DEFAULT_GROUP_START = "0"

_GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CONSUMER_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")


def is_valid_group_name(name: object) -> bool:
    return isinstance(name, str) and bool(_GROUP_RE.match(name))


def is_valid_consumer_name(name: object) -> bool:
    return isinstance(name, str) and bool(_CONSUMER_RE.match(name))


def is_valid_stream_id(value: object) -> bool:
    """``<ms>-<seq>``, both parts below 2**64 (what Redis accepts)."""
    if not (isinstance(value, str) and _ID_RE.match(value)):
        return False
    ms, _, seq = value.partition("-")
    return int(ms) < 1 << 64 and int(seq) < 1 << 64


# Shared Lua: the unconsumed entries of the slowest group (its lag plus its pending count; a
# group whose lag Redis cannot tell counts the whole stream), or the length with no group.
_UNCONSUMED = """
local function fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
local function unconsumed(groups, len)
  if #groups == 0 then return len end
  local most = 0
  for _, g in ipairs(groups) do
    local f = fields(g)
    local lag = f['lag']
    if type(lag) ~= 'number' then lag = len end
    if lag + f['pending'] > most then most = lag + f['pending'] end
  end
  return most
end
"""

PUBLISH_BATCH_SCRIPT = (
    """
-- PUBLISH_SCRIPT for several messages of one channel, in order, in one call (the gateway's
-- batches: one command and one array reply per channel, not per message).
-- KEYS: 1 stream, 2 tap (pub/sub channel), 3 consumers' last-seen zset.
-- ARGV: 1 STREAM_MAX_PENDING, 2.. agent messages.
-- Returns one code per message, as PUBLISH_SCRIPT's. Each XADD adds one unconsumed entry for
-- every group, so the slowest group's count, read once the stream reaches the bound, grows by
-- one per message added; a message refused leaves the later ones refused (nothing changed).
"""
    + _UNCONSUMED
    + """
local len = redis.call('XLEN', KEYS[1])
local bound = tonumber(ARGV[1])
local over = nil
local out = {}
for i = 2, #ARGV do
  if len >= bound and over == nil then
    over = unconsumed(redis.call('XINFO', 'GROUPS', KEYS[1]), len)
  end
  if over ~= nil and over >= bound then
    out[#out + 1] = 0
  else
    redis.call('XADD', KEYS[1], '*', 'data', ARGV[i])
    len = len + 1
    if over ~= nil then over = over + 1 end
    if redis.call('PUBLISH', KEYS[2], ARGV[i]) > 0 or redis.call('EXISTS', KEYS[3]) == 1 then
      out[#out + 1] = 1
    else
      out[#out + 1] = 2
    end
  end
end
return out
"""
)

PUBLISH_SCRIPT = (
    """
-- KEYS: 1 stream, 2 tap (pub/sub channel), 3 consumers' last-seen zset.
-- ARGV: 1 agent message, 2 STREAM_MAX_PENDING
-- Returns 1 published (an agent is known to listen: a tap subscriber, or a group consumer that
-- said it is live), 2 queued (none known: it waits in the stream; a group created at 0 gets
-- it), 0 refused (the slowest group has STREAM_MAX_PENDING unconsumed entries). Unconsumed
-- entries never outnumber the stream, so while XLEN is under the bound (the worker trims what
-- every group acked) a run costs XLEN, XADD, PUBLISH and at most an EXISTS.
"""
    + _UNCONSUMED
    + """
local len = redis.call('XLEN', KEYS[1])
local bound = tonumber(ARGV[2])
if len >= bound then
  local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
  if unconsumed(groups, len) >= bound then return 0 end
end
redis.call('XADD', KEYS[1], '*', 'data', ARGV[1])
if redis.call('PUBLISH', KEYS[2], ARGV[1]) > 0 then return 1 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
return 2
"""
)

#: KEYS: 1 stream. Returns its unconsumed entries (what the publish script compares with
#: STREAM_MAX_PENDING): the slowest group's lag plus pending, or the length with no group.
UNCONSUMED_SCRIPT = (
    _UNCONSUMED
    + """
local len = redis.call('XLEN', KEYS[1])
if len == 0 then return 0 end
return unconsumed(redis.call('XINFO', 'GROUPS', KEYS[1]), len)
"""
)

_ID_LESS = """
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
"""

_TRIM = (
    """
-- KEYS: 1 stream.  Trims the acked history: entries older than every group's oldest pending
-- entry and its last-delivered id. Without a group nothing is trimmed (nobody acked anything).
-- One script, so a group created meanwhile cannot lose entries to a stale computation.
"""
    + _ID_LESS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local floor = nil
for _, g in ipairs(groups) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local keep = f['last-delivered-id']
  if f['pending'] > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], f['name'])[2]
    if id_less(oldest, keep) then keep = oldest end
  end
  if floor == nil or id_less(keep, floor) then floor = keep end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""
)

_RECLAIM = """
-- KEYS: 1 stream, 2 dead-letter stream.
-- ARGV: 1 group, 2 consumer to hand entries to, 3 min idle ms (ACK_TIMEOUT), 4 cursor,
--       5 count, 6 MAX_DELIVERIES, 7 ISO time, 8 reason
-- XAUTOCLAIM hands entries idle past the ack timeout to the live consumer (their delivery count
-- goes up by one); one that has now been handed out more than MAX_DELIVERIES times moves to
-- the dead letters and is acked, in the same script, so it is never handed out again.
-- Returns {next cursor, handed over, dead-lettered, deleted entries dropped from the PEL}.
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local handed, dead = 0, 0
local max = tonumber(ARGV[6])
for _, e in ipairs(r[2]) do
  local id, flat = e[1], e[2]
  local n = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1][4]
  if n > max then
    local data = ''
    for i = 1, #flat, 2 do if flat[i] == 'data' then data = flat[i + 1] end end
    redis.call('XADD', KEYS[2], '*', 'data', data, 'stream_id', id, 'group', ARGV[1],
      'deliveries', n - 1, 'reason', ARGV[8], 'dead_at', ARGV[7])
    redis.call('XACK', KEYS[1], ARGV[1], id)
    dead = dead + 1
  else
    handed = handed + 1
  end
end
local deleted = 0
if r[3] then deleted = #r[3] end
return {r[1], handed, dead, deleted}
"""

_REQUEUE = """
-- KEYS: 1 stream, 2 dead-letter stream.  ARGV: dead-letter ids.
-- Appends each dead letter's message to the stream again (a new entry: every group sees it)
-- and removes it from the dead letters, atomically. Returns the new stream ids ('' = unknown).
local out = {}
for i, id in ipairs(ARGV) do
  local e = redis.call('XRANGE', KEYS[2], id, id)[1]
  out[i] = ''
  if e then
    local flat = e[2]
    for j = 1, #flat, 2 do
      if flat[j] == 'data' then out[i] = redis.call('XADD', KEYS[1], '*', 'data', flat[j + 1]) end
    end
    redis.call('XDEL', KEYS[2], id)
  end
end
return out
"""

_CONSUME = """
-- KEYS: 1 stream, 2 consumers' last-seen zset.
-- ARGV: 1 group, 2 consumer, 3 most in flight, 4 unix time, 5.. ids this stream has sent
-- One step of a group consumer that holds at most ARGV[3] unacked entries: its pending list
-- (the acks of any API instance, or raw XACKs, show as ids missing from it), the pending
-- entries it has not sent yet (handed to it by the worker, or left from an earlier session),
-- and, while there is room, new entries (XREADGROUP >).
-- It also says the consumer is live (created if new, so the worker can hand it messages).
-- Returns {{{id, deliveries}...} pending, {{id, deliveries, data}...} not sent yet, new entries}.
redis.call('XGROUP', 'CREATECONSUMER', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1] .. '/' .. ARGV[2])
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[3], ARGV[2])
local sent = {}
for i = 5, #ARGV do sent[ARGV[i]] = true end
local ids, unsent = {}, {}
for _, e in ipairs(p) do
  ids[#ids + 1] = {e[1], e[4]}
  if not sent[e[1]] then
    local x = redis.call('XRANGE', KEYS[1], e[1], e[1])[1]
    local data = false
    if x then
      for j = 1, #x[2], 2 do if x[2][j] == 'data' then data = x[2][j + 1] end end
    end
    unsent[#unsent + 1] = {e[1], e[4], data}
  end
end
local fresh = {}
local room = tonumber(ARGV[3]) - #p
if room > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', room,
    'STREAMS', KEYS[1], '>')
  if r then fresh = r[1][2] end
end
return {ids, unsent, fresh}
"""

_DELETE_CONSUMER = """
-- KEYS: 1 stream, 2 consumers' last-seen zset.  ARGV: 1 group, 2 consumer, 3 idle ms,
-- 4 seen-before cutoff (unix time). Removes the consumer only while it holds nothing, is still
-- idle that long and has not said it is live since the cutoff (XGROUP DELCONSUMER would drop
-- its pending entries).
local member = ARGV[1] .. '/' .. ARGV[2]
local seen = redis.call('ZSCORE', KEYS[2], member)
if seen and tonumber(seen) > tonumber(ARGV[4]) then return 0 end
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] == ARGV[2] then
    if f['pending'] == 0 and f['idle'] >= tonumber(ARGV[3]) then
      redis.call('ZREM', KEYS[2], member)
      return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
    end
    return 0
  end
end
redis.call('ZREM', KEYS[2], member)
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(flat: Any) -> dict[str, Any]:
    """A Redis flat list ``[k1, v1, k2, v2 ...]`` or dict, keys as text."""
    if isinstance(flat, dict):
        return {_text(k): v for k, v in flat.items()}
    items = list(flat)
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as a consumer receives it."""

    id: str
    data: bytes
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    data: bytes
    stream_id: str
    group: str
    deliveries: int
    reason: str
    dead_at: str


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int
    #: When it last said it is live (:data:`shared.redis_names.stream_consumers`), if ever.
    seen_at: float | None = None

    def live(self, now: float, within: float) -> bool:
        return self.idle_ms < within * 1000 or (
            self.seen_at is not None and now - self.seen_at < within
        )


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str
    oldest_pending_id: str | None = None
    consumer_list: tuple[ConsumerInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamInfo:
    channel: str
    length: int
    dead_letters: int
    groups: tuple[GroupInfo, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ReclaimResult:
    cursor: str
    handed: int
    dead: int
    deleted: int


@dataclass(slots=True)
class ConsumeStep:
    """What :meth:`Streams.consume_step` found: the consumer's pending ids, pending entries it
    had not been sent, and new entries."""

    pending: dict[str, int]  # id -> deliveries
    unsent: list[Entry]
    fresh: list[Entry]


def id_time(stream_id: str) -> float:
    """The unix time (seconds) a stream id was created at."""
    return int(stream_id.split("-", 1)[0]) / 1000


class Streams:
    """Stream operations on one Redis client; holds nothing but its scripts."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._trim = redis.register_script(_TRIM)
        self._reclaim = redis.register_script(_RECLAIM)
        self._requeue = redis.register_script(_REQUEUE)
        self._consume = redis.register_script(_CONSUME)
        self._delete_consumer = redis.register_script(_DELETE_CONSUMER)

    # -- consumers ---------------------------------------------------------------------------

    async def ensure_group(self, channel: str, group: str) -> bool:
        """Create the group (and the stream) unless it exists; True when this call created it."""
        try:
            await self.redis.xgroup_create(
                names.stream(channel), group, id=DEFAULT_GROUP_START, mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    async def consume_step(
        self, channel: str, group: str, consumer: str, in_flight: int, sent: Sequence[str]
    ) -> ConsumeStep:
        ids, unsent, fresh = await self._consume(
            keys=[names.stream(channel), names.stream_consumers(channel)],
            args=[group, consumer, in_flight, repr(time.time()), *sent],
        )
        return ConsumeStep(
            {_text(i): int(n) for i, n in ids},
            [
                Entry(_text(i), cast("bytes", d) if d else b"", int(n))
                for i, n, d in unsent
                if d  # an entry gone from the stream (XDEL by someone) has nothing to send
            ],
            [_entry(e) for e in fresh],
        )

    async def heartbeat(self, channel: str, group: str, consumer: str) -> None:
        """Create the consumer if new and mark it live: what a raw-Redis consumer on Redis
        before 7.2 does between reads (XGROUP CREATECONSUMER, ZADD)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xgroup_createconsumer(names.stream(channel), group, consumer)
            pipe.zadd(names.stream_consumers(channel), {f"{group}/{consumer}": time.time()})
            await pipe.execute()

    async def read_new(
        self, channel: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[Entry]:
        """``XREADGROUP ... BLOCK``: new entries, waiting up to ``block_ms`` for one."""
        raw = await self.redis.xreadgroup(
            group, consumer, {names.stream(channel): ">"}, count=count, block=block_ms
        )
        if not raw:
            return []
        entries = raw[0][1] if isinstance(raw, list) else next(iter(raw.values()))[0]
        return [_entry(e) for e in entries]

    async def entries(self, channel: str, ids: Sequence[str]) -> dict[str, bytes]:
        """The data of those entries (pipelined XRANGE); ids gone from the stream are left out."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(names.stream(channel), entry_id, entry_id)
            found = await pipe.execute()
        out = {}
        for entry_id, rows in zip(ids, found, strict=True):
            if rows:
                data = _fields(rows[0][1]).get(DATA_FIELD, b"")
                out[entry_id] = data if isinstance(data, bytes) else str(data).encode()
        return out

    async def ack(self, channel: str, group: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return int(await self.redis.xack(names.stream(channel), group, *ids))

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letters(
        self, channel: str, after: str = "-", count: int = 100
    ) -> list[DeadLetter]:
        start = "-" if after == "-" else f"({after}"
        raw = await self.redis.xrange(names.dead_letters(channel), start, "+", count=count)
        out = []
        for entry_id, flat in raw or []:
            f = {k: _text(v) for k, v in _fields(flat).items() if k != DATA_FIELD}
            data = _fields(flat).get(DATA_FIELD, b"")
            out.append(
                DeadLetter(
                    id=_text(entry_id),
                    data=data if isinstance(data, bytes) else str(data).encode(),
                    stream_id=f.get("stream_id", ""),
                    group=f.get("group", ""),
                    deliveries=int(f.get("deliveries", "0") or 0),
                    reason=f.get("reason", ""),
                    dead_at=f.get("dead_at", ""),
                )
            )
        return out

    async def requeue(self, channel: str, ids: Sequence[str]) -> list[str | None]:
        """Append dead letters to the stream again; their new stream ids (None: unknown id)."""
        if not ids:
            return []
        raw = await self._requeue(
            keys=[names.stream(channel), names.dead_letters(channel)], args=list(ids)
        )
        return [_text(r) or None for r in raw]

    # -- the worker's side -------------------------------------------------------------------

    async def reclaim(
        self,
        channel: str,
        group: str,
        target: str,
        *,
        min_idle_ms: int,
        max_deliveries: int,
        cursor: str = "0-0",
        count: int = 100,
        reason: str = "max_deliveries",
    ) -> ReclaimResult:
        raw = await self._reclaim(
            keys=[names.stream(channel), names.dead_letters(channel)],
            args=[
                group,
                target,
                min_idle_ms,
                cursor,
                count,
                max_deliveries,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                reason,
            ],
        )
        return ReclaimResult(_text(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]))

    async def stale_holders(
        self, channel: str, group: str, min_idle_ms: int, count: int
    ) -> set[str]:
        """Consumers holding entries delivered at least ``min_idle_ms`` ago (the oldest
        ``count`` such entries looked at)."""
        rows = await self.redis.xpending_range(
            names.stream(channel), group, "-", "+", count, idle=min_idle_ms
        )
        return {_text(r["consumer"]) for r in rows}

    async def trim(self, channel: str) -> int:
        """Trim the history every group acked; entries removed."""
        return int(await self._trim(keys=[names.stream(channel)]))

    async def delete_consumer(
        self, channel: str, group: str, consumer: str, stale_seconds: float
    ) -> bool:
        """Remove a consumer that holds nothing and has been silent ``stale_seconds``."""
        cutoff = repr(time.time() - stale_seconds)
        return bool(
            await self._delete_consumer(
                keys=[names.stream(channel), names.stream_consumers(channel)],
                args=[group, consumer, int(stale_seconds * 1000), cutoff],
            )
        )

    async def inspect(self, channels: Sequence[str]) -> tuple[list[StreamInfo], int]:
        """Length, dead letters and groups (with consumers and oldest pending id) of each
        channel's stream, and the round trips it took (one, two with any group)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.xlen(names.stream(channel))
                pipe.xlen(names.dead_letters(channel))
                pipe.xinfo_groups(names.stream(channel))
                pipe.zrange(names.stream_consumers(channel), 0, -1, withscores=True)
            first = await pipe.execute(raise_on_error=False)
        per_channel: list[tuple[str, int, int, list[dict[str, Any]]]] = []
        seen: dict[str, dict[str, float]] = {}
        for i, channel in enumerate(channels):
            length, dead, groups, live = first[4 * i : 4 * i + 4]
            listed = [] if isinstance(groups, Exception) else [_fields(g) for g in groups]
            per_channel.append((channel, _int(length), _int(dead), listed))
            seen[channel] = (
                {} if isinstance(live, Exception) else {_text(m): float(t) for m, t in live}
            )
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, _length, _dead, groups in per_channel:
                for g in groups:
                    pipe.xpending(names.stream(channel), _text(g["name"]))
                    pipe.xinfo_consumers(names.stream(channel), _text(g["name"]))
            second = (
                list(await pipe.execute(raise_on_error=False))
                if any(groups for *_x, groups in per_channel)
                else []
            )
        out: list[StreamInfo] = []
        at = 0
        for channel, length, dead, groups in per_channel:
            infos = []
            for g in groups:
                summary, consumers = second[at], second[at + 1]
                at += 2
                oldest = None
                if isinstance(summary, dict) and summary.get("pending"):
                    oldest = _text(summary.get("min"))
                elif isinstance(summary, list | tuple) and summary and int(summary[0]):
                    oldest = _text(summary[1])
                clist = (
                    ()
                    if isinstance(consumers, Exception)
                    else tuple(
                        ConsumerInfo(_text(c["name"]), int(c["pending"]), int(c["idle"]))
                        for c in (_fields(c) for c in consumers)
                    )
                )
                lag = g.get("lag")
                infos.append(
                    GroupInfo(
                        name=_text(g["name"]),
                        consumers=int(g["consumers"]),
                        pending=int(g["pending"]),
                        lag=None if lag is None else int(lag),
                        last_delivered_id=_text(g["last-delivered-id"]),
                        oldest_pending_id=oldest,
                        consumer_list=clist,
                    )
                )
            out.append(StreamInfo(channel, length, dead, tuple(infos)))
        return out, 2 if second else 1


def _int(value: Any) -> int:
    return 0 if isinstance(value, Exception) or value is None else int(value)


def _entry(raw: Any) -> Entry:
    entry_id, flat = raw[0], raw[1]
    data = _fields(flat).get(DATA_FIELD, b"")
    return Entry(_text(entry_id), data if isinstance(data, bytes) else str(data).encode())
