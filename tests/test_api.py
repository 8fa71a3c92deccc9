"""Post Office API through ``aiohttp_client(create_app(settings))`` against a real redis-server.

Covers every /v1 call, the whole capability matrix, JSON errors (400, 401, 403, 404, 410, 413,
503), the OpenAPI document against the router, and the SSE hub (one shared pub/sub
connection, ordering, unsubscription, overflow, reconnection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from services.post_office_api.app import PUBSUB_CLIENT_NAME, create_app
from services.post_office_api.auth import ROUTE_CAPABILITIES
from services.post_office_api.keys import HUB
from services.post_office_api.settings import ApiSettings
from shared import redis_names as names
from shared.protocol import new_connection_id
from shared.registry import ConnectionRecord, Registry
from tests.api_util import (
    ProductionServer,
    api_settings,
    auth,
    listening,
    numsub,
    read_event,
    read_until_subscribed,
)
from tests.helpers import PRODUCTION_ENV, ServiceProcess, stream_data, timeout, wait_for

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

DEEP: Any = 1
for _ in range(40):
    DEEP = [DEEP]

MESSAGE = {"type": "notice", "text": "hello", "n": [1, 2, {"x": None}]}


@pytest.fixture
async def make_client(aiohttp_client: Any, redis_url: str) -> AsyncIterator[MakeClient]:
    async def make(**overrides: Any) -> Client:
        app = create_app(api_settings(redis_url, **overrides))
        client: Client = await aiohttp_client(ProductionServer(app))
        await wait_for(lambda: app[HUB].connected, what="hub connected")
        return client

    yield make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def register(
    redis: Redis,
    user: str = "alice",
    gateway: str = "gw-1",
    channels: tuple[str, ...] = ("guide",),
    alive: bool = True,
) -> str:
    cid = new_connection_id(user)
    await Registry(redis, 60).register(
        ConnectionRecord(
            connection_id=cid,
            user_id=user,
            session_id="sess_0123456789abcdef",
            gateway_instance=gateway,
            connected_at=time.time(),
            channels=channels,
        )
    )
    if alive:
        await redis.set(names.gateway_instance(gateway), "1", ex=60)
    return cid


def body(message: dict[str, Any] = MESSAGE) -> bytes:
    return orjson.dumps({"message": message})


async def error_of(resp: Any, status: int, code: str | None = None) -> str:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.content_type == "application/json"
    data = await resp.json()
    assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}, data
    if code is not None:
        assert data["error"]["code"] == code, data
    return str(data["error"]["message"])


# -- OpenAPI --------------------------------------------------------------------------------


async def test_openapi_documents_exactly_the_routes(client: Client) -> None:
    resp = await client.get("/v1/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    routed = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/v1/")
        and route.method != "HEAD"
    }
    assert routed - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routed == set(), "documented operations without a route"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            route = next(
                r
                for r in client.app.router.routes()
                if r.method == method.upper()
                and r.resource is not None
                and r.resource.canonical == path
            )
            assert op["operationId"] == route.name
            if route.name is not None and route.name in ROUTE_CAPABILITIES:
                assert set(op["x-capabilities"]) == set(ROUTE_CAPABILITIES[route.name])
                assert {"401", "403"} <= set(op["responses"])


# -- authentication and the capability matrix ------------------------------------------------

CID = "ws_alice_0badc0de"

CALLS: dict[str, tuple[str, str, bytes | None]] = {
    "get_websocket_endpoint": ("GET", "/v1/websocket-endpoint?session_token=t", None),
    "publish_to_channel": ("POST", "/v1/channels/guide/messages", body()),
    "subscribe_to_channel": ("GET", "/v1/channels/guide/events", None),
    "send_to_connection": ("POST", f"/v1/connections/{CID}/messages", body()),
    "get_connection": ("GET", f"/v1/connections/{CID}", None),
    "close_connection": ("DELETE", f"/v1/connections/{CID}", None),
    "send_to_user": ("POST", "/v1/users/alice/messages", body()),
    "broadcast_to_channel": ("POST", "/v1/channels/guide/broadcast", body()),
    "consume_group": ("GET", "/v1/channels/guide/groups/guide/events?consumer=c1", None),
    "ack_group": ("POST", "/v1/channels/guide/groups/guide/acks", b'{"ids": ["1-0"]}'),
    "list_dead_letters": ("GET", "/v1/channels/guide/dead-letters", None),
    "requeue_dead_letters": ("POST", "/v1/channels/guide/dead-letters/requeue", b'{"ids":["1-0"]}'),
}
#: Answers of an allowed call in this set-up (no connection registered, nobody listening).
ALLOWED_STATUS = {
    "get_websocket_endpoint": 200,
    "publish_to_channel": 202,
    "subscribe_to_channel": 200,
    "send_to_connection": 410,
    "get_connection": 404,
    "close_connection": 404,
    "send_to_user": 202,
    "broadcast_to_channel": 202,
    "consume_group": 200,
    "ack_group": 200,
    "list_dead_letters": 200,
    "requeue_dead_letters": 200,
}


#: SPEC "Post Office HTTP API", copied by hand: the test must not derive its expectations
#: from the code under test.
SPEC_REALM_CAPABILITIES = {
    "smart_city": {
        "websocket_endpoint",
        "agent_messaging",
        "agent_channel_publish",
        "agent_channel_subscribe",
        "connection_messaging",
    },
    "experience": {"websocket_endpoint", "agent_messaging"},
    "business_enablement": {
        "agent_channel_publish",
        "agent_channel_subscribe",
        "connection_messaging",
    },
}
#: SPEC's call -> capability table (any one of them allows the call).
SPEC_CALL_CAPABILITIES = {
    "get_websocket_endpoint": {"websocket_endpoint"},
    "publish_to_channel": {"agent_channel_publish", "agent_messaging"},
    "subscribe_to_channel": {"agent_channel_subscribe"},
    "send_to_connection": {"connection_messaging"},
    "get_connection": {"connection_messaging"},
    "close_connection": {"connection_messaging"},
    "send_to_user": {"connection_messaging"},
    "broadcast_to_channel": {"connection_messaging"},
    # Consuming through a group, acking and the dead letters are subscribing's durable form.
    "consume_group": {"agent_channel_subscribe"},
    "ack_group": {"agent_channel_subscribe"},
    "list_dead_letters": {"agent_channel_subscribe"},
    "requeue_dead_letters": {"agent_channel_subscribe"},
}
#: The resulting matrix, spelt out: who may call what.
SPEC_ALLOWED = {
    "smart_city": set(SPEC_CALL_CAPABILITIES),
    "experience": {"get_websocket_endpoint", "publish_to_channel"},
    "business_enablement": {
        "publish_to_channel",
        "subscribe_to_channel",
        "send_to_connection",
        "get_connection",
        "close_connection",
        "send_to_user",
        "broadcast_to_channel",
        "consume_group",
        "ack_group",
        "list_dead_letters",
        "requeue_dead_letters",
    },
}


def test_every_route_is_in_the_matrix() -> None:
    assert set(CALLS) == set(ROUTE_CAPABILITIES) == set(ALLOWED_STATUS)
    assert set(SPEC_CALL_CAPABILITIES) == set(CALLS)
    for realm, calls in SPEC_ALLOWED.items():  # the spelt-out matrix agrees with the tables
        expected = {
            c for c, caps in SPEC_CALL_CAPABILITIES.items() if caps & SPEC_REALM_CAPABILITIES[realm]
        }
        assert calls == expected, realm


@pytest.mark.parametrize("realm", sorted(SPEC_ALLOWED))
@pytest.mark.parametrize("call", sorted(CALLS))
async def test_capability_matrix(client: Client, realm: str, call: str) -> None:
    method, path, data = CALLS[call]
    resp = await client.request(method, path, data=data, headers=auth(realm))
    try:
        if call in SPEC_ALLOWED[realm]:
            assert resp.status == ALLOWED_STATUS[call], (resp.status, await resp.text())
        else:
            message = await error_of(resp, 403, "forbidden")
            assert realm in message
            assert any(cap in message for cap in SPEC_CALL_CAPABILITIES[call])
    finally:
        resp.close()


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize(
    "header", [None, "Bearer nope", "Basic dev-smart_city", "Bearer ", "dev-smart_city"]
)
async def test_401_without_a_valid_realm_key(client: Client, call: str, header: str | None) -> None:
    method, path, data = CALLS[call]
    headers = {} if header is None else {"Authorization": header}
    resp = await client.request(method, path, data=data, headers=headers)
    await error_of(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_openapi_needs_no_key_and_unknown_paths_are_json_404(client: Client) -> None:
    assert (await client.get("/v1/openapi.json")).status == 200
    await error_of(await client.get("/v1/nothing", headers=auth()), 404, "not_found")
    await error_of(await client.get("/api/ws/guide"), 404, "not_found")
    resp = await client.put(f"/v1/connections/{CID}", headers=auth())
    await error_of(resp, 405, "method_not_allowed")


def test_production_refuses_development_and_short_keys(redis_url: str) -> None:
    from shared.settings import SettingsError, load

    long_key = "k" * 40
    with pytest.raises(SettingsError, match="production"):
        load(ApiSettings, "POST_OFFICE_", dict(PRODUCTION_ENV))
    with pytest.raises(SettingsError, match="development keys"):  # any case
        load(
            ApiSettings,
            "POST_OFFICE_",
            {**PRODUCTION_ENV, "REALM_KEYS": f"DEV-{long_key}:smart_city"},
        )
    with pytest.raises(SettingsError, match="at least 32 characters"):
        load(
            ApiSettings,
            "POST_OFFICE_",
            {**PRODUCTION_ENV, "REALM_KEYS": "k1:smart_city"},
        )
    production = {**PRODUCTION_ENV, "REALM_KEYS": f"{long_key}:smart_city"}
    with pytest.raises(SettingsError, match="TRAFFIC_COP_SERVICE_KEY"):
        load(ApiSettings, "POST_OFFICE_", production)
    settings = load(
        ApiSettings, "POST_OFFICE_", {**production, "TRAFFIC_COP_SERVICE_KEY": "t" * 40}
    )
    assert long_key not in repr(settings) and "t" * 40 not in repr(settings)
    load(ApiSettings, "POST_OFFICE_", {**production, "TRAFFIC_COP_URL": ""})  # reports off
    with pytest.raises(SettingsError, match="unknown realm"):
        load(ApiSettings, "POST_OFFICE_", {"REALM_KEYS": "k1:nowhere"})
    with pytest.raises(SettingsError, match="POST_OFFICE_TYPO"):
        load(ApiSettings, "POST_OFFICE_", {"POST_OFFICE_TYPO": "1"})


@pytest.mark.parametrize(
    "channels",
    ["guide,events", "connection:x", "queue", "a:b:c", "gui de", "guide,guide", "x" * 65, "USER:x"],
)
def test_unsafe_channel_names_are_refused(channels: str) -> None:
    from shared.settings import SettingsError, load

    with pytest.raises(SettingsError, match="POST_OFFICE_CHANNELS"):
        load(ApiSettings, "POST_OFFICE_", {"POST_OFFICE_CHANNELS": channels})


def test_body_and_event_limits_are_consistent() -> None:
    from shared.settings import SettingsError, load

    with pytest.raises(SettingsError, match="MAX_BODY_BYTES"):
        load(ApiSettings, "POST_OFFICE_", {"POST_OFFICE_MAX_BODY_BYTES": str(2 * 1024 * 1024)})
    with pytest.raises(SettingsError, match="SSE_MAX_EVENT_BYTES"):
        load(
            ApiSettings,
            "POST_OFFICE_",
            {"POST_OFFICE_MAX_BODY_BYTES": "65536", "POST_OFFICE_SSE_MAX_EVENT_BYTES": "65536"},
        )


async def test_custom_realm_keys(make_client: MakeClient) -> None:
    client = await make_client(realm_keys=("s3cret:business_enablement",))
    ok = await client.get(f"/v1/connections/{CID}", headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 404
    await error_of(await client.get(f"/v1/connections/{CID}", headers=auth()), 401)


# -- send_to_connection ---------------------------------------------------------------------


async def test_send_to_connection_delivers_the_exact_frame(client: Client, redis: Redis) -> None:
    cid = await register(redis)
    async with listening(redis, names.connection_messages(cid)) as gateway:
        resp = await client.post(f"/v1/connections/{cid}/messages", data=body(), headers=auth())
        assert resp.status == 202
        assert await resp.json() == {"delivered": 1}
        channel, frame = await gateway.next()
    assert channel == names.connection_messages(cid)
    assert orjson.loads(frame) == MESSAGE
    assert frame == orjson.dumps(MESSAGE)


async def test_send_to_connection_410_and_stale_record_removed(
    client: Client, redis: Redis
) -> None:
    cid = await register(redis, gateway="gw-dead", alive=False)
    resp = await client.post(f"/v1/connections/{cid}/messages", data=body(), headers=auth())
    assert "removed" in await error_of(resp, 410, "gone")
    assert not await redis.exists(names.connection(cid))
    assert not await redis.sismember(names.user_connections("alice"), cid)
    assert not await redis.sismember(names.gateway_connections("gw-dead"), cid)
    # Unknown (no record at all): 410 too.
    resp = await client.post(f"/v1/connections/{cid}/messages", data=body(), headers=auth())
    await error_of(resp, 410, "gone")


async def test_send_to_connection_not_received_by_a_live_gateway_is_503_and_kept(
    client: Client, redis: Redis
) -> None:
    """Nobody received, but the gateway is alive (re-subscribing): nothing was delivered, so
    the answer is a retryable 503 with Retry-After, and the record stays."""
    cid = await register(redis, gateway="gw-live", alive=True)
    resp = await client.post(f"/v1/connections/{cid}/messages", data=body(), headers=auth())
    assert "not subscribed" in await error_of(resp, 503, "unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert await redis.exists(names.connection(cid))


@pytest.mark.parametrize(
    "cid", ["nope", "ws_alice_XYZ", "ws__12345678", "ws_a%20b_12345678", "ws_alice_123456789"]
)
async def test_malformed_connection_id_is_400(client: Client, cid: str) -> None:
    for method, path in (
        ("POST", f"/v1/connections/{cid}/messages"),
        ("GET", f"/v1/connections/{cid}"),
        ("DELETE", f"/v1/connections/{cid}"),
    ):
        resp = await client.request(method, path, data=body(), headers=auth())
        assert "malformed connection id" in await error_of(resp, 400, "bad_request")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{", "invalid_json"),
        (b"[]", "bad_request"),
        (b"{}", "bad_request"),
        (b'{"message": "text"}', "bad_request"),
        (b'{"message": {}, "extra": 1}', "bad_request"),
        (orjson.dumps({"message": {"a": DEEP}}), "bad_request"),
    ],
)
async def test_bad_delivery_bodies_are_400(client: Client, payload: bytes, code: str) -> None:
    for path in (
        f"/v1/connections/{CID}/messages",
        "/v1/users/alice/messages",
        "/v1/channels/guide/broadcast",
        "/v1/channels/guide/messages",
    ):
        resp = await client.post(path, data=payload, headers=auth())
        await error_of(resp, 400, code)


async def test_body_past_the_limit_is_413(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=1024)
    big = orjson.dumps({"message": {"text": "x" * 2000}})
    resp = await client.post(f"/v1/connections/{CID}/messages", data=big, headers=auth())
    assert "1024" in await error_of(resp, 413, "too_large")
    small = orjson.dumps({"message": {"text": "x" * 500}})
    resp = await client.post(f"/v1/connections/{CID}/messages", data=small, headers=auth())
    await error_of(resp, 410, "gone")


async def test_traceparent_is_accepted(client: Client, redis: Redis) -> None:
    cid = await register(redis)
    tp = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    async with listening(redis, names.connection_messages(cid)) as gateway:
        data = orjson.dumps({"message": MESSAGE, "traceparent": tp})
        resp = await client.post(f"/v1/connections/{cid}/messages", data=data, headers=auth())
        assert resp.status == 202
        _, frame = await gateway.next()
    assert orjson.loads(frame) == MESSAGE  # the socket gets the message only


async def test_an_invalid_traceparent_is_ignored_not_refused(client: Client, redis: Redis) -> None:
    """W3C Trace Context: an unparsable traceparent restarts the trace; the message goes."""
    cid = await register(redis)
    async with listening(redis, names.connection_messages(cid), names.agent_channel("guide")) as gw:
        for bad in ("nope", 5, "00-" + "0" * 10):
            data = orjson.dumps({"message": MESSAGE, "traceparent": bad})
            resp = await client.post(f"/v1/connections/{cid}/messages", data=data, headers=auth())
            assert resp.status == 202, await resp.text()
            assert (await gw.next())[1] == orjson.dumps(MESSAGE)
        data = orjson.dumps({"message": MESSAGE, "traceparent": "garbage"})
        resp = await client.post("/v1/channels/guide/messages", data=data, headers=auth())
        assert resp.status == 202
        published = orjson.loads((await gw.next())[1])
        assert published["traceparent"].startswith("00-")  # a fresh trace


# -- users, broadcast -----------------------------------------------------------------------


async def test_send_to_user(client: Client, redis: Redis) -> None:
    live = await register(redis, user="bob", gateway="gw-1")
    stale = await register(redis, user="bob", gateway="gw-dead", alive=False)
    await redis.sadd(names.user_connections("bob"), "ws_bob_deadbeef")  # orphan: no record
    async with listening(redis, names.connection_messages(live)) as gateway:
        resp = await client.post("/v1/users/bob/messages", data=body(), headers=auth())
        assert resp.status == 202
        assert await resp.json() == {"delivered": 1, "connections": 3, "stale_removed": 2}
        assert await gateway.next() == (names.connection_messages(live), orjson.dumps(MESSAGE))
    assert await redis.smembers(names.user_connections("bob")) == {live.encode()}
    assert not await redis.exists(names.connection(stale))
    resp = await client.post("/v1/users/nobody/messages", data=body(), headers=auth())
    assert await resp.json() == {"delivered": 0, "connections": 0, "stale_removed": 0}
    resp = await client.post("/v1/users/bad%20user/messages", data=body(), headers=auth())
    await error_of(resp, 400, "bad_request")


def _histogram_count(text: str, name: str, labels: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(f"{name}_count{{{labels}}}"))
    return float(line.rsplit(" ", 1)[1])


OP = 'operation="send_to_user"'


async def test_request_durations_are_per_operation_in_seconds(client: Client) -> None:
    """Latency by route name, never by raw path: two users, one series; buckets from 100 us."""
    name = "postoffice_api_request_seconds"
    resp = await client.post("/v1/users/carol/messages", data=body(), headers=auth())
    assert resp.status == 202
    # The registry is the process's: other tests' calls count too, so compare before/after.
    before = _histogram_count(await (await client.get("/metrics")).text(), name, OP)
    resp = await client.post("/v1/users/dave/messages", data=body(), headers=auth())
    assert resp.status == 202
    text = await (await client.get("/metrics")).text()
    assert _histogram_count(text, name, OP) == before + 1
    assert f'{name}_bucket{{le="0.0001",operation="send_to_user"}}' in text
    assert f'{name}_bucket{{le="10.0",operation="send_to_user"}}' in text
    assert "carol" not in text and "dave" not in text


async def test_broadcast_is_one_publish_on_the_channel(client: Client, redis: Redis) -> None:
    await register(redis, user="a", channels=("pillar:content",))
    await register(redis, user="b", channels=("pillar:content", "guide"))
    channel = names.channel_broadcast("pillar:content")
    async with listening(redis, channel) as gw1, listening(redis, channel) as gw2:
        resp = await client.post(
            "/v1/channels/pillar:content/broadcast", data=body(), headers=auth()
        )
        assert resp.status == 202
        assert await resp.json() == {"gateways": 2, "connections": 2}
        assert await gw1.next() == (channel, orjson.dumps(MESSAGE))
        assert await gw2.next() == (channel, orjson.dumps(MESSAGE))
        await gw1.nothing()
    # Percent-encoded channel names work too.
    resp = await client.post("/v1/channels/pillar%3Acontent/broadcast", data=body(), headers=auth())
    assert resp.status == 202


@pytest.mark.parametrize(
    ("method", "suffix"), [("POST", "broadcast"), ("POST", "messages"), ("GET", "events")]
)
async def test_unknown_channel_is_404(client: Client, method: str, suffix: str) -> None:
    resp = await client.request(
        method, f"/v1/channels/nowhere/{suffix}", data=body(), headers=auth()
    )
    assert "nowhere" in await error_of(resp, 404, "unknown_channel")


# -- get and close a connection -------------------------------------------------------------


async def test_get_connection(client: Client, redis: Redis) -> None:
    cid = await register(redis, channels=("guide", "pillar:insights"))
    resp = await client.get(f"/v1/connections/{cid}", headers=auth())
    assert resp.status == 200
    record = await resp.json()
    assert record["connection_id"] == cid
    assert record["user_id"] == "alice"
    assert record["gateway_instance"] == "gw-1"
    assert record["channels"] == ["guide", "pillar:insights"]
    assert isinstance(record["connected_at"], float)
    await error_of(await client.get(f"/v1/connections/{CID}", headers=auth()), 404, "not_found")


async def test_close_connection_sends_the_control_command(client: Client, redis: Redis) -> None:
    cid = await register(redis, gateway="gw-7")
    async with listening(redis, names.gateway_control("gw-7")) as gateway:
        resp = await client.delete(f"/v1/connections/{cid}", headers=auth())
        assert resp.status == 202
        assert (await resp.json())["gateway_instance"] == "gw-7"
        _, command = await gateway.next()
        assert orjson.loads(command) == {
            "op": "close",
            "connection_id": cid,
            "code": 1000,
            "reason": "closed by the Post Office API",
        }
        resp = await client.delete(f"/v1/connections/{cid}?code=4001&reason=bye", headers=auth())
        assert resp.status == 202
        _, command = await gateway.next()
        assert orjson.loads(command)["code"] == 4001
        assert orjson.loads(command)["reason"] == "bye"
    for bad in ("abc", "1001", "2999", "5000", "1.5", "+1000", "%201000", "1_000", "%EF%BC%91000"):
        resp = await client.delete(f"/v1/connections/{cid}?code={bad}", headers=auth())
        await error_of(resp, 400, "bad_request")
    resp = await client.delete(f"/v1/connections/{cid}?reason={'x' * 124}", headers=auth())
    await error_of(resp, 400, "bad_request")
    # Alive gateway that did not receive: 503, record kept.
    resp = await client.delete(f"/v1/connections/{cid}", headers=auth())
    await error_of(resp, 503, "unavailable")
    assert await redis.exists(names.connection(cid))
    # Dead gateway: 410 and the record is removed.
    await redis.delete(names.gateway_instance("gw-7"))
    resp = await client.delete(f"/v1/connections/{cid}", headers=auth())
    await error_of(resp, 410, "gone")
    assert not await redis.exists(names.connection(cid))
    await error_of(await client.delete(f"/v1/connections/{cid}", headers=auth()), 404)


# -- publishing to agent channels -----------------------------------------------------------


async def test_publish_to_channel(make_client: MakeClient, redis: Redis) -> None:
    client = await make_client(stream_max_pending=2)
    async with listening(redis, names.agent_channel("pillar:insights")) as agent:
        resp = await client.post(
            "/v1/channels/pillar:insights/messages", data=body(), headers=auth("experience")
        )
        assert resp.status == 202
        answer = await resp.json()
        assert answer["status"] == "published"
        _, data = await agent.next()
    published = orjson.loads(data)
    assert published["message_id"] == answer["message_id"]
    assert published["message"] == MESSAGE
    assert published["connection_id"] == "" and published["gateway_instance"]
    assert published["traceparent"].startswith("00-")
    # Nobody listens: queued up to the bound, then 503.
    for _ in range(2):
        resp = await client.post("/v1/channels/guide/messages", data=body(), headers=auth())
        assert (await resp.json())["status"] == "queued"
    resp = await client.post("/v1/channels/guide/messages", data=body(), headers=auth())
    await error_of(resp, 503, "unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert await redis.xlen(names.stream("guide")) == 2


# -- websocket endpoint ---------------------------------------------------------------------


async def test_websocket_endpoint(make_client: MakeClient) -> None:
    client = await make_client(gateway_urls=("http://10.0.0.1:8100", "http://10.0.0.2:8101/"))
    urls = set()
    for _ in range(2):
        resp = await client.get(
            "/v1/websocket-endpoint", params={"session_token": "tok/+="}, headers=auth()
        )
        assert resp.status == 200
        answer = await resp.json()
        urls.add(answer["websocket_url"])
    assert urls == {
        "ws://10.0.0.1:8100/ws?session_token=tok/%2B%3D",
        "ws://10.0.0.2:8101/ws?session_token=tok/%2B%3D",
    }
    assert "guide" in answer["channels"]
    assert answer["message_format"]["schema"]["properties"]["intent"]["enum"]
    await error_of(await client.get("/v1/websocket-endpoint", headers=auth()), 400)
    resp = await client.get(
        "/v1/websocket-endpoint", params={"session_token": "x" * 600}, headers=auth()
    )
    await error_of(resp, 400)

    public = await make_client(public_ws_url="wss://edge.example.com/ws")
    resp = await public.get(
        "/v1/websocket-endpoint", params={"session_token": "abc"}, headers=auth()
    )
    assert (await resp.json())["websocket_url"] == "wss://edge.example.com/ws?session_token=abc"


async def test_websocket_endpoint_503_without_gateways(make_client: MakeClient) -> None:
    client = await make_client(gateway_urls=())
    resp = await client.get("/v1/websocket-endpoint?session_token=a", headers=auth())
    await error_of(resp, 503, "unavailable")


# -- Server-Sent Events ---------------------------------------------------------------------


async def open_stream(client: Client, channel: str = "guide", realm: str = "smart_city") -> Any:
    resp = await client.get(f"/v1/channels/{channel}/events", headers=auth(realm))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    await read_until_subscribed(resp)
    return resp


async def redis_publish(url: str, channel: str, data: bytes) -> int:
    client = Redis.from_url(url)
    try:
        return int(await client.publish(channel, data))
    finally:
        await client.aclose()


def agent_message(n: int) -> bytes:
    return orjson.dumps(
        {"message_id": f"msg_{n:04d}", "connection_id": "", "user_id": "", "message": {"n": n}}
    )


async def pubsub_clients(redis: Redis) -> list[dict[str, Any]]:
    return [c for c in await redis.client_list() if c.get("name") == PUBSUB_CLIENT_NAME]


async def test_sse_receives_exactly_what_is_published_while_subscribed(
    client: Client, redis: Redis
) -> None:
    channel = names.agent_channel("guide")
    assert await redis.publish(channel, agent_message(0)) == 0  # before: nobody hears it
    resp = await open_stream(client)
    for n in range(1, 21):
        await redis.publish(channel, agent_message(n))
    events = [await read_event(resp) for _ in range(20)]
    assert [e["id"] for e in events] == [f"msg_{n:04d}" for n in range(1, 21)]  # type: ignore[index]
    assert [orjson.loads(e["data"])["message"]["n"] for e in events] == list(range(1, 21))  # type: ignore[index]
    # Messages published through the API arrive too, with their message id as the event id.
    post = await client.post("/v1/channels/guide/messages", data=body(), headers=auth())
    assert (await post.json())["status"] == "published"
    event = await read_event(resp)
    assert event is not None and event["id"] == (await post.json())["message_id"]
    # An event without a usable message id still gets an id; non-JSON is not forwarded.
    await redis.publish(channel, b"not json")
    await redis.publish(channel, orjson.dumps({"message": {"n": "x"}}))
    event = await read_event(resp)
    assert event is not None and event["id"].startswith("hub-")
    resp.close()


async def test_sse_subscribers_share_one_pubsub_connection(client: Client, redis: Redis) -> None:
    hub = client.app[HUB]
    await wait_for(lambda: pubsub_clients(redis), what="hub pub/sub connection")
    first = await open_stream(client)
    second = await open_stream(client)
    third = await open_stream(client, "pillar:content", realm="business_enablement")
    clients = await pubsub_clients(redis)
    assert len(clients) == 1
    assert clients[0]["sub"] == "2"  # guide and pillar:content, once each
    assert await numsub(redis, names.agent_channel("guide")) == 1
    stats = hub.stats()
    assert stats["subscribers"] == 3 and stats["pubsub_connections"] == 1
    assert stats["channels"] == {
        names.agent_channel("guide"): 2,
        names.agent_channel("pillar:content"): 1,
    }
    await redis.publish(names.agent_channel("guide"), agent_message(1))
    for resp in (first, second):
        event = await read_event(resp)
        assert event is not None and event["id"] == "msg_0001"
    for resp in (first, second, third):
        resp.close()


async def test_sse_disconnect_unsubscribes(client: Client, redis: Redis) -> None:
    hub = client.app[HUB]
    first = await open_stream(client)
    second = await open_stream(client)
    channel = names.agent_channel("guide")
    first.close()
    await wait_for(lambda: hub.subscriber_count == 1, what="first stream left")
    assert await numsub(redis, channel) == 1  # the other stream still needs it
    await redis.publish(channel, agent_message(1))
    event = await read_event(second)
    assert event is not None and event["id"] == "msg_0001"
    second.close()
    await wait_for(lambda: hub.subscriber_count == 0, what="second stream left")

    async def unsubscribed() -> bool:
        return await numsub(redis, channel) == 0

    await wait_for(unsubscribed, what="UNSUBSCRIBE after the last stream")
    assert len(await pubsub_clients(redis)) == 1  # the connection itself stays


async def test_slow_subscriber_is_dropped_with_an_error_event(
    make_client: MakeClient, redis: Redis
) -> None:
    client = await make_client(sse_queue_size=3)
    hub = client.app[HUB]
    channel = names.agent_channel("guide")
    # A hub subscriber that never reads: the fourth event overflows its buffer.
    slow = await hub.join(channel)
    healthy = await open_stream(client)
    for n in range(4):
        await redis.publish(channel, agent_message(n))
    await wait_for(lambda: slow.closed == "too_slow", what="slow subscriber dropped")
    assert await slow.get() is None
    assert hub.stats()["subscribers_dropped"] == 1
    for n in range(4):  # the healthy stream is unaffected
        event = await read_event(healthy)
        assert event is not None and event["id"] == f"msg_{n:04d}"
    healthy.close()


async def test_sse_stream_overflow_ends_with_error_event(
    make_client: MakeClient, redis: Redis
) -> None:
    client = await make_client(sse_queue_size=2)
    hub = client.app[HUB]
    resp = await open_stream(client)
    channel = names.agent_channel("guide")
    (sub,) = hub.subscribers(channel)
    # Pushed in one go, with no await in between: the stream cannot drain meanwhile, so the
    # third event overflows its buffer whatever the machine's speed.
    events = [(f"msg_{n:04d}", agent_message(n).decode()) for n in range(3)]
    assert [sub.push(e) for e in events] == [True, True, False]
    event = await read_event(resp)
    assert event is not None and event["event"] == "error"
    assert orjson.loads(event["data"])["code"] == "too_slow"
    assert await read_event(resp) is None
    # The tap is at most once: what it dropped is not written anywhere (published messages
    # are in the channel's stream since their publish; these three never went through Redis).
    await wait_for(lambda: hub.subscriber_count == 0, what="stream left")
    assert await stream_data(redis, "guide") == []


async def test_sse_client_that_leaves_unsubscribes_at_once_and_loses_nothing(
    make_client: MakeClient, redis: Redis
) -> None:
    """The only tap stream goes away: the API leaves the channel as soon as the connection
    closes (not at its next write), so publishing answers "queued" for the next agent. Both
    messages are in the channel's stream, in order, whatever the tap did with the first."""
    client = await make_client(sse_keepalive_seconds=60)  # no write would notice the close
    hub = client.app[HUB]
    channel = names.agent_channel("guide")
    resp = await open_stream(client)
    resp.close()
    post = await client.post("/v1/channels/guide/messages", data=body(), headers=auth())
    raced = await post.json()  # "published" only when it beat the close

    async def unsubscribed() -> bool:
        return await numsub(redis, channel) == 0

    await wait_for(unsubscribed, what="UNSUBSCRIBE after the client left")
    assert hub.subscriber_count == 0
    post = await client.post("/v1/channels/guide/messages", data=body(), headers=auth())
    after = await post.json()
    assert after["status"] == "queued"
    held = [orjson.loads(i)["message_id"] for i in await stream_data(redis, "guide")]
    assert held == [raced["message_id"], after["message_id"]]


async def test_sse_client_gone_before_the_headers_is_not_an_error(
    client: Client, redis: Redis
) -> None:
    hub = client.app[HUB]
    server = client.server.runner.server  # type: ignore[union-attr]
    assert server is not None
    # Hold the hub's command lock: the stream's SUBSCRIBE waits, so the client can leave
    # before the headers go out.
    async with hub.pubsub.lock:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            b"GET /v1/channels/guide/events HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer dev-smart_city\r\n\r\n"
        )
        await writer.drain()
        await wait_for(lambda: hub.subscriber_count == 1, what="stream waiting in join")
        writer.close()
        await writer.wait_closed()
        await wait_for(
            lambda: all(h.transport is None for h in server.connections),
            what="server saw the close",
        )
    await wait_for(lambda: hub.subscriber_count == 0, what="stream left the hub")
    text = await (await client.get("/metrics")).text()
    assert 'operation="subscribe_to_channel",status="499"' in text
    assert 'status="500"' not in text
    assert await reader.read() == b""  # no answer at all


async def test_sse_does_not_forward_oversized_or_invalid_messages(
    make_client: MakeClient, redis: Redis
) -> None:
    client = await make_client(max_body_bytes=1024, sse_max_event_bytes=8192)
    resp = await open_stream(client)
    channel = names.agent_channel("guide")
    big = orjson.dumps({"message_id": "msg_big", "message": {"x": "y" * 10000}})
    await redis.publish(channel, big)
    await redis.publish(channel, b"\xff\xfe garbage")
    await redis.publish(channel, agent_message(1))
    event = await read_event(resp)
    assert event is not None and event["id"] == "msg_0001"
    text = await (await client.get("/metrics")).text()
    assert 'postoffice_api_sse_invalid_messages_total{reason="too_large"}' in text
    resp.close()


async def test_sse_survives_a_dropped_pubsub_connection(client: Client, redis: Redis) -> None:
    hub = client.app[HUB]
    resp = await open_stream(client)
    channel = names.agent_channel("guide")
    await redis.client_kill_filter(_type="pubsub")

    async def resubscribed() -> bool:
        return hub.connected and await numsub(redis, channel) == 1

    await wait_for(resubscribed, what="hub resubscribed")
    assert await redis.publish(channel, agent_message(7)) == 1
    event = await read_event(resp)
    assert event is not None and event["id"] == "msg_0007"
    assert hub.stats()["connected"]
    resp.close()


async def test_sse_streams_end_on_shutdown(aiohttp_client: Any, redis_url: str) -> None:
    app = create_app(api_settings(redis_url))
    client: Client = await aiohttp_client(app)
    await wait_for(lambda: app[HUB].connected)
    resp = await open_stream(client)
    # Published before the shutdown and not read yet: it still reaches the stream.
    assert await redis_publish(redis_url, names.agent_channel("guide"), agent_message(1)) == 1
    await wait_for(lambda: app[HUB].stats()["events_dispatched"] == 1, what="event buffered")
    closing = asyncio.create_task(client.server.close())
    event = await asyncio.wait_for(read_event(resp), timeout(5))
    assert event is not None and event["id"] == "msg_0001"
    assert await asyncio.wait_for(read_event(resp), timeout(5)) is None  # clean end of stream
    await asyncio.wait_for(closing, timeout(5))
    resp.close()


async def test_sse_max_subscribers_then_503(make_client: MakeClient) -> None:
    client = await make_client(sse_max_subscribers=1)
    first = await open_stream(client)
    resp = await client.get("/v1/channels/guide/events", headers=auth())
    await error_of(resp, 503, "unavailable")
    assert resp.headers["Retry-After"]
    first.close()


async def test_health_ready_metrics(client: Client) -> None:
    assert (await client.get("/health")).status == 200
    ready = await client.get("/ready")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"redis": "ok", "pubsub": "ok"}
    await client.get(f"/v1/connections/{CID}", headers=auth())
    await client.get("/nowhere")
    text = await (await client.get("/metrics")).text()
    assert 'postoffice_api_requests_total{operation="get_connection",status="404"}' in text
    assert 'postoffice_api_requests_total{operation="/health",status="200"}' in text
    assert 'postoffice_api_requests_total{operation="/ready",status="200"}' in text
    assert 'postoffice_api_requests_total{operation="unmatched",status="404"}' in text
    assert "postoffice_api_sse_subscribers" in text


async def test_metrics_record_the_503_of_a_redis_outage(
    aiohttp_client: Any, redis_url: str
) -> None:
    """The metrics middleware records the status the client gets: 503, not 500."""
    from tests.helpers import free_port

    app = create_app(api_settings(f"redis://127.0.0.1:{free_port()}/0"))
    client: Client = await aiohttp_client(app)
    resp = await client.get("/v1/connections/ws_nobody_0badcafe", headers=auth())
    await error_of(resp, 503, "unavailable")
    text = await (await client.get("/metrics")).text()
    assert 'operation="get_connection",status="503"' in text
    assert 'operation="get_connection",status="500"' not in text


#: Representative requests of every operation, ok and refused: (method, path, body, realm).
REPRESENTATIVE: list[tuple[str, str, bytes | None, str | None]] = [
    ("GET", "/v1/openapi.json", None, None),
    ("GET", "/v1/websocket-endpoint?session_token=t", None, "smart_city"),
    ("GET", "/v1/websocket-endpoint", None, "smart_city"),
    ("GET", "/v1/websocket-endpoint?session_token=t", None, "business_enablement"),
    ("GET", "/v1/websocket-endpoint?session_token=t", None, None),
    ("POST", "/v1/channels/guide/messages", body(), "experience"),
    ("POST", "/v1/channels/guide/messages", b"{", "smart_city"),
    ("POST", "/v1/channels/nowhere/messages", body(), "smart_city"),
    (
        "POST",
        "/v1/channels/guide/messages",
        orjson.dumps({"message": {"x": "y" * 5000}}),
        "smart_city",
    ),
    ("GET", "/v1/channels/nowhere/events", None, "smart_city"),
    ("GET", "/v1/channels/guide/events", None, "experience"),
    ("POST", "/v1/channels/guide/broadcast", body(), "smart_city"),
    ("POST", "/v1/channels/guide/broadcast", b"[]", "smart_city"),
    ("POST", f"/v1/connections/{CID}/messages", body(), "smart_city"),
    ("POST", "/v1/connections/nope/messages", body(), "smart_city"),
    ("POST", f"/v1/connections/{CID}/messages", body(), "experience"),
    ("GET", f"/v1/connections/{CID}", None, "smart_city"),
    ("GET", "/v1/connections/nope", None, "smart_city"),
    ("GET", f"/v1/connections/{CID}", None, "wrong"),
    ("DELETE", f"/v1/connections/{CID}", None, "smart_city"),
    ("DELETE", f"/v1/connections/{CID}?code=99", None, "smart_city"),
    ("POST", "/v1/users/alice/messages", body(), "smart_city"),
    ("POST", "/v1/users/a%20b/messages", body(), "smart_city"),
    ("POST", "/v1/users/alice/messages", b"{}", "business_enablement"),
]


async def test_every_status_returned_is_documented(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=4096, rate_limit_per_second=1, rate_limit_burst=200)
    doc = await (await client.get("/v1/openapi.json")).json()
    seen: set[tuple[str, int]] = set()
    for method, path, data, realm in REPRESENTATIVE:
        headers = {}
        if realm == "wrong":
            headers = {"Authorization": "Bearer wrong"}
        elif realm is not None:
            headers = auth(realm)
        resp = await client.request(method, path, data=data, headers=headers)
        try:
            status = resp.status
            assert status != 500, (method, path, await resp.text())
            template = resp.request_info.url.path
            route = client.app.router.resources()
            operation = next(
                (
                    (canonical, method.lower())
                    for r in route
                    if (canonical := r.canonical) in doc["paths"]
                    and r.resolve is not None
                    and _matches(canonical, template)
                ),
                None,
            )
            assert operation is not None, path
            documented = doc["paths"][operation[0]][operation[1]]["responses"]
            assert str(status) in documented, (method, path, status, sorted(documented))
            seen.add((f"{method} {operation[0]}", status))
        finally:
            resp.close()
    # Every operation was exercised, with more than one outcome each.
    operations = {op for op, _ in seen}
    assert len(operations) == 9
    for op in operations:
        assert len({s for o, s in seen if o == op}) >= 2 or op.endswith("openapi.json"), op
    # 405 and 429 are documented where they can happen.
    resp = await client.put(f"/v1/connections/{CID}", headers=auth())
    assert resp.status == 405
    assert "405" in doc["paths"]["/v1/connections/{connection_id}"]["get"]["responses"]
    limited = await make_client(rate_limit_per_second=0.01, rate_limit_burst=1)
    await limited.get(f"/v1/connections/{CID}", headers=auth())
    resp = await limited.get(f"/v1/connections/{CID}", headers=auth())
    assert resp.status == 429 and "Retry-After" in resp.headers
    assert "429" in doc["paths"]["/v1/connections/{connection_id}"]["get"]["responses"]


def _matches(template: str, path: str) -> bool:
    parts, given = template.split("/"), path.split("/")
    return len(parts) == len(given) and all(
        p == g or (p.startswith("{") and p.endswith("}")) for p, g in zip(parts, given, strict=True)
    )


async def test_rate_limit_per_realm_is_429(make_client: MakeClient) -> None:
    client = await make_client(rate_limit_per_second=0.5, rate_limit_burst=3)
    for _ in range(3):
        resp = await client.get(f"/v1/connections/{CID}", headers=auth())
        assert resp.status == 404
    resp = await client.get(f"/v1/connections/{CID}", headers=auth())
    assert "smart_city" in await error_of(resp, 429, "rate_limited")
    # Rate 0.5/s: a token is 2 s away; the hint is that whole number, in the header and the text.
    assert resp.headers["Retry-After"] == "2"
    assert "retry in 2s" in (await resp.json())["error"]["message"]
    # Other realms have their own bucket; unauthenticated calls never spend tokens.
    other = await client.get(f"/v1/connections/{CID}", headers=auth("business_enablement"))
    assert other.status == 404


def test_rate_limiter_refills() -> None:
    from services.post_office_api.ratelimit import RealmRateLimiter

    now = [0.0]
    limiter = RealmRateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == 1  # 0.5 s short of a token: a whole second, never 0
    now[0] = 0.5
    assert limiter.take("a") == 0
    now[0] = 0.501  # 0.002 s short: still 1 (the old hint printed "retry in 0.00s")
    assert limiter.take("a") == 1
    slow = RealmRateLimiter(rate=0.25, burst=1, clock=lambda: now[0])
    assert slow.take("b") == 0 and slow.take("b") == 4
    assert RealmRateLimiter(rate=0, burst=1).take("a") == 0  # 0 disables


async def test_a_stale_connection_removed_by_the_api_is_unregistered_from_traffic_cop(
    make_client: MakeClient, redis: Redis, traffic_cop: ServiceProcess
) -> None:
    from shared.traffic_cop_client import TrafficCopClient
    from tests.helpers import TRAFFIC_COP_KEY, create_session

    client = await make_client(traffic_cop_url=traffic_cop.url)
    token = create_session(traffic_cop.url, "alice")
    cop = TrafficCopClient(traffic_cop.url, TRAFFIC_COP_KEY)
    try:
        session = await cop.validate(token)
        assert session is not None
        cid = await register(redis, gateway="gw-dead", alive=False)
        assert await cop.register_connection(cid, session.session_id, "alice", "gw-dead")
        assert await redis.exists(names.session_of_connection(cid))
        resp = await client.post(f"/v1/connections/{cid}/messages", data=body(), headers=auth())
        await error_of(resp, 410, "gone")

        async def forgotten() -> bool:
            return not await redis.exists(names.session_of_connection(cid))

        await wait_for(forgotten, what="traffic cop told about the stale connection")
    finally:
        await cop.aclose()
