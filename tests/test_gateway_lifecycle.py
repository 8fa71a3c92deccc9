"""A gateway's life from start to SIGTERM, with real processes: 503 while it waits for its
dependencies, the drain that publishes what was accepted (the breaker's buffer included) before
closing the sockets, Consul left before anything closes, a full channel that does not hold up
the others once Redis is back, and a process that fails when a task it cannot live without dies.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from shared import redis_names as names
from shared.service import SERVICE, background, base_app
from shared.service_names import GATEWAY_SERVICE
from tests.consul_api import ConsulServer
from tests.gateway_util import (
    AgentListener,
    RedisServer,
    chat,
    close_of,
    gateway_process,
    instance_of,
    recv,
    redis_client,
    start_gateway,
    start_traffic_cop,
    ws_url,
)
from tests.helpers import (
    ROOT,
    TRAFFIC_COP_KEY,
    ServiceProcess,
    create_session,
    free_port,
    stream_data,
    timeout,
    wait_for,
)


@pytest.fixture
def server(persistent_redis: RedisServer) -> RedisServer:
    return persistent_redis


@pytest.fixture
def private_traffic_cop(server: RedisServer) -> Iterator[ServiceProcess]:
    service = start_traffic_cop(server.url)
    yield service
    service.stop()


async def _status(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url) as r:
            return r.status
    except aiohttp.ClientConnectionError:
        return None


async def _metric(http: aiohttp.ClientSession, gw: ServiceProcess, name: str) -> float:
    async with http.get(gw.url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _exit_code(gw: ServiceProcess) -> int:
    """The exit code of a gateway already sent SIGTERM (a second SIGTERM would cut its
    drain short, as a second Ctrl-C does)."""
    assert gw.proc is not None
    code = gw.proc.wait(timeout(15))
    gw.stop()
    return code


async def _queued_ids(redis_url: str, channel: str) -> list[str]:
    async with redis_client(redis_url) as redis:
        raw = await stream_data(redis, channel)
    return [orjson.loads(m)["message_id"] for m in raw]


# -- start-up ---------------------------------------------------------------------------------


async def test_503_while_traffic_cop_is_not_up_then_ready_when_it_comes(redis_url):
    cop_port = free_port()
    gw = gateway_process(
        redis_url,
        f"http://127.0.0.1:{cop_port}",
        GATEWAY_STARTUP_WAIT_SECONDS=str(timeout(60)),
    )
    gw.start(wait_ready=False)
    cop: ServiceProcess | None = None
    try:
        async with aiohttp.ClientSession() as http:
            # The port is bound at once: liveness answers while the dependencies do not.
            await wait_for(lambda: _is(http, gw.url + "/health", 200), 10, what="/health")

            async def failing() -> dict[str, str]:
                async with http.get(gw.url + "/ready") as r:
                    assert r.status == 503
                    body: dict[str, str] = (await r.json())["failing"]
                    return body if "traffic_cop" in body.get("startup", "") else {}

            # Redis answers at once; then it names what it still waits for.
            failed = await wait_for(failing, 10, what="/ready naming traffic_cop")
            assert failed["startup"] == "Starting: waiting for traffic_cop"
            assert "traffic_cop" in failed
            async with http.get(gw.url + "/ws") as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["code"] == "unavailable"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ws_url(gw, "any-token"))
            assert refused.value.status == 503

            cop = ServiceProcess(
                "services.traffic_cop_stub",
                {
                    "REDIS_URL": redis_url,
                    "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                    "TRAFFIC_COP_PORT": str(cop_port),
                },
                port=cop_port,
            ).start()
            await wait_for(lambda: _is(http, gw.url + "/ready", 200), 10, what="ready")
            token = create_session(cop.url, "late")
            async with http.ws_connect(ws_url(gw, token)) as ws:
                assert (await recv(ws))["type"] == "welcome"
    finally:
        assert gw.stop() == 0, gw.log()[-3000:]
        if cop is not None:
            cop.stop()


async def _is(http: aiohttp.ClientSession, url: str, status: int) -> bool:
    return await _status(http, url) == status


# -- drain ------------------------------------------------------------------------------------


async def test_drain_publishes_the_breaker_buffer_when_redis_returns_during_the_drain(
    server, private_traffic_cop
):
    gw = start_gateway(
        server.url, private_traffic_cop.url, GATEWAY_SHUTDOWN_TIMEOUT=str(timeout(10))
    )
    try:
        token = create_session(private_traffic_cop.url, "drainer")
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, token)) as ws:
            await recv(ws)
            server.stop()
            promised = []
            for i in range(3):
                await ws.send_str(chat(f"held {i}", id=i))
                ack = await recv(ws)
                assert (ack["type"], ack["id"], ack["status"]) == ("ack", i, "queued")
                promised.append(ack["message_id"])
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            await wait_for(
                lambda: "drain: handing 3 waiting messages" in gw.log(), 10, what="drain start"
            )
            # Redis returns within the drain window: the socket is still open meanwhile.
            assert not ws.closed
            server.start()
            assert await close_of(ws, 10) == (1001, "server shutting down")
        assert _exit_code(gw) == 0
        # In Redis exactly once each, in order (no agent listens, so they wait in the queue).
        assert await _queued_ids(server.url, "guide") == promised
        assert "LOST" not in gw.log()
    finally:
        gw.stop()


async def test_messages_sent_just_before_sigterm_are_answered_and_published_exactly_once(
    redis_url, traffic_cop
):
    gw = start_gateway(redis_url, traffic_cop.url)
    try:
        token = create_session(traffic_cop.url, "late-sender")
        acks: dict[Any, str] = {}
        errors: dict[Any, str] = {}
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, token)) as ws:
            await recv(ws)
            for i in range(60):
                await ws.send_str(chat(f"m{i}", id=i))
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            while True:
                msg = await ws.receive(timeout=timeout(10))
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                frame = orjson.loads(msg.data)
                if frame["type"] == "ack":
                    acks[frame["id"]] = frame["message_id"]
                elif frame["type"] == "error":
                    errors[frame["id"]] = frame["code"]
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert _exit_code(gw) == 0
        assert acks, "no message was acked before the drain"
        assert not set(acks) & set(errors)
        assert set(errors.values()) <= {"unavailable"}
        # Every acked message is in Redis once, and nothing is there that was not acked.
        queued = await _queued_ids(redis_url, "guide")
        assert sorted(queued) == sorted(acks.values())
        # Acked in the order sent.
        assert list(acks) == sorted(acks)
    finally:
        gw.stop()


async def test_consul_deregistration_comes_before_the_sockets_close(redis_url, traffic_cop):
    consul = ConsulServer(
        stagger=False, min_interval=0.05, reap_interval=0.1, plan_names=True
    ).start()
    try:
        gw = start_gateway(redis_url, traffic_cop.url, CONSUL_URL=consul.url)
        service_id = f"{GATEWAY_SERVICE.name}-{instance_of(gw)}"
        try:
            async with aiohttp.ClientSession() as http:

                async def passing() -> list[int]:
                    url = f"{consul.url}/v1/health/service/{GATEWAY_SERVICE.name}?passing=true"
                    async with http.get(url) as r:
                        return [e["Service"]["Port"] for e in await r.json()]

                # The first check runs at registration; one more interval (10 s) at worst.
                await wait_for(lambda: _eq(passing(), [gw.port]), 15, what="gateway passing")
                token = create_session(traffic_cop.url, "consul-watcher")
                async with http.ws_connect(ws_url(gw, token), autoclose=False) as ws:
                    await recv(ws)
                    assert gw.proc is not None
                    gw.proc.send_signal(signal.SIGTERM)
                    msg = await ws.receive(timeout=timeout(10))
                    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
                    # The close frame is the first sign of the drain a client sees; the
                    # instance has left Consul before it, while its /health still answers.
                    assert await passing() == []
                    async with http.get(consul.url + "/v1/agent/services") as r:
                        assert service_id not in await r.json()
                    await ws.close()
            assert _exit_code(gw) == 0
            assert "deregistered" in gw.log()
        finally:
            gw.stop()
    finally:
        consul.stop()


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# -- the breaker and a full channel -----------------------------------------------------------


async def test_a_full_channel_does_not_hold_up_the_others_once_redis_is_back(
    server, private_traffic_cop
):
    # Bound 1 and one unconsumed message already in pillar:content's stream: Redis refuses
    # every further message on it until an agent consumes.
    gw = start_gateway(server.url, private_traffic_cop.url, GATEWAY_STREAM_MAX_PENDING="1")
    try:
        async with redis_client(server.url) as redis:
            await redis.xadd(names.stream("pillar:content"), {"data": b"{}"})
        token = create_session(private_traffic_cop.url, "two-channels")
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, token)) as ws:
            await recv(ws)
            # Frozen, not stopped: a restarted redis-server here would come back empty.
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)
            promised = []
            try:
                for i in range(2):
                    await ws.send_str(chat(f"content {i}", id=f"c{i}", channel="pillar:content"))
                    ack = await recv(ws)
                    assert (ack["id"], ack["status"]) == (f"c{i}", "queued")
                    promised.append(ack["message_id"])
            finally:
                server.proc.send_signal(signal.SIGCONT)

            # Redis answers again: the breaker closes although it refuses both promised
            # messages (their channel is full); they wait in that channel's retry list.
            async def breaker() -> tuple[float, float]:
                return (
                    await _metric(http, gw, "postoffice_gateway_breaker_open"),
                    await _metric(http, gw, "postoffice_gateway_breaker_buffered"),
                )

            await wait_for(lambda: _eq(breaker(), (0.0, 2.0)), 10, what="breaker closed")
            async with redis_client(server.url) as redis:
                async with AgentListener(redis, "guide") as guide:
                    await ws.send_str(chat("to the guide", id="g1"))
                    ack = await recv(ws)
                    assert (ack["id"], ack["status"]) == ("g1", "published")
                    await wait_for(lambda: guide.messages, 5, what="guide message")
                    assert [m["message_id"] for m in guide.messages] == [ack["message_id"]]

                # A new message for the full channel is refused, not promised.
                await ws.send_str(chat("one more", id="c2", channel="pillar:content"))
                error = await recv(ws)
                assert (error["type"], error["id"], error["code"]) == ("error", "c2", "unavailable")

                # An agent consumes it: room frees up one message at a time, and the promised
                # messages reach it, in order, once.
                stream = names.stream("pillar:content")
                await redis.xgroup_create(stream, "content", id="0")
                got: list[str] = []

                async def consume() -> bool:
                    raw = await redis.xreadgroup("content", "c", {stream: ">"}, count=10)
                    for entry_id, fields in raw[0][1] if raw else []:
                        got.append(orjson.loads(fields[b"data"]).get("message_id", "prefill"))
                        await redis.xack(stream, "content", entry_id)
                    return len(got) >= 3

                await wait_for(consume, 10, what="delivery")
                await wait_for(lambda: _eq(breaker(), (0.0, 0.0)), 10, what="retried")
                assert got == ["prefill", *promised]
    finally:
        assert gw.stop() == 0


# -- supervision ------------------------------------------------------------------------------


async def test_a_dead_critical_task_fails_ready(aiohttp_client):
    async def dies(app: web.Application) -> None:
        raise RuntimeError("boom")

    app = base_app("doomed", "doomed-1")
    app.cleanup_ctx.append(background("doomed-task", dies, critical=True))
    client = await aiohttp_client(app)

    async def failed() -> bool:
        async with client.get("/ready") as r:
            return r.status == 503 and bool((await r.json())["status"] == "failed")

    await wait_for(failed, 5, what="/ready failed")
    assert "doomed-task" in app[SERVICE].failed


_CRASHING_SERVICE = """
import sys
from aiohttp import web
from shared.service import background, base_app, run

async def dies(app):
    raise RuntimeError("boom")

async def owned(app):
    yield
    print("cleanup ran", flush=True)

app = base_app("doomed", "doomed-1")
app.cleanup_ctx.append(owned)
app.cleanup_ctx.append(background("doomed-task", dies, critical=True))
run(app, "127.0.0.1", int(sys.argv[1]), 1.0)
"""


def test_a_dead_critical_task_stops_the_process_with_a_non_zero_exit():
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_SERVICE, str(free_port())],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout(20),
    )
    assert done.returncode == 1, done
    assert "cleanup ran" in done.stdout, done
    assert "doomed-task" in done.stderr, done


async def test_frames_sent_during_a_slow_drain_are_all_answered(server, private_traffic_cop):
    # Redis is down, so the drain waits its whole window for the breaker's buffer. Frames the
    # client sends meanwhile must each get an answer (the publisher no longer takes messages:
    # error "unavailable"), until the socket closes 1001 — not be discarded unanswered.
    gw = start_gateway(
        server.url, private_traffic_cop.url, GATEWAY_SHUTDOWN_TIMEOUT=str(timeout(6))
    )
    try:
        token = create_session(private_traffic_cop.url, "slowdrain")
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(gw, token)) as ws:
            await recv(ws)
            server.stop()
            await ws.send_str(chat("held", id="held"))
            assert (await recv(ws))["status"] == "queued"
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: "drain: handing 1 waiting" in gw.log(), 10, what="drain")
            sent, answers = 0, []
            for i in range(20):
                await ws.send_str(chat(f"during {i}", id=i))
                sent += 1
            while len(answers) < sent:
                answers.append(await recv(ws, 10))
            unavailable = [a for a in answers if a.get("code") == "unavailable"]
            acked = [a for a in answers if a["type"] == "ack"]
            assert [a["id"] for a in answers] == list(range(20))  # in order, once each
            assert (sent, len(acked) + len(unavailable)) == (20, 20)
            assert "shutting down" in unavailable[0]["message"]
            assert await close_of(ws, 10) == (1001, "server shutting down")
        assert _exit_code(gw) == 0
    finally:
        server.start()
        gw.stop()
