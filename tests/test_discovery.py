"""shared/discovery.py against tests/consul_api.py (Consul's documented agent HTTP API, with
checks that really run) and a real Traffic Cop process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.discovery import Discovery, DiscoveryError, registration_context
from shared.service import base_app
from shared.service_names import GATEWAY_SERVICE, TRAFFIC_COP_SERVICE
from tests.consul_api import ConsulServer
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, free_port, timeout, wait_for


@pytest.fixture
def consul() -> Iterator[ConsulServer]:
    server = ConsulServer(stagger=False, min_interval=0.05, reap_interval=0.1).start()
    yield server
    server.stop()


async def _agent_services(consul: ConsulServer) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(consul.url + "/v1/agent/services") as resp,
    ):
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


def _demo_app(consul_url: str | None, port: int, instance: str, **kw: Any) -> web.Application:
    app = base_app("demo", instance)
    app.cleanup_ctx.append(
        registration_context(
            "demo-service", instance, "127.0.0.1", port, consul_url, check_interval="100ms", **kw
        )
    )
    return app


async def test_register_lookup_passing_and_deregister(consul):
    port = free_port()
    server = TestServer(_demo_app(consul.url, port, "d1", tags=("v1",)), port=port)
    await server.start_server()
    discovery = Discovery(consul.url, cache_seconds=0)
    try:
        services = await wait_for(lambda: _agent_services(consul), what="registration")
        entry = services["demo-service-d1"]
        assert (entry["Service"], entry["Address"], entry["Port"]) == (
            "demo-service",
            "127.0.0.1",
            port,
        )
        assert entry["Tags"] == ["v1"]
        [check] = [c for c in consul.agent.checks.values() if c.service_id == "demo-service-d1"]
        assert (check.kind, check.target) == ("http", f"http://127.0.0.1:{port}/health")
        assert check.interval == 0.1

        async def passing() -> list[str]:
            return await _resolved(discovery, "demo-service")

        urls = await wait_for(passing, seconds=5, what="instance passing its check")
        assert urls == [f"http://127.0.0.1:{port}"]
        assert await discovery.resolve("demo-service") == f"http://127.0.0.1:{port}"
    finally:
        await server.close()
    # Shutdown ran the cleanup context: deregistered, at once (no waiting for the reaper).
    assert "demo-service-d1" not in await _agent_services(consul)
    with pytest.raises(DiscoveryError, match="no healthy instance"):
        await discovery.resolve_all("demo-service")
    assert await discovery.resolve_all("demo-service", ["http://fallback:1/"]) == [
        "http://fallback:1"
    ]
    await discovery.aclose()


async def _resolved(discovery: Discovery, service: str) -> list[str]:
    """The passing instances, or [] while there are none yet (for polling)."""
    try:
        return await discovery.resolve_all(service)
    except DiscoveryError:
        return []


async def test_only_passing_instances_are_returned_round_robin(consul):
    port_up, port_down = free_port(), free_port()
    up = TestServer(_demo_app(consul.url, port_up, "up"), port=port_up)
    await up.start_server()
    # An instance that registers and then dies without deregistering (a crash).
    down = TestServer(_demo_app(consul.url, port_down, "down"), port=port_down)
    await down.start_server()
    discovery = Discovery(consul.url, cache_seconds=0)
    try:
        both = sorted([f"http://127.0.0.1:{port_up}", f"http://127.0.0.1:{port_down}"])

        async def both_passing() -> bool:
            return await _resolved(discovery, "demo-service") == both

        await wait_for(both_passing, seconds=5, what="both instances passing")
        picks = {await discovery.resolve("demo-service") for _ in range(4)}
        assert picks == set(both)

        # Kill the listener but keep the registration: its check goes critical.
        assert down.runner is not None
        for site in list(down.runner.sites):
            await site.stop()

        async def only_up() -> bool:
            return await discovery.resolve_all("demo-service") == [f"http://127.0.0.1:{port_up}"]

        await wait_for(only_up, seconds=5, what="dead instance dropped from lookups")
    finally:
        await down.close()
        await up.close()
        await discovery.aclose()


async def test_fallback_to_environment_when_consul_is_unreachable():
    dead = f"http://127.0.0.1:{free_port()}"
    discovery = Discovery(dead, cache_seconds=60, timeout=timeout(2))
    try:
        assert await discovery.resolve_all("traffic-cop", ["http://127.0.0.1:8300/"]) == [
            "http://127.0.0.1:8300"
        ]
        # The failure is remembered: the next lookup does not pay a connection attempt again.
        assert await discovery.resolve("traffic-cop", "http://tc:1") == "http://tc:1"
        with pytest.raises(DiscoveryError, match="no healthy instance"):
            await discovery.resolve_all("traffic-cop")
    finally:
        await discovery.aclose()


async def test_no_consul_uses_the_fallback_or_says_what_is_missing():
    discovery = Discovery(None)
    assert await discovery.resolve_all("x", ["http://a:1/", "", "http://b:2"]) == [
        "http://a:1",
        "http://b:2",
    ]
    assert await discovery.resolve("x", "http://a:1") == "http://a:1"
    with pytest.raises(DiscoveryError, match="no CONSUL_URL"):
        await discovery.resolve("x")
    await discovery.aclose()


async def test_last_answer_is_used_while_consul_is_down(consul):
    port = free_port()
    server = TestServer(_demo_app(consul.url, port, "s1"), port=port)
    await server.start_server()
    discovery = Discovery(consul.url, cache_seconds=0, stale_seconds=60)
    try:
        url = f"http://127.0.0.1:{port}"

        async def found() -> bool:
            return await _resolved(discovery, "demo-service") == [url]

        await wait_for(found, seconds=5, what="instance passing")
        consul.stop()
        assert await discovery.resolve_all("demo-service") == [url]
    finally:
        await server.close()  # deregistration fails (Consul is down): logged, not raised
        await discovery.aclose()


async def test_no_consul_url_means_no_registration(aiohttp_client):
    client = await aiohttp_client(_demo_app(None, free_port(), "n1"))
    async with client.get("/health") as resp:
        assert resp.status == 200


async def test_registration_retries_until_consul_answers():
    port, consul_port = free_port(), free_port()
    server = TestServer(
        _demo_app(f"http://127.0.0.1:{consul_port}", port, "late", retry_base=0.02, retry_cap=0.1),
        port=port,
    )
    await server.start_server()  # Consul is not there yet: the service starts anyway
    consul = ConsulServer(port=consul_port, stagger=False, min_interval=0.05).start()
    try:

        async def registered() -> bool:
            return "demo-service-late" in await _agent_services(consul)

        await wait_for(registered, seconds=5, what="registration after Consul came up")
    finally:
        await server.close()
        assert "demo-service-late" not in await _agent_services(consul)
        consul.stop()


@pytest.fixture
def plan_consul() -> Iterator[ConsulServer]:
    """A stand-in that refuses names, tags and check paths outside shared/service_names.py."""
    server = ConsulServer(
        stagger=False, min_interval=0.05, reap_interval=0.1, plan_names=True
    ).start()
    yield server
    server.stop()


async def test_the_stand_in_holds_registrations_and_lookups_to_the_plan(plan_consul):
    gateway = GATEWAY_SERVICE

    def registration(**changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ID": "gw-plan",
            "Name": gateway.name,
            "Tags": list(gateway.tags),
            "Address": "127.0.0.1",
            "Port": 18100,
            "Check": {"HTTP": f"http://127.0.0.1:9{gateway.check_path}", "Interval": "1s"},
        }
        return {**body, **changes}

    async with aiohttp.ClientSession() as http:

        async def put(body: dict[str, Any]) -> tuple[int, str]:
            url = f"{plan_consul.url}/v1/agent/service/register"
            async with http.put(url, json=body) as resp:
                return resp.status, await resp.text()

        async def lookup(name: str) -> int:
            async with http.get(f"{plan_consul.url}/v1/health/service/{name}") as resp:
                return resp.status

        assert await put(registration(Name="post-office-gateway")) == (
            400,
            "not a Post Office service name: 'post-office-gateway' (expected one of "
            "eviction-worker, post-office-api, traffic-cop, websocket-gateway)",
        )
        status, text = await put(registration(Tags=["post-office"]))
        assert status == 400 and "the plan's are ['websocket', 'real-time', 'post-office']" in text
        wrong_check = {"HTTP": "http://127.0.0.1:9/health", "Interval": "1s"}
        status, text = await put(registration(Check=wrong_check))
        assert status == 400 and "expected ['/health/websocket-gateway']" in text
        assert await lookup("post-office-gateway") == 400
        assert await put(registration()) == (200, "")
        assert await lookup(gateway.name) == 200
    assert list(await _agent_services(plan_consul)) == ["gw-plan"]


def test_traffic_cop_process_registers_and_deregisters(plan_consul, redis_url):
    consul = plan_consul
    service = ServiceProcess(
        "services.traffic_cop_stub",
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            "CONSUL_URL": consul.url,
            "TRAFFIC_COP_INSTANCE_ID": "tc-disc",
        },
    )
    service.env["TRAFFIC_COP_PORT"] = str(service.port)
    service.start()
    service_id = f"{TRAFFIC_COP_SERVICE.name}-tc-disc"
    try:

        def registered() -> Any:
            return asyncio.run(_agent_services(consul)).get(service_id)

        from tests.helpers import wait_for_sync

        entry = wait_for_sync(registered, seconds=10, what="traffic cop registered")
        assert entry["Service"] == TRAFFIC_COP_SERVICE.name and entry["Port"] == service.port
    finally:
        code = service.stop()
    assert code == 0, service.log()[-2000:]
    assert service_id not in asyncio.run(_agent_services(consul))
    assert "deregistered" in service.log()


async def test_traffic_cop_is_pinned_to_its_configured_url_unless_consul_is_trusted() -> None:
    from shared.discovery import traffic_cop_resolver

    # A Consul that would hand out a hijacker's address (nothing listens on port 1: asking it
    # fails, which shows whether it was asked).
    discovery = Discovery("http://127.0.0.1:1")
    try:
        pinned = traffic_cop_resolver(discovery, "http://traffic-cop:8300", trust_consul=False)
        assert await pinned() == "http://traffic-cop:8300"
        assert discovery._cache == {} and discovery._failed == {}  # Consul never asked
        trusting = traffic_cop_resolver(discovery, "http://traffic-cop:8300", trust_consul=True)
        assert await trusting() == "http://traffic-cop:8300"  # asked, failed, fell back
        assert TRAFFIC_COP_SERVICE.name in discovery._failed
    finally:
        await discovery.aclose()


async def test_registration_outlives_more_failed_attempts_than_the_exponent_can_hold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Consul refused 1,100 attempts in a row (past attempt 1023, where ``2.0**attempt``
    overflows a float): the registration loop still retries and registers once it answers."""
    port, consul_port = free_port(), free_port()
    server = TestServer(
        _demo_app(f"http://127.0.0.1:{consul_port}", port, "long", retry_base=1e-5, retry_cap=1e-4),
        port=port,
    )

    def attempts() -> int:
        return sum("consul registration of" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.DEBUG, logger="shared.discovery"):
        await server.start_server()
        consul: ConsulServer | None = None
        try:
            await wait_for(lambda: attempts() >= 1100, seconds=60, what="1,100 failed attempts")
            consul = ConsulServer(port=consul_port, stagger=False, min_interval=0.05).start()

            async def registered() -> bool:
                assert consul is not None
                return "demo-service-long" in await _agent_services(consul)

            await wait_for(registered, seconds=5, what="registration after 1,100 failures")
            assert not any(r.exc_info for r in caplog.records)  # nothing died meanwhile
        finally:
            await server.close()
            if consul is not None:
                consul.stop()


async def test_re_registration_logs_at_debug_only(consul, caplog):
    """The first registration is news (INFO); registering again after Consul forgot the
    service, which its refresh does every ``refresh_seconds``, is not (DEBUG)."""
    caplog.set_level(logging.DEBUG, logger="shared.discovery")
    port = free_port()
    app = _demo_app(consul.url, port, "d3", refresh_seconds=0.05)
    server = TestServer(app, port=port)
    await server.start_server()
    try:
        await wait_for(lambda: _agent_services(consul), what="registration")
        for _ in range(2):  # Consul forgets it twice; the refresh registers it again each time
            async with (
                aiohttp.ClientSession() as http,
                http.put(consul.url + "/v1/agent/service/deregister/demo-service-d3") as resp,
            ):
                assert resp.status == 200
            await wait_for(lambda: _has(consul, "demo-service-d3"), what="registered again")
    finally:
        await server.close()
    lines = [r for r in caplog.records if r.getMessage().startswith("registered demo-service-d3")]
    assert [r.levelno for r in lines][:3] == [logging.INFO, logging.DEBUG, logging.DEBUG]


async def _has(consul: ConsulServer, service_id: str) -> bool:
    return service_id in await _agent_services(consul)
