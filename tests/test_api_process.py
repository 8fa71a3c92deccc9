"""The Post Office API as a real process: --help, Redis outage (503 JSON, /ready names it,
recovery), SIGTERM draining open SSE streams, production refusing development keys."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.service_names import GATEWAY_SERVICE
from tests.api_util import auth, read_until_subscribed
from tests.helpers import ROOT, RedisServer, ServiceProcess, timeout, wait_for

pytestmark = pytest.mark.filterwarnings("error")


def api_process(redis_url: str, **env: str) -> ServiceProcess:
    service = ServiceProcess(
        "services.post_office_api",
        {
            "REDIS_URL": redis_url,
            "POST_OFFICE_TRAFFIC_COP_URL": "",
            "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "0.2",
            "POST_OFFICE_PUBSUB_BACKOFF_CAP_SECONDS": "0.2",
            "POST_OFFICE_SHUTDOWN_TIMEOUT": str(timeout(3)),
            **env,
        },
    )
    service.env["POST_OFFICE_PORT"] = str(service.port)
    return service


def test_help_lists_the_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.post_office_api", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout(20),
        check=True,
    ).stdout
    for name in ("POST_OFFICE_PORT", "REALM_KEYS", "POST_OFFICE_MAX_BODY_BYTES", "PUBLIC_WS_URL"):
        assert name in out


def test_production_with_development_keys_refuses_to_start(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.post_office_api"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "ENVIRONMENT": "production"},
        capture_output=True,
        text=True,
        timeout=timeout(20),
    )
    assert result.returncode == 2
    assert "development keys" in result.stderr
    assert "dev-smart_city" not in result.stderr  # keys are secrets, never echoed


async def test_503_while_redis_is_down_then_recovery(private_redis: RedisServer) -> None:
    api = api_process(private_redis.url).start()
    try:
        async with aiohttp.ClientSession(headers=auth()) as http:
            cid = "ws_alice_0000abcd"
            url = f"{api.url}/v1/connections/{cid}/messages"
            payload = orjson.dumps({"message": {"x": 1}})
            async with http.post(url, data=payload) as resp:
                assert resp.status == 410
            private_redis.stop()
            for call in (
                http.post(url, data=payload),
                http.get(f"{api.url}/v1/connections/{cid}"),
                http.post(f"{api.url}/v1/users/alice/messages", data=payload),
                http.post(f"{api.url}/v1/channels/guide/messages", data=payload),
                http.get(f"{api.url}/v1/channels/guide/events"),
            ):
                async with call as resp:
                    assert resp.status == 503, await resp.text()
                    body = await resp.json()
                    assert body["error"]["code"] == "unavailable"
            async with http.get(f"{api.url}/ready") as resp:
                assert resp.status == 503
                failing = (await resp.json())["failing"]
                assert "redis" in failing
            private_redis.start()  # same port

            async def recovered() -> bool:
                async with http.post(url, data=payload) as resp:
                    return resp.status == 410

            await wait_for(recovered, 10, interval=0.1, what="API answers again")

            async def ready() -> bool:
                async with http.get(f"{api.url}/ready") as resp:
                    return resp.status == 200

            await wait_for(ready, 10, interval=0.1, what="/ready again (pub/sub reconnected)")
    finally:
        assert api.stop() == 0, api.log()[-3000:]


async def test_sigterm_ends_sse_streams_and_exits_0(redis_url: str) -> None:
    api = api_process(redis_url).start()
    try:
        async with (
            aiohttp.ClientSession(headers=auth()) as http,
            http.get(f"{api.url}/v1/channels/guide/events") as resp,
        ):
            assert resp.status == 200
            await read_until_subscribed(resp)
            # Published before SIGTERM and not read yet: it must still reach the stream.
            async with http.post(
                f"{api.url}/v1/channels/guide/messages", data=orjson.dumps({"message": {"n": 1}})
            ) as post:
                assert (await post.json())["status"] == "published"
                message_id = (await post.json())["message_id"]
            loop = asyncio.get_running_loop()
            stopping = loop.run_in_executor(None, api.stop)
            rest = await asyncio.wait_for(resp.content.read(), timeout(10))
            assert f"id: {message_id}".encode() in rest
            assert b"event: error" not in rest  # a clean end
            code = await stopping
        assert code == 0, api.log()[-3000:]
    finally:
        api.stop()


async def test_consul_registration_and_gateway_discovery(redis_url: str) -> None:
    from tests.consul_api import ConsulServer

    consul = ConsulServer(
        stagger=False, min_interval=0.05, reap_interval=0.1, plan_names=True
    ).start()

    # What a gateway's health check answers, on the plan's check path.
    async def healthy(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    health = web.Application()
    health.router.add_get(GATEWAY_SERVICE.check_path, healthy)
    health_server = TestServer(health, host="127.0.0.1")
    await health_server.start_server()
    api = api_process(redis_url, CONSUL_URL=consul.url, POST_OFFICE_INSTANCE_ID="api-1")
    api.env["POST_OFFICE_GATEWAY_URLS"] = "http://192.0.2.1:9"  # must not be used
    api.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def passing(service: str) -> list[object]:
                url = f"{consul.url}/v1/health/service/{service}?passing=true"
                async with http.get(url) as resp:
                    return list(await resp.json())

            await wait_for(lambda: passing("post-office-api"), 10, what="API registered")
            # A gateway instance as the plan registers one (the stand-in refuses other names,
            # tags or check paths), whose health check the small server above answers.
            gateway = {
                "ID": "gw-a",
                "Name": "websocket-gateway",
                "Tags": ["websocket", "real-time", "post-office"],
                "Address": "127.0.0.1",
                "Port": 18100,
                "Check": {
                    "HTTP": str(health_server.make_url(GATEWAY_SERVICE.check_path)),
                    "Interval": "100ms",
                },
            }
            async with http.put(f"{consul.url}/v1/agent/service/register", json=gateway) as r:
                assert r.status == 200
            await wait_for(lambda: passing("websocket-gateway"), 10, what="gateway passing")
            async with http.get(
                f"{api.url}/v1/websocket-endpoint?session_token=t", headers=auth()
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["websocket_url"] == (
                    "ws://127.0.0.1:18100/ws?session_token=t"
                )
        assert api.stop() == 0
        services = consul.call(lambda agent: _services(agent))
        assert "post-office-api-api-1" not in services  # deregistered on shutdown
    finally:
        api.stop()
        consul.stop()
        await health_server.close()


async def _services(agent: object) -> list[str]:
    return list(agent.services)  # type: ignore[attr-defined]
