"""The API's consumer groups (services/post_office_api/consumers.py) in-process against a real
redis-server: the group SSE stream, the in-flight limit, resuming, batch acks, the ack of a
reply, dead letters, a raw XREADGROUP consumer next to the API's, and every refusal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from services.post_office_api.app import create_app
from services.post_office_api.keys import HUB
from shared import redis_names as names
from shared.protocol import new_connection_id
from shared.registry import ConnectionRecord, Registry
from shared.streams import Streams
from tests.api_util import (
    ProductionServer,
    api_settings,
    auth,
    listening,
    read_event,
    read_until_subscribed,
)
from tests.helpers import timeout, wait_for

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_client(aiohttp_client: Any, redis_url: str) -> AsyncIterator[MakeClient]:
    async def make(**overrides: Any) -> Client:
        settings = {"group_block_seconds": 0.1, "group_poll_seconds": 0.01, **overrides}
        app = create_app(api_settings(redis_url, **settings))
        client: Client = await aiohttp_client(ProductionServer(app))
        await wait_for(lambda: app[HUB].connected, what="hub connected")
        return client

    yield make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def publish(client: Client, n: int, channel: str = "guide") -> list[str]:
    ids = []
    for i in range(n):
        resp = await client.post(
            f"/v1/channels/{channel}/messages",
            data=orjson.dumps({"message": {"n": i}}),
            headers=auth(),
        )
        assert resp.status == 202, await resp.text()
        ids.append((await resp.json())["message_id"])
    return ids


async def consume(
    client: Client,
    consumer: str,
    group: str = "guide",
    channel: str = "guide",
    headers: dict[str, str] | None = None,
    **query: str,
) -> aiohttp.ClientResponse:
    resp = await client.get(
        f"/v1/channels/{channel}/groups/{group}/events",
        params={"consumer": consumer, **query},
        headers={**auth("business_enablement"), **(headers or {})},
    )
    assert resp.status == 200, await resp.text()
    await read_until_subscribed(resp)
    return resp


async def events(resp: aiohttp.ClientResponse, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        event = await read_event(resp)
        assert event is not None
        data = orjson.loads(event["data"])
        assert data["stream_id"] == event["id"]
        out.append(data)
    return out


async def nothing_for(resp: aiohttp.ClientResponse, seconds: float = 0.3) -> None:
    """No event within ``seconds`` (keep-alive comments do not count)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            raw = await asyncio.wait_for(resp.content.readline(), left)
        except TimeoutError:
            return
        assert raw.startswith((b":", b"\r\n", b"\n")), raw


async def ack(client: Client, ids: list[str], group: str = "guide") -> dict[str, Any]:
    resp = await client.post(
        f"/v1/channels/guide/groups/{group}/acks", json={"ids": ids}, headers=auth()
    )
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def test_two_consumers_share_a_group_and_a_raw_consumer_gets_the_same_messages(
    client: Client, redis: Redis
) -> None:
    a = await consume(client, "a", max_in_flight="10")
    b = await consume(client, "b", max_in_flight="10")
    # A raw-Redis agent of another kind, with its own group, as docs/api.md shows it.
    stream = names.stream("guide")
    await redis.xgroup_create(stream, "raw", id="0", mkstream=True)
    async with listening(redis, names.agent_channel("guide")) as tap:
        sent = await publish(client, 10)
        taps = [orjson.loads((await tap.next())[1])["message_id"] for _ in range(10)]
    assert taps == sent  # the tap sees everything, once
    got: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    done = asyncio.Event()

    async def reader(name: str, resp: aiohttp.ClientResponse) -> None:
        while (event := await read_event(resp)) is not None:
            got[name].append(orjson.loads(event["data"]))
            if sum(map(len, got.values())) >= 10:
                done.set()

    tasks = [asyncio.create_task(reader(n, r)) for n, r in (("a", a), ("b", b))]
    try:
        await asyncio.wait_for(done.wait(), timeout(10))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    ids = [m["message_id"] for m in got["a"] + got["b"]]
    assert sorted(ids) == sorted(sent)  # each exactly once over the group
    assert all(m["deliveries"] == 1 and m["group"] == "guide" for m in got["a"] + got["b"])
    raw = await redis.xreadgroup("raw", "r1", {stream: ">"}, count=100)
    raw_messages = [orjson.loads(f[b"data"]) for _i, f in raw[0][1]]
    assert [m["message_id"] for m in raw_messages] == sent
    # The same agent message: the API adds only its delivery fields.
    api_view = {m["message_id"]: m for m in got["a"] + got["b"]}
    for m in raw_messages:
        extra = {"stream_id", "channel", "group", "deliveries"}
        assert {k: v for k, v in api_view[m["message_id"]].items() if k not in extra} == m
    answer = await ack(client, [m["stream_id"] for m in got["a"] + got["b"]])
    assert answer == {"acked": 10, "ids": 10}
    assert (await redis.xpending(stream, "guide"))["pending"] == 0
    a.close()
    b.close()


async def test_in_flight_limit_and_batch_ack(client: Client, redis: Redis) -> None:
    sent = await publish(client, 5)
    resp = await consume(client, "solo", max_in_flight="2")
    first = await events(resp, 2)
    assert [m["message_id"] for m in first] == sent[:2]
    await nothing_for(resp)  # at its limit: nothing more until it acks
    assert await ack(client, [m["stream_id"] for m in first]) == {"acked": 2, "ids": 2}
    assert [m["message_id"] for m in await events(resp, 2)] == sent[2:4]
    # A raw XACK counts as well: acks made anywhere free room.
    pending = await redis.xpending_range(names.stream("guide"), "guide", "-", "+", 10)
    await redis.xack(names.stream("guide"), "guide", *[p["message_id"] for p in pending])
    assert [m["message_id"] for m in await events(resp, 1)] == sent[4:]
    resp.close()


async def test_reconnect_resends_pending_after_last_event_id(client: Client, redis: Redis) -> None:
    sent = await publish(client, 3)
    first = await consume(client, "r")
    got = await events(first, 3)
    first.close()
    # Back with Last-Event-ID = the 2nd: only the 3rd comes again (unacked, after it).
    again = await consume(client, "r", headers={"Last-Event-ID": got[1]["stream_id"]})
    [third] = await events(again, 1)
    assert third["message_id"] == sent[2]
    more = await publish(client, 1)
    assert [m["message_id"] for m in await events(again, 1)] == more
    again.close()
    # Back without it: everything this consumer still holds, oldest first.
    fresh = await consume(client, "r")
    assert [m["message_id"] for m in await events(fresh, 4)] == [*sent, *more]
    fresh.close()


async def test_a_reply_acks_the_message_it_answers(client: Client, redis: Redis) -> None:
    cid = new_connection_id("alice")
    await Registry(redis, 60).register(
        ConnectionRecord(cid, "alice", "sess_0123456789abcdef", "gw-1", time.time())
    )
    await redis.set(names.gateway_instance("gw-1"), "1", ex=60)
    await publish(client, 1)
    resp = await consume(client, "replier")
    [message] = await events(resp, 1)
    ack_field = {"channel": "guide", "group": "guide", "id": message["stream_id"]}
    async with listening(redis, names.connection_messages(cid)) as gateway:
        answer = await client.post(
            f"/v1/connections/{cid}/messages",
            json={"message": {"type": "reply"}, "ack": ack_field},
            headers=auth("business_enablement"),
        )
        assert answer.status == 202, await answer.text()
        assert await answer.json() == {"delivered": 1, "acked": 1}
        assert orjson.loads((await gateway.next())[1]) == {"type": "reply"}
    assert (await redis.xpending(names.stream("guide"), "guide"))["pending"] == 0
    # The client is gone: the ack still happens (redelivery would not bring it back).
    await publish(client, 1)
    [second] = await events(resp, 1)
    gone = await client.post(
        f"/v1/connections/{new_connection_id('bob')}/messages",
        json={
            "message": {},
            "ack": {"channel": "guide", "group": "guide", "ids": [second["stream_id"]]},
        },
        headers=auth(),
    )
    assert gone.status == 410
    assert (await redis.xpending(names.stream("guide"), "guide"))["pending"] == 0
    resp.close()


async def test_dead_letters_are_listed_and_requeued(client: Client, redis: Redis) -> None:
    streams = Streams(redis)
    await streams.ensure_group("guide", "guide")
    sent = await publish(client, 2)
    await streams.read_new("guide", "guide", "poison", 10, 0)
    await streams.heartbeat("guide", "guide", "other")
    result = await streams.reclaim("guide", "guide", "other", min_idle_ms=0, max_deliveries=1)
    assert (result.handed, result.dead) == (0, 2)
    resp = await client.get("/v1/channels/guide/dead-letters?limit=1", headers=auth())
    assert resp.status == 200
    page = await resp.json()
    [letter] = page["dead_letters"]
    assert letter["message"]["message_id"] == sent[0]
    assert (letter["group"], letter["deliveries"], letter["reason"]) == (
        "guide",
        1,
        "max_deliveries",
    )
    resp = await client.get(f"/v1/channels/guide/dead-letters?after={page['next']}", headers=auth())
    [second] = (await resp.json())["dead_letters"]
    assert second["message"]["message_id"] == sent[1]
    resp = await client.post(
        "/v1/channels/guide/dead-letters/requeue",
        json={"ids": [letter["id"], "1-1"]},
        headers=auth(),
    )
    answer = await resp.json()
    assert [r["id"] for r in answer["requeued"]] == [letter["id"]] and answer["unknown"] == ["1-1"]
    consumer = await consume(client, "fixed")
    [again] = await events(consumer, 1)
    assert (
        again["message_id"] == sent[0] and again["stream_id"] == answer["requeued"][0]["stream_id"]
    )
    consumer.close()


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/channels/guide/groups/bad%20group/events?consumer=c", 400, "bad_request"),
        ("/v1/channels/guide/groups/g/events", 400, "bad_request"),
        ("/v1/channels/guide/groups/g/events?consumer=c&max_in_flight=0", 400, "bad_request"),
        ("/v1/channels/guide/groups/g/events?consumer=c&max_in_flight=99999", 400, "bad_request"),
        ("/v1/channels/nope/groups/g/events?consumer=c", 404, "unknown_channel"),
        ("/v1/channels/guide/dead-letters?limit=0", 400, "bad_request"),
        ("/v1/channels/guide/dead-letters?after=x", 400, "bad_request"),
    ],
)
async def test_bad_consumer_requests_get_json_errors(
    client: Client, path: str, status: int, code: str
) -> None:
    resp = await client.get(path, headers=auth())
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"{",
        b'{"ids": []}',
        b'{"ids": ["x"]}',
        b'{"ids": ["1-0"], "more": 1}',
        b'{"id": "1-0"}',
    ],
)
async def test_bad_ack_bodies_are_400(client: Client, payload: bytes) -> None:
    resp = await client.post("/v1/channels/guide/groups/g/acks", data=payload, headers=auth())
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] in ("bad_request", "invalid_json")


async def test_ack_limits_and_a_bad_ack_in_a_reply(make_client: MakeClient) -> None:
    client = await make_client(group_max_ack_ids=2)
    resp = await client.post(
        "/v1/channels/guide/groups/g/acks", json={"ids": ["1-0", "2-0", "3-0"]}, headers=auth()
    )
    assert resp.status == 400 and "at most 2" in (await resp.json())["error"]["message"]
    cid = new_connection_id("carol")
    for bad, status in [
        ({"channel": "nope", "group": "g", "id": "1-0"}, 404),
        ({"channel": "guide", "group": "g g", "id": "1-0"}, 400),
        ({"channel": "guide", "group": "g"}, 400),
        ("1-0", 400),
    ]:
        resp = await client.post(
            f"/v1/connections/{cid}/messages", json={"message": {}, "ack": bad}, headers=auth()
        )
        assert resp.status == status, (bad, await resp.text())


async def test_group_consumer_limit_is_503(make_client: MakeClient) -> None:
    client = await make_client(group_max_consumers=1)
    first = await consume(client, "one")
    resp = await client.get(
        "/v1/channels/guide/groups/guide/events", params={"consumer": "two"}, headers=auth()
    )
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
    # The same consumer name again replaces the first stream: it is not refused.
    again = await consume(client, "one")
    assert await read_event(first) is None  # the older stream ended
    again.close()
    first.close()
