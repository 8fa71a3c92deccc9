"""Traffic Cop over real HTTP against a real Redis.

Most tests serve ``create_app(settings)`` through ``aiohttp_client`` (a real socket, and the
cleanup contexts really run); the log test runs the real process and reads its log file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from services.traffic_cop_stub.app import create_app
from services.traffic_cop_stub.settings import TrafficCopSettings
from shared import redis_names as names
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, create_session, timeout, wait_for

AUTH = {"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}


@pytest.fixture
def settings(redis_url: str) -> TrafficCopSettings:
    return TrafficCopSettings(
        redis_url=redis_url,
        instance_id="traffic-cop-test",
        service_key=TRAFFIC_COP_KEY,
        max_ttl_seconds=600,
        default_ttl_seconds=300,
    )


@pytest.fixture
async def client(aiohttp_client: Any, settings: TrafficCopSettings) -> Any:
    return await aiohttp_client(create_app(settings))


async def call(
    client: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request; asserts the answer is never a 500 and every error is the JSON shape."""
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    hdrs = AUTH if headers is None else headers
    async with client.request(method, path, data=data, headers=hdrs) as resp:
        text = await resp.read()
        assert resp.status != 500, text
        if resp.status == 204:
            assert text == b""
            return resp.status, None
        assert resp.content_type == "application/json", (resp.status, text)
        payload = orjson.loads(text)
        if resp.status >= 400:
            assert set(payload) == {"error"}, payload
            assert set(payload["error"]) == {"code", "message"}, payload
            assert payload["error"]["message"]
        return resp.status, payload


async def new_session(client: Any, user_id: str = "alice", **extra: Any) -> dict[str, Any]:
    status, body = await call(client, "POST", "/v1/sessions", {"user_id": user_id, **extra})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_create_session_shape(client, redis: Redis):
    body = await new_session(client, "alice", metadata={"plan": "pro"})
    assert set(body) == {"session_token", "session_id", "user_id", "expires_at"}
    assert len(body["session_token"]) >= 40
    assert body["session_id"].startswith("sess_") and body["user_id"] == "alice"
    assert body["expires_at"].endswith("Z")
    # Only the hash of the token reaches Redis, with the session's TTL.
    digest = hashlib.sha256(body["session_token"].encode()).hexdigest()
    key = names.session(digest)
    assert 290 <= await redis.ttl(key) <= 300
    stored = await redis.hgetall(key)
    assert stored[b"session_id"].decode() == body["session_id"]
    for k in await redis.keys("*"):
        assert body["session_token"].encode() not in k
        if await redis.type(k) == b"hash":
            assert body["session_token"].encode() not in b"".join((await redis.hgetall(k)).values())
    assert await redis.get(names.session_by_id(body["session_id"])) == digest.encode()


async def test_validate(client):
    body = await new_session(client, "bob", ttl_seconds=120, metadata={"a": 1})
    status, view = await call(
        client, "POST", "/v1/sessions/validate", {"session_token": body["session_token"]}
    )
    assert status == 200
    assert view == {
        "session_id": body["session_id"],
        "user_id": "bob",
        "expires_at": body["expires_at"],
        "metadata": {"a": 1},
    }
    for token in ("nope", "", "x" * 100_00):
        status, err = await call(client, "POST", "/v1/sessions/validate", {"session_token": token})
        assert (status, err["error"]["code"]) == (401, "session_invalid"), token


async def test_revoke_then_validate_401_and_announced(client, redis: Redis):
    body = await new_session(client, "carol")
    token = body["session_token"]
    pubsub = redis.pubsub()
    await pubsub.subscribe(names.SESSION_REVOCATIONS)
    try:
        status, _ = await call(client, "DELETE", f"/v1/sessions/{token}")
        assert status == 204
        deadline = asyncio.get_running_loop().time() + timeout(3)
        msg = None
        while msg is None:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, "no revocation announced"
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        assert orjson.loads(msg["data"]) == {"session_id": body["session_id"]}
    finally:
        await pubsub.aclose()
    status, err = await call(client, "POST", "/v1/sessions/validate", {"session_token": token})
    assert (status, err["error"]["code"]) == (401, "session_invalid")
    assert await redis.keys("session:*") == []
    # Revoking again, or an unknown token, is 404.
    status, err = await call(client, "DELETE", f"/v1/sessions/{token}")
    assert (status, err["error"]["code"]) == (404, "not_found")
    status, err = await call(client, "DELETE", "/v1/sessions/" + "z" * 600)
    assert (status, err["error"]["code"]) == (404, "not_found")


async def test_ttl_expiry(client):
    body = await new_session(client, "dave", ttl_seconds=1)
    token = body["session_token"]
    status, _ = await call(client, "POST", "/v1/sessions/validate", {"session_token": token})
    assert status == 200

    async def expired() -> bool:
        status, _ = await call(client, "POST", "/v1/sessions/validate", {"session_token": token})
        return status == 401

    await wait_for(expired, seconds=5, interval=0.05, what="session expiry")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"user_id": "a", "ttl_seconds": 601}, "between 1 and 600"),
        ({"user_id": "a", "ttl_seconds": 0}, "between 1 and 600"),
        ({"user_id": "a", "ttl_seconds": -5}, "between 1 and 600"),
        ({"user_id": "a", "ttl_seconds": 1.5}, "ttl_seconds must be an integer"),
        ({"user_id": "a", "ttl_seconds": "60"}, "ttl_seconds must be an integer"),
        ({"user_id": "a", "ttl_seconds": True}, "ttl_seconds must be an integer"),
        ({}, "missing field(s): user_id"),
        ({"user_id": ""}, "user_id must be"),
        ({"user_id": 5}, "user_id must be"),
        ({"user_id": None}, "user_id must be"),
        ({"user_id": ["a"]}, "user_id must be"),
        ({"user_id": "has space"}, "user_id must be"),
        ({"user_id": "alice\n"}, "user_id must be"),
        ({"user_id": "x" * 129}, "user_id must be"),
        ({"user_id": "a", "metadata": []}, "metadata must be a JSON object"),
        ({"user_id": "a", "metadata": {"d": _nested(40)}}, "nests deeper"),
        ({"user_id": "a", "admin": True}, "unknown field(s): admin"),
    ],
)
async def test_create_bad_input(client, body, fragment):
    status, err = await call(client, "POST", "/v1/sessions", body)
    assert status == 400, err
    assert err["error"]["code"] == "bad_request"
    assert fragment in err["error"]["message"]


@pytest.mark.parametrize(
    ("path", "raw", "code"),
    [
        ("/v1/sessions", b"not json", "invalid_json"),
        ("/v1/sessions", b"", "invalid_json"),
        ("/v1/sessions", b"\xff\xfe", "invalid_json"),
        ("/v1/sessions", b"[" * 5000, "invalid_json"),
        ("/v1/sessions", b"[]", "bad_request"),
        ("/v1/sessions", b'"alice"', "bad_request"),
        ("/v1/sessions", b"null", "bad_request"),
        ("/v1/sessions/validate", b"{}", "bad_request"),
        ("/v1/sessions/validate", b'{"session_token": 5}', "bad_request"),
        ("/v1/sessions/validate", b"nope", "invalid_json"),
        ("/v1/connections", b"[1]", "bad_request"),
        ("/v1/sessions", b'{"user_id": "a", "ttl_seconds": 18446744073709551615}', "bad_request"),
        ("/v1/sessions", b'{"user_id": "a", "ttl_seconds": 99999999999999999999}', "bad_request"),
        ("/v1/sessions", b'{"user_id": "a", "ttl_seconds": 1e400}', "invalid_json"),
    ],
)
async def test_malformed_bodies_are_json_400(client, path, raw, code):
    status, err = await call(client, "POST", path, raw=raw)
    assert (status, err["error"]["code"]) == (400, code)


async def test_huge_body_is_413(client, settings):
    raw = orjson.dumps({"user_id": "a", "metadata": {"pad": "x" * settings.max_body_bytes}})
    status, err = await call(client, "POST", "/v1/sessions", raw=raw)
    assert (status, err["error"]["code"]) == (413, "too_large")
    assert str(settings.max_body_bytes) in err["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {TRAFFIC_COP_KEY}"},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Bearer {TRAFFIC_COP_KEY}x"},
        {"Authorization": "Bearer \u00e9t\u00e9"},
    ],
)
async def test_missing_or_wrong_service_key_is_401(client, headers):
    for method, path in [
        ("POST", "/v1/sessions"),
        ("POST", "/v1/sessions/validate"),
        ("DELETE", "/v1/sessions/abc"),
        ("POST", "/v1/connections"),
        ("DELETE", "/v1/connections/ws_a_00000000"),
        ("GET", "/v1/nothing"),
    ]:
        status, err = await call(client, method, path, {"user_id": "a"}, headers=headers)
        assert (status, err["error"]["code"]) == (401, "unauthorized"), (method, path)


def _conn(session: dict[str, Any], cid: str = "ws_alice_0123abcd", **over: Any) -> dict[str, Any]:
    return {
        "connection_id": cid,
        "session_id": session["session_id"],
        "user_id": session["user_id"],
        "gateway_instance": "gw-1",
        **over,
    }


async def test_connection_register_and_unregister(client, redis: Redis):
    session = await new_session(client, "alice")
    status, body = await call(client, "POST", "/v1/connections", _conn(session))
    assert status == 201
    assert body == {
        "connection_id": "ws_alice_0123abcd",
        "session_id": session["session_id"],
        "user_id": "alice",
    }
    members = await redis.smembers(names.session_connections(session["session_id"]))
    assert members == {b"ws_alice_0123abcd"}
    assert 0 < await redis.ttl(names.session_connections(session["session_id"])) <= 300
    # The bookkeeping carries the session's TTL: a connection nobody unregisters (a gateway
    # that could not reach Traffic Cop) is forgotten with its session, not kept forever.
    index = names.session_of_connection("ws_alice_0123abcd")
    assert await redis.get(index) == session["session_id"].encode()
    assert 0 < await redis.ttl(index) <= 300
    status, _ = await call(client, "DELETE", "/v1/connections/ws_alice_0123abcd")
    assert status == 204
    assert not await redis.exists(index)
    assert await redis.smembers(names.session_connections(session["session_id"])) == set()
    status, err = await call(client, "DELETE", "/v1/connections/ws_alice_0123abcd")
    assert (status, err["error"]["code"]) == (404, "not_found")
    status, err = await call(client, "DELETE", "/v1/connections/not-an-id")
    assert (status, err["error"]["code"]) == (400, "bad_request")


async def test_connection_refused_for_revoked_unknown_or_foreign_session(client, redis: Redis):
    session = await new_session(client, "alice")
    status, err = await call(
        client,
        "POST",
        "/v1/connections",
        _conn(session, user_id="mallory", cid="ws_mallory_0123abcd"),
    )
    assert (status, err["error"]["code"]) == (401, "session_invalid")
    unknown = {**session, "session_id": "sess_0000000000000000"}
    status, err = await call(client, "POST", "/v1/connections", _conn(unknown))
    assert (status, err["error"]["code"]) == (401, "session_invalid")
    # Registered, then the session is revoked: its bookkeeping goes with it.
    assert (await call(client, "POST", "/v1/connections", _conn(session)))[0] == 201
    assert (await call(client, "DELETE", f"/v1/sessions/{session['session_token']}"))[0] == 204
    assert not await redis.exists(names.session_of_connection("ws_alice_0123abcd"))
    status, err = await call(
        client, "POST", "/v1/connections", _conn(session, cid="ws_alice_0123abce")
    )
    assert (status, err["error"]["code"]) == (401, "session_invalid")
    status, err = await call(client, "DELETE", "/v1/connections/ws_alice_0123abcd")
    assert status == 404


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"connection_id": "alice"}, "connection_id must look like"),
        ({"connection_id": "ws_alice_0123abcd\n"}, "connection_id must look like"),
        ({"session_id": "sess_xyz"}, "session_id must look like"),
        ({"session_id": "sess_0123456789abcdef\n"}, "session_id must look like"),
        ({"user_id": "bad user"}, "user_id must be"),
        ({"gateway_instance": ""}, "gateway_instance must be"),
        ({"gateway_instance": "g" * 129}, "gateway_instance must be"),
        ({"gateway_instance": 7}, "gateway_instance must be a string"),
        ({"connection_id": None}, "connection_id must be a string"),
        ({"extra": 1}, "unknown field(s): extra"),
    ],
)
async def test_connection_bad_input(client, over, fragment):
    session = {"session_id": "sess_0123456789abcdef", "user_id": "alice"}
    status, err = await call(client, "POST", "/v1/connections", _conn(session, **over))
    assert status == 400, err
    assert fragment in err["error"]["message"]
    status, err = await call(client, "POST", "/v1/connections", {"connection_id": "ws_a_00000000"})
    assert status == 400 and "missing field(s)" in err["error"]["message"]


async def test_operational_routes(client):
    async with client.get("/health") as resp:
        assert resp.status == 200
        body = await resp.json()
        assert body["status"] == "ok" and body["service"] == "traffic-cop"
        assert body["instance"] == "traffic-cop-test"
    async with client.get("/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"] == {"redis": "ok"}
    await new_session(client, "erin")
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
        assert "postoffice_traffic_cop_sessions_created_total" in text


async def test_real_process_never_logs_tokens(traffic_cop: ServiceProcess):
    token = await asyncio.to_thread(create_session, traffic_cop.url, "frank")
    digest = hashlib.sha256(token.encode()).hexdigest()
    async with aiohttp.ClientSession(traffic_cop.url, headers=AUTH) as http:

        async def post(path: str, body: Any) -> int:
            async with http.post(path, json=body) as resp:
                assert resp.status != 500
                return resp.status

        assert await post("/v1/sessions/validate", {"session_token": token}) == 200
        async with http.post("/v1/sessions/validate", json={"session_token": token}) as resp:
            sid = (await resp.json())["session_id"]
        conn = {
            "connection_id": "ws_frank_0123abcd",
            "session_id": sid,
            "user_id": "frank",
            "gateway_instance": "gw-1",
        }
        assert await post("/v1/connections", conn) == 201
        assert await post("/v1/sessions/validate", {"session_token": token + "x"}) == 401
        async with http.delete(f"/v1/sessions/{token}") as resp:
            assert resp.status == 204
        async with http.delete(f"/v1/sessions/{token}") as resp:
            assert resp.status == 404
        async with http.post("/v1/sessions", data=b"{broken") as resp:
            assert resp.status == 400
    assert traffic_cop.stop() == 0
    log = traffic_cop.log()
    assert token not in log and digest not in log
    assert token[:16] not in log
    assert TRAFFIC_COP_KEY not in log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert any("revoked" in line["msg"] for line in lines)
    for line in lines:
        assert line["service"] == "traffic-cop"
        assert line["level"] != "error", line


def test_smoke_real_process_issues_a_session(traffic_cop: ServiceProcess):
    token = create_session(traffic_cop.url, "alice")
    assert len(token) >= 40
