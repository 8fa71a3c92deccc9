"""shared/service.py and shared/http.py: readiness, drain, metrics and JSON errors, using
Traffic Cop as the example service (it is built on the skeleton and nothing more)."""

from __future__ import annotations

import asyncio
from typing import Any

import prometheus_client
from aiohttp import web
from redis.asyncio import Redis

from services.traffic_cop_stub.app import create_app
from services.traffic_cop_stub.settings import TrafficCopSettings
from shared.service import SERVICE, ServiceState, background, base_app
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, wait_for


async def _ready(client: Any) -> tuple[int, dict[str, Any]]:
    async with client.get("/ready") as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_ready_names_redis_while_it_is_down_and_recovers(aiohttp_client, private_redis):
    settings = TrafficCopSettings(redis_url=private_redis.url, service_key=TRAFFIC_COP_KEY)
    client = await aiohttp_client(create_app(settings))
    assert (await _ready(client))[0] == 200

    private_redis.stop()
    status, body = await _ready(client)
    assert status == 503
    assert body["status"] == "unavailable"
    assert set(body["failing"]) == {"redis"}
    assert body["failing"]["redis"]  # says why
    assert body["checks"]["redis"] != "ok"
    # A request that needs Redis meanwhile is a 503 JSON error, not a crash.
    async with client.post(
        "/v1/sessions",
        json={"user_id": "a"},
        headers={"Authorization": f"Bearer {TRAFFIC_COP_KEY}"},
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "unavailable"
        assert resp.headers["Retry-After"] == "1"
    # /health is liveness: the process itself is fine.
    async with client.get("/health") as resp:
        assert resp.status == 200

    private_redis.start()  # same port

    async def ready_again() -> bool:
        return (await _ready(client))[0] == 200

    await wait_for(ready_again, seconds=10, interval=0.05, what="ready after redis restart")


async def test_failing_checks_are_concurrent_and_bounded():
    state = ServiceState(name="x", instance="x-1", check_timeout=0.05)

    async def ok() -> None:
        return None

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def raises() -> None:
        raise RuntimeError("disk on fire")

    state.add_check("ok", ok)
    state.add_check("hangs", hangs)
    state.add_check("raises", raises)
    failing = await state.failing()
    assert set(failing) == {"hangs", "raises"}
    assert failing["hangs"].startswith("TimeoutError")
    assert failing["raises"] == "RuntimeError: disk on fire"


async def test_skeleton_json_errors_and_metrics(aiohttp_client):
    app = base_app("demo", "demo-1", client_max_size=1024)

    async def boom(request: web.Request) -> web.Response:
        raise ValueError("secret detail")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app.router.add_get("/boom", boom)
    app.router.add_post("/echo", echo)
    client = await aiohttp_client(app)

    async def error(method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any], Any]:
        async with client.request(method, path, **kw) as resp:
            assert resp.content_type == "application/json"
            return resp.status, (await resp.json())["error"], resp.headers

    status, err, _ = await error("GET", "/nowhere")
    assert (status, err["code"]) == (404, "not_found")
    status, err, headers = await error("POST", "/health")
    assert (status, err["code"]) == (405, "method_not_allowed")
    assert "GET" in headers["Allow"]
    status, err, _ = await error("POST", "/echo", data=b"x" * 2048)
    assert (status, err["code"]) == (413, "too_large")
    assert "1024" in err["message"]
    status, err, _ = await error("GET", "/boom")
    assert (status, err) == (500, {"code": "internal_error", "message": "internal error"})

    async with client.get("/metrics") as resp:
        assert resp.status == 200
        # prometheus_client's own aiohttp handler negotiates: a plain client gets the text
        # format its body really is (0.0.4), Prometheus' scrape Accept gets OpenMetrics.
        assert resp.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_PLAIN_0_0_4
        text = await resp.text()
    async with client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).endswith("# EOF\n")
    assert "# HELP" in text and "# TYPE" in text
    assert "python_info" in text or "process_" in text or "postoffice_" in text
    async with client.get("/health") as resp:
        body = await resp.json()
    assert body["service"] == "demo" and body["instance"] == "demo-1"
    assert body["uptime_seconds"] >= 0


async def test_background_task_is_owned_and_cancelled(aiohttp_client):
    app = base_app("demo", "demo-1")
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def worker(app: web.Application) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def dies(app: web.Application) -> None:
        raise RuntimeError("died")

    app.cleanup_ctx.append(background("worker", worker))
    app.cleanup_ctx.append(background("dies", dies))
    client = await aiohttp_client(app)
    await wait_for(started.is_set, seconds=2, what="background task started")
    assert app[SERVICE].draining is False
    await client.close()
    assert cancelled.is_set()
    assert app[SERVICE].draining is True


async def test_real_process_operational_routes_and_sigterm(traffic_cop: ServiceProcess):
    import aiohttp

    async with aiohttp.ClientSession(traffic_cop.url) as http:
        async with http.get("/health") as resp:
            assert resp.status == 200
        async with http.get("/ready") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"
        async with http.get("/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
            assert "postoffice_traffic_cop_sessions_created_total" in text
        async with http.get("/no/such/route") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
        async with http.put("/ready") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
        async with http.get(
            "/v1/sessions", headers={"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}
        ) as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert traffic_cop.stop() == 0
    assert "Traceback" not in traffic_cop.log()


async def test_redis_that_refuses_writes_is_503_not_500(aiohttp_client, private_redis):
    # Redis answers but refuses (out of memory): a dependency failure, so 503 with Retry-After.
    settings = TrafficCopSettings(redis_url=private_redis.url, service_key=TRAFFIC_COP_KEY)
    client = await aiohttp_client(create_app(settings))
    admin = Redis.from_url(private_redis.url)
    try:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)
        async with client.post(
            "/v1/sessions",
            json={"user_id": "a"},
            headers={"Authorization": f"Bearer {TRAFFIC_COP_KEY}"},
        ) as resp:
            assert resp.status == 503
            body = await resp.json()
            assert body["error"]["code"] == "unavailable"
            assert resp.headers["Retry-After"] == "1"
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
