"""shared/registry.py against a real redis-server: atomic writes, exactly-once events, the
channel streams' publish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from shared import redis_names as names
from shared.registry import ConnectionRecord, PublishResult, Registry
from shared.streams import Streams
from tests.helpers import timeout

TTL = 60
CID = "ws_alice_0badf00d"


def record(
    cid: str = CID, user: str = "alice", gateway: str = "gw-1", **kw: Any
) -> ConnectionRecord:
    return ConnectionRecord(
        connection_id=cid,
        user_id=user,
        session_id=kw.pop("session_id", "sess_0123456789abcdef"),
        gateway_instance=gateway,
        connected_at=kw.pop("connected_at", 100.0),
        channels=kw.pop("channels", ("guide", "pillar:content")),
        metadata=kw.pop("metadata", {"ua": "test"}),
    )


@pytest.fixture
async def registry(redis: Redis) -> Registry:
    return Registry(redis, record_ttl=TTL)


@pytest.fixture
async def events(redis: Redis) -> AsyncIterator[PubSub]:
    pubsub = redis.pubsub()
    await pubsub.subscribe(names.EVENTS)
    yield pubsub
    await pubsub.aclose()


_MARKER = b"--marker--"


async def next_message(pubsub: PubSub) -> dict[str, Any]:
    """The next published message (subscribe confirmations skipped), or fail at a deadline.
    ``get_message`` returns None for a skipped confirmation too, so it is called in a loop."""
    deadline = asyncio.get_running_loop().time() + timeout(3)
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, "no message arrived in time"
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if msg is not None:
            return msg


async def drain(redis: Redis, pubsub: PubSub, channel: str = names.EVENTS) -> list[Any]:
    """Every message published on ``channel`` so far, in order: publish a marker and read up to
    it, so "nothing was published" is checked without waiting for a silence."""
    await redis.publish(channel, _MARKER)
    out: list[Any] = []
    while True:
        msg = await next_message(pubsub)
        if msg["channel"].decode() != channel:
            continue
        if msg["data"] == _MARKER:
            return out
        out.append(orjson.loads(msg["data"]))


async def test_register_writes_record_indexes_and_event(redis, registry, events):
    await registry.register(record(), now=123.5)
    raw = await redis.hgetall(names.connection(CID))
    assert raw[b"user_id"] == b"alice"
    assert raw[b"session_id"] == b"sess_0123456789abcdef"
    assert raw[b"gateway_instance"] == b"gw-1"
    assert orjson.loads(raw[b"channels"]) == ["guide", "pillar:content"]
    assert float(raw[b"connected_at"]) == 100.0
    assert float(raw[b"last_heartbeat"]) == 123.5
    assert orjson.loads(raw[b"metadata"]) == {"ua": "test"}
    assert 0 < await redis.ttl(names.connection(CID)) <= TTL
    assert await redis.smembers(names.user_connections("alice")) == {CID.encode()}
    assert await redis.smembers(names.gateway_connections("gw-1")) == {CID.encode()}
    assert await redis.sismember(names.channel_connections("guide"), CID)
    assert await redis.sismember(names.channel_connections("pillar:content"), CID)
    assert await redis.zscore(names.LAST_SEEN, CID) == 123.5
    [event] = await drain(redis, events)
    assert event["type"] == "connected"
    assert (event["connection_id"], event["user_id"], event["gateway_instance"]) == (
        CID,
        "alice",
        "gw-1",
    )
    assert event["session_id"] == "sess_0123456789abcdef"
    assert event["timestamp"].endswith("Z")


async def test_get_returns_the_public_view(registry):
    assert await registry.get(CID) is None
    await registry.register(record(), now=200.0)
    stored = await registry.get(CID)
    assert stored is not None
    view = stored.as_json()
    assert view["connection_id"] == CID
    assert view["channels"] == ["guide", "pillar:content"]
    assert view["metadata"] == {"ua": "test"}
    assert view["connected_at"] == 100.0 and view["last_heartbeat"] == 200.0


async def test_get_reads_a_damaged_record_as_none_fields(redis, registry):
    # A hash written by hand (or by an older version): what cannot be read is None, never an
    # exception, and a field the hash lacks is left out of the public view.
    await redis.hset(
        names.connection(CID),
        mapping={"user_id": "alice", "channels": "not json", "connected_at": "soon"},
    )
    stored = await registry.get(CID)
    assert stored is not None
    assert (stored.user_id, stored.gateway_instance, stored.channels) == ("alice", None, None)
    assert stored.connected_at is None and stored.metadata is None
    assert stored.as_json() == {
        "connection_id": CID,
        "user_id": "alice",
        "channels": None,
        "metadata": None,
        "connected_at": None,
        "last_heartbeat": None,
    }
    assert await registry.gateway_of(CID) is None


async def test_a_reader_cannot_write_records(redis):
    reader = Registry(redis)
    with pytest.raises(RuntimeError, match="built without record_ttl: it cannot write records"):
        await reader.register(record())
    assert await redis.exists(names.connection(CID)) == 0


async def _keys_left(redis: Redis) -> set[bytes]:
    return set(await redis.keys("*"))


async def test_unregister_removes_everything_and_announces_once(redis, registry, events):
    await registry.register(record(session_id="sess_aaaaaaaaaaaaaaaa"))
    # Traffic Cop's session set holds the connection too; unregister removes it from there.
    await redis.sadd(names.session_connections("sess_aaaaaaaaaaaaaaaa"), CID)
    await redis.sadd(names.session_connections("sess_aaaaaaaaaaaaaaaa"), "other")
    await drain(redis, events)

    assert await registry.unregister(CID, reason="bye") == 1
    assert await _keys_left(redis) == {names.session_connections("sess_aaaaaaaaaaaaaaaa").encode()}
    assert await redis.smembers(names.session_connections("sess_aaaaaaaaaaaaaaaa")) == {b"other"}
    [event] = await drain(redis, events)
    assert event["type"] == "disconnected" and event["reason"] == "bye"
    assert event["connection_id"] == CID and event["user_id"] == "alice"

    assert await registry.unregister(CID, reason="again") == 0
    assert await drain(redis, events) == []


async def test_unregister_of_an_unknown_id_cleans_a_dangling_last_seen_entry(
    redis, registry, events
):
    await redis.zadd(names.LAST_SEEN, {CID: 5})
    assert await registry.unregister(CID) == 0
    assert await redis.zscore(names.LAST_SEEN, CID) is None
    assert await drain(redis, events) == []


async def test_stale_before_recheck_leaves_a_revived_connection_alone(redis, registry, events):
    await registry.register(record(), now=100.0)
    await drain(redis, events)
    assert await registry.stale(cutoff=150.0, limit=10) == [CID]
    await registry.touch({CID: 200.0})  # the connection spoke after the worker's scan
    assert await registry.unregister(CID, event="evicted", stale_before=150.0) == -1
    assert await redis.exists(names.connection(CID)) == 1
    assert await drain(redis, events) == []
    assert await registry.unregister(CID, event="evicted", reason="idle", stale_before=250.0) == 1
    [event] = await drain(redis, events)
    assert event["type"] == "evicted" and event["reason"] == "idle"


async def test_expected_gateway_mismatch(redis, registry, events):
    await registry.register(record(gateway="gw-1"))
    await drain(redis, events)
    assert await registry.unregister(CID, expected_gateway="gw-2") == -2
    assert await redis.exists(names.connection(CID)) == 1
    assert await drain(redis, events) == []
    assert await registry.unregister(CID, expected_gateway="gw-1") == 1


async def test_unregister_many_with_close_code_tells_the_gateway(redis, registry, events):
    other = "ws_bob_00000001"
    await registry.register(record())
    await registry.register(record(cid=other, user="bob", gateway="gw-2"))
    control = redis.pubsub()
    await control.subscribe(names.gateway_control("gw-1"))
    control2 = redis.pubsub()
    await control2.subscribe(names.gateway_control("gw-2"))
    try:
        await drain(redis, events)
        result = await registry.unregister_many(
            [CID, other, "ws_nobody_00000000"], event="evicted", reason="idle", close_code=1008
        )
        assert result == [1, 1, 0]
        assert await _keys_left(redis) == set()
        evs = await drain(redis, events)
        assert sorted(e["connection_id"] for e in evs) == sorted([CID, other])
        assert {e["type"] for e in evs} == {"evicted"}
        gw1 = await drain(redis, control, names.gateway_control("gw-1"))
        assert gw1 == [{"op": "close", "connection_id": CID, "code": 1008, "reason": "idle"}]
        gw2 = await drain(redis, control2, names.gateway_control("gw-2"))
        assert gw2 == [{"op": "close", "connection_id": other, "code": 1008, "reason": "idle"}]
        # A second pass finds nothing and tells nobody anything.
        assert await registry.unregister_many([CID, other], close_code=1008) == [0, 0]
        assert await drain(redis, control, names.gateway_control("gw-1")) == []
        assert await drain(redis, events) == []
    finally:
        await control.aclose()
        await control2.aclose()


async def test_unregister_many_without_close_code_sends_no_control(redis, registry):
    await registry.register(record())
    control = redis.pubsub()
    await control.subscribe(names.gateway_control("gw-1"))
    try:
        assert await registry.unregister_many([CID]) == [1]
        assert await drain(redis, control, names.gateway_control("gw-1")) == []
        assert await registry.unregister_many([]) == []
    finally:
        await control.aclose()


async def test_touch_updates_scores_ttl_and_channels(redis, registry):
    await registry.register(record(channels=("guide",)), now=100.0)
    await redis.expire(names.connection(CID), 5)
    await registry.touch(
        {CID: 300.0},
        channels_used={CID: ["pillar:insights"]},
        all_channels={CID: ["guide", "pillar:insights"]},
    )
    assert await redis.zscore(names.LAST_SEEN, CID) == 300.0
    assert float(await redis.hget(names.connection(CID), "last_heartbeat")) == 300.0
    assert await redis.ttl(names.connection(CID)) > 5
    assert await redis.sismember(names.channel_connections("pillar:insights"), CID)
    assert orjson.loads(await redis.hget(names.connection(CID), "channels")) == [
        "guide",
        "pillar:insights",
    ]
    # The new channel is indexed, so unregistering removes it from there too.
    assert await registry.unregister(CID) == 1
    assert not await redis.exists(names.channel_connections("pillar:insights"))
    await registry.touch({})  # nothing to do is not an error


async def test_touch_does_not_resurrect_an_unregistered_connection(redis, registry):
    # A gateway's tick racing the eviction worker: the record is gone by the time the touch
    # lands. It must not come back as a half record (no user_id) that lingers for the TTL.
    await registry.register(record())
    assert await registry.unregister(CID) == 1
    await registry.touch({CID: 500.0}, channels_used={CID: ["guide"]})
    assert await redis.exists(names.connection(CID)) == 0
    assert await redis.zscore(names.LAST_SEEN, CID) is None
    assert await redis.exists(names.channel_connections("guide")) == 0
    assert await registry.get(CID) is None


async def _stream_data(redis: Redis, channel: str) -> list[bytes]:
    return [fields[b"data"] for _id, fields in await redis.xrange(names.stream(channel))]


async def test_publish_or_queue_queued_published_refused_in_order(redis, registry):
    channel = "guide"
    # Nobody reads the channel: accepted into the stream ("queued") up to the bound.
    assert await registry.publish_or_queue(channel, b"m1", 2) == PublishResult.QUEUED
    assert await registry.publish_or_queue(channel, b"m2", 2) == PublishResult.QUEUED
    assert await registry.publish_or_queue(channel, b"m3", 2) == PublishResult.REFUSED
    assert await _stream_data(redis, channel) == [b"m1", b"m2"]
    tap = redis.pubsub()
    await tap.subscribe(names.agent_channel(channel))
    try:
        # A group created at 0 gets the messages held before it existed, oldest first.
        await redis.xgroup_create(names.stream(channel), "agents", id="0")
        read = await redis.xreadgroup("agents", "a1", {names.stream(channel): ">"}, count=10)
        assert [f[b"data"] for _i, f in read[0][1]] == [b"m1", b"m2"]
        # Both delivered, neither acked: still 2 unconsumed, so still refused.
        assert await registry.publish_or_queue(channel, b"m3", 2) == PublishResult.REFUSED
        await redis.xack(names.stream(channel), "agents", read[0][1][0][0])
        assert await registry.publish_or_queue(channel, b"m3", 2) == PublishResult.PUBLISHED
        # The tap got what was accepted while it listened, nothing refused.
        assert (await next_message(tap))["data"] == b"m3"
        assert await _stream_data(redis, channel) == [b"m1", b"m2", b"m3"]
    finally:
        await tap.aclose()


async def test_publish_refuses_on_the_slowest_group(redis, registry):
    channel = "pillar:content"
    for group in ("fast", "slow"):
        await redis.xgroup_create(names.stream(channel), group, id="0", mkstream=True)
    # Without a tap subscriber or a live consumer it is "queued"; one says it is live.
    assert await registry.publish_or_queue("guide", b"q", 3) == PublishResult.QUEUED
    await Streams(redis).heartbeat(channel, "fast", "f")
    for i in range(3):
        assert await registry.publish_or_queue(channel, b"%d" % i, 3) == PublishResult.PUBLISHED
    read = await redis.xreadgroup("fast", "f", {names.stream(channel): ">"}, count=10)
    await redis.xack(names.stream(channel), "fast", *[i for i, _f in read[0][1]])
    # "fast" has nothing left, "slow" has 3 unread: the slowest group decides.
    assert await registry.publish_or_queue(channel, b"x", 3) == PublishResult.REFUSED
    assert await redis.xlen(names.stream(channel)) == 3


async def test_publish_or_queue_batched_in_one_round_trip(redis, registry):
    calls = [registry.publish_or_queue_call("guide", data, 1) for data in (b"a", b"b")]
    assert await registry.run_scripts(calls) == [PublishResult.QUEUED, PublishResult.REFUSED]
    assert await _stream_data(redis, "guide") == [b"a"]


async def test_run_scripts_reloads_scripts_redis_forgot_and_runs_each_once(redis, registry):
    # A Redis restart or SCRIPT FLUSH forgets loaded scripts: EVALSHA then fails with
    # NOSCRIPT without running, and only those runs are repeated after loading.
    await redis.script_flush()
    calls = [registry.publish_or_queue_call("guide", data, 10) for data in (b"a", b"b", b"c")]
    assert await registry.run_scripts(calls) == [PublishResult.QUEUED] * 3
    assert await _stream_data(redis, "guide") == [b"a", b"b", b"c"]
    await redis.script_flush()
    await registry.register(record(cid="ws_u_0000aaaa"))
    assert await registry.unregister_many(["ws_u_0000aaaa"]) == [1]


async def test_run_scripts_sends_no_script_exists(redis, registry):
    # redis-py pipelines with scripts send SCRIPT EXISTS on every execute; run_scripts must not.
    await registry.run_scripts([registry.publish_or_queue_call("guide", b"warm", 10)])
    before = await redis.info("commandstats")
    await registry.run_scripts([registry.publish_or_queue_call("guide", b"x", 10)] * 5)
    after = await redis.info("commandstats")
    exists = "cmdstat_script|exists"
    assert after.get(exists, {}).get("calls", 0) == before.get(exists, {}).get("calls", 0)
    assert after["cmdstat_evalsha"]["calls"] == before["cmdstat_evalsha"]["calls"] + 5


async def test_forget_gateway_respects_a_revived_liveness_key(redis, registry):
    await registry.register(record(gateway="gw-9"))
    await redis.sadd(names.GATEWAYS, "gw-9")
    await redis.set(names.gateway_instance("gw-9"), "1", ex=30)
    assert await registry.forget_gateway("gw-9") is False
    assert await redis.sismember(names.GATEWAYS, "gw-9")
    assert await redis.exists(names.gateway_connections("gw-9")) == 1
    await redis.delete(names.gateway_instance("gw-9"))
    assert await registry.forget_gateway("gw-9") is True
    assert not await redis.sismember(names.GATEWAYS, "gw-9")
    assert await redis.exists(names.gateway_connections("gw-9")) == 0


def test_record_ttl_is_at_least_one_second():
    assert Registry(Redis(), record_ttl=0.2).record_ttl == 1


async def test_the_batch_publish_script_answers_as_one_script_per_message(redis) -> None:
    # The gateway sends a channel's messages of a batch as one script run; its codes must be
    # what a script per message would have answered, across the STREAM_MAX_PENDING bound, with
    # and without a group that consumed and acked part of the stream.
    from shared import redis_names as names
    from shared.registry import Registry

    registry = Registry(redis)
    bound = 5

    async def one_by_one(channel: str, n: int) -> list[int]:
        return [
            int(r)
            for r in await registry.run_scripts(
                [registry.publish_or_queue_call(channel, b"m%d" % i, bound) for i in range(n)]
            )
        ]

    async def batched(channel: str, n: int) -> list[int]:
        [codes] = await registry.run_scripts(
            [registry.publish_batch_call(channel, [b"m%d" % i for i in range(n)], bound)]
        )
        return [int(c) for c in codes]

    # No group: the stream's length is what is unconsumed.
    assert await one_by_one("guide", 8) == await batched("pillar:content", 8) == [2] * 5 + [0] * 3
    # A group that read and acked 3 of the 5: room for 3 more, then refused.
    for channel in ("pillar:insights", "pillar:operations"):
        stream = names.stream(channel)
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
        for i in range(5):
            await redis.xadd(stream, {"data": b"old%d" % i})
        read = await redis.xreadgroup("g", "c", {stream: ">"}, count=3)
        await redis.xack(stream, "g", *[entry_id for entry_id, _ in read[0][1]])
    expected = [2, 2, 2, 0, 0]  # 2 unconsumed + 3 more reach the bound
    assert await one_by_one("pillar:insights", 5) == expected
    assert await batched("pillar:operations", 5) == expected
    assert await batched("pillar:business_outcomes", 0) == []
