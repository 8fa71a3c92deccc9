"""What a user would compare: the full round trip, idle memory, connects, and issue 12's targets.

``python -m bench.roundtrip [--quick] [--runs N]`` (``make bench`` runs it last). Everything is
local and over loopback: a private redis-server per system, each part in its own process, the
load client (:mod:`bench.loadclient`, picows on uvloop) in a process of its own whose CPU share
is reported with every run and flagged past :data:`bench.loadclient.CPU_FLAG_PERCENT`.

The round trip is client → server → Redis → responder → Redis → server → the same client, with
a 100-character chat message, for five systems:

* ``floor``: :mod:`bench.floor` (aiohttp, one batched publisher, one subscriber) with the raw
  responder (:mod:`bench.responder`): the least any gateway on this stack can cost;
* ``po``: Post Office (Traffic Cop, one gateway) with the raw responder;
* ``po_agent``: Post Office with the real agent path: ``post_office_client`` over the API
  (:mod:`bench.agent_responder`);
* ``po_2gw``: Post Office with two gateways, the sockets split between them (closed loop only);
* ``sio``: python-socketio 5.x with AsyncRedisManager (:mod:`bench.sio_server`), in its own
  venv under ``.bench-venv/`` that this creates, with the raw responder in socketio's format.

Loads: a closed loop (100 sockets x 8 in flight) and fixed-rate open loops at 2,500 and 5,000
msg/s with p50/p99/p99.9. Then, on fresh processes: 10,000 idle sockets (RSS per socket of the
server, Redis bytes per socket, connects per second including validation and registration) for
floor, Post Office and socketio, and ``send_to_connection`` requests per second on one API
process. The gateway is configured only through its settings (shown in the output and the
JSON), and driven only through the wire protocol.

Each figure is the median of ``--runs`` runs (3; 1 with ``--quick``) with min and max. Results:
``bench/results/roundtrip.json`` and ``bench/results/roundtrip.md``, with every issue-12 target,
its ratio and whether it is met. The exit code is non-zero when a run failed (lost answers,
error frames, a process that died), never because a target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.common import RESULTS_DIR, ROOT, ProcWatch, ReadyChild, machine, quick, write_result
from bench.gateway_throughput import (
    GATEWAY_BENCH_SETTINGS,
    create_sessions,
    start_gateway,
    start_traffic_cop,
)
from bench.loadclient import CPU_FLAG_PERCENT, percentiles
from bench.responder import SOCKETIO_CHANNEL
from shared import redis_names as names
from tests.helpers import TRAFFIC_COP_KEY, RedisServer, ServiceProcess

#: The reference peer's venv: created on first use, reused while its requirements are the same.
SIO_VENV = ROOT / ".bench-venv"
SIO_REQUIREMENTS = ("python-socketio==5.*", "redis[hiredis]==8.*", "aiohttp==3.*", "uvloop")
#: Sockets held open for the idle-memory and connect figures; each costs a descriptor in the
#: client and one in the server, so each of them needs RLIMIT_NOFILE above it (raised at
#: start; the children inherit it).
IDLE_SOCKETS = 10_000
NOFILE_NEEDED = IDLE_SOCKETS + 1024
REALM_KEY = "dev-smart_city"
#: Extra gateway settings here, on top of GATEWAY_BENCH_SETTINGS (10,000 sockets is the default
#: GATEWAY_MAX_CONNECTIONS; the idle run needs a little room above it).
GATEWAY_SETTINGS = {**GATEWAY_BENCH_SETTINGS, "GATEWAY_MAX_CONNECTIONS": str(IDLE_SOCKETS + 1000)}
#: The agent path's group consumer holds as many unacked messages as it answers at once (64).
API_SETTINGS = {"POST_OFFICE_RATE_LIMIT_PER_SECOND": "0", "POST_OFFICE_GROUP_MAX_IN_FLIGHT": "64"}
SYSTEMS = ("floor", "po", "po_agent", "po_2gw", "sio")
LABELS = {
    "floor": "bare floor",
    "po": "Post Office, raw responder",
    "po_agent": "Post Office, agent path (client over API)",
    "po_2gw": "Post Office, 2 gateways",
    "sio": "python-socketio + AsyncRedisManager",
}


@dataclass(frozen=True)
class Plan:
    runs: int
    sockets: int = 100
    in_flight: int = 8
    rates: tuple[int, ...] = (2500, 5000)
    warmup: float = 1.0
    closed_seconds: float = 5.0
    open_seconds: float = 8.0
    drain: float = 5.0
    idle_sockets: int = IDLE_SOCKETS
    idle_runs: int = 3
    http_seconds: float = 5.0
    http_workers: int = 64
    http_sockets: int = 100
    payload_bytes: int = 100
    #: Load-client processes for the closed loop, the idle sockets and the HTTP load (where
    #: one client would pass half a core); the open loops need one.
    clients: int = 2


def plan(quick_run: bool, runs: int | None) -> Plan:
    if quick_run:
        return Plan(
            runs=runs or 1,
            sockets=20,
            warmup=0.1,
            closed_seconds=0.5,
            open_seconds=0.5,
            drain=1.0,
            idle_sockets=100,
            idle_runs=1,
            http_seconds=0.5,
            http_workers=16,
            http_sockets=10,
        )
    return Plan(runs=runs or 3)


# ---- the systems under test ------------------------------------------------------------------


@dataclass
class System:
    """One running system: how to reach it, which processes to watch, what it was started with."""

    name: str
    dialect: str
    redis: RedisServer
    ws_urls: list[str]
    watches: dict[str, int] = field(default_factory=dict)
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    traffic_cop_url: str = ""
    api_url: str = ""
    server_pid: int = 0  # the process whose RSS per socket is measured

    async def urls(self, http: aiohttp.ClientSession, count: int, tag: str) -> list[str]:
        """One URL per socket; Post Office gets a fresh Traffic Cop session for each."""
        if not self.traffic_cop_url:
            return [self.ws_urls[i % len(self.ws_urls)] for i in range(count)]
        users = [f"bench-{tag}-{i}" for i in range(count)]
        tokens = await create_sessions(http, self.traffic_cop_url, users)
        return [
            f"{self.ws_urls[i % len(self.ws_urls)]}?session_token={t}" for i, t in enumerate(tokens)
        ]


def _ws(service: ServiceProcess, path: str) -> str:
    return service.url.replace("http://", "ws://") + path


def _started(service: ServiceProcess) -> int:
    if service.proc is None:
        raise RuntimeError(f"{service.module} is not running")
    return service.proc.pid


@asynccontextmanager
async def start_system(name: str, sio_python: Path | None) -> AsyncIterator[System]:
    """Start ``name``'s processes on a private redis-server; stop them all on exit."""
    redis = RedisServer().start()
    parts: list[Callable[[], object]] = [redis.cleanup]
    try:
        if redis.proc is None:
            raise RuntimeError("redis-server is not running")
        watches = {"redis": redis.proc.pid}
        if name == "floor":
            floor = ServiceProcess("bench.floor", {"REDIS_URL": redis.url})
            floor.env["FLOOR_PORT"] = str(floor.port)
            parts.append(floor.start().stop)
            responder = ReadyChild([sys.executable, "-m", "bench.responder", redis.url, "po"])
            parts.append(responder.stop)
            system = System(name, "floor", redis, [_ws(floor, "/ws")], server_pid=_started(floor))
            system.watches = {**watches, "server": system.server_pid, "agent": responder.pid}
        elif name == "sio":
            if sio_python is None:
                raise RuntimeError("no python-socketio venv")
            if names.agent_channel("guide") != "websocket:guide":
                raise RuntimeError("bench.sio_server spells the agent channel differently")
            sio = ServiceProcess("bench.sio_server", {"REDIS_URL": redis.url})
            sio.env["SIO_PORT"] = str(sio.port)
            sio.env["PATH"] = f"{sio_python.parent}:{os.environ.get('PATH', '')}"
            parts.append(_start_with(sio, sio_python).stop)
            await _wait_subscribed(redis.url, SOCKETIO_CHANNEL)
            responder = ReadyChild([sys.executable, "-m", "bench.responder", redis.url, "sio"])
            parts.append(responder.stop)
            system = System(
                name,
                "sio",
                redis,
                [_ws(sio, "/socket.io/?EIO=4&transport=websocket")],
                server_pid=_started(sio),
            )
            system.watches = {**watches, "server": system.server_pid, "agent": responder.pid}
        else:
            traffic_cop = start_traffic_cop(redis.url)
            parts.append(traffic_cop.stop)
            # The whole stack: the worker also drains agent-channel queues, which is what
            # ends a channel's "queued" mode after an overload (the gateway queues behind
            # older queued messages until they are drained).
            worker = ServiceProcess(
                "services.eviction_worker",
                {
                    "REDIS_URL": redis.url,
                    "TRAFFIC_COP_URL": traffic_cop.url,
                    "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                },
            )
            worker.env["EVICTION_PORT"] = str(worker.port)
            parts.append(worker.start().stop)
            gateways = []
            for i in range(2 if name == "po_2gw" else 1):
                gateway = start_gateway(redis.url, traffic_cop.url, i, GATEWAY_SETTINGS)
                parts.append(gateway.stop)
                gateways.append(gateway)
            system = System(
                name,
                "po",
                redis,
                [_ws(g, "/ws") for g in gateways],
                traffic_cop_url=traffic_cop.url,
                server_pid=_started(gateways[0]),
                settings={"gateway": dict(GATEWAY_SETTINGS)},
            )
            system.watches = {
                **watches,
                "traffic_cop": _started(traffic_cop),
                "worker": _started(worker),
            }
            for i, g in enumerate(gateways):
                system.watches[f"gateway{i}" if len(gateways) > 1 else "gateway"] = _started(g)
            if name in ("po_agent", "po_api"):
                api = ServiceProcess(
                    "services.post_office_api",
                    {
                        "REDIS_URL": redis.url,
                        "GATEWAY_URLS": gateways[0].url,
                        "TRAFFIC_COP_URL": traffic_cop.url,
                        "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
                        **API_SETTINGS,
                    },
                )
                api.env["POST_OFFICE_PORT"] = str(api.port)
                parts.append(api.start().stop)
                system.api_url = api.url
                system.watches["api"] = _started(api)
                system.settings["api"] = dict(API_SETTINGS)
            if name == "po_agent":
                agent = ReadyChild(
                    [sys.executable, "-m", "bench.agent_responder", system.api_url, REALM_KEY]
                )
                parts.append(agent.stop)
                system.watches["agent"] = agent.pid
            elif name != "po_api":
                responder = ReadyChild([sys.executable, "-m", "bench.responder", redis.url, "po"])
                parts.append(responder.stop)
                system.watches["agent"] = responder.pid
        yield system
    finally:
        for stop in reversed(parts):
            with suppress(Exception):
                stop()


def _start_with(service: ServiceProcess, python: Path) -> ServiceProcess:
    """``service.start()`` with another interpreter (the reference peer's venv).

    ``tests.helpers.ServiceProcess`` runs ``sys.executable``; it is swapped for the call only,
    which is safe here: the orchestrator is one thread and ``start`` blocks until ready."""
    real = sys.executable
    sys.executable = str(python)
    try:
        return service.start()
    finally:
        sys.executable = real


async def _wait_subscribed(redis_url: str, channel: str) -> None:
    from bench.resp import Resp, encode

    conn = await Resp.open(redis_url)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            conn.writer.write(encode("PUBSUB", "NUMSUB", channel))
            (reply,) = await conn.replies(1)
            if int(reply[1]) >= 1:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"nobody subscribed to {channel!r} within 20 s")
    finally:
        await conn.close()


async def queue_drained(redis_url: str, seconds: float = 30.0) -> None:
    """Wait until the ``guide`` stream has nothing unconsumed (every group read and acked
    everything, its backlog skipped): after an overloaded run the agents would still work off
    the backlog, which would make the next run measure it. Without a group (the raw responders
    read the tap) nothing consumes the stream: it is emptied instead, so runs do not grow it
    without end."""
    from bench.resp import Resp, encode
    from shared.streams import UNCONSUMED_SCRIPT

    stream = names.stream("guide")
    conn = await Resp.open(redis_url)
    try:
        conn.writer.write(encode("EXISTS", stream))
        (exists,) = await conn.replies(1)
        if not int(exists):
            return
        conn.writer.write(encode("XINFO", "GROUPS", stream))
        (groups,) = await conn.replies(1)
        if not groups:
            conn.writer.write(encode("DEL", stream))
            await conn.replies(1)
            return
        # An overloaded run leaves a backlog the agents would work off for minutes (it is
        # durable now): the next run skips it (XGROUP SETID $) and waits only for the messages
        # in flight to be answered and acked.
        for group in groups:
            fields = dict(zip(group[::2], group[1::2], strict=True))
            conn.writer.write(encode("XGROUP", "SETID", stream, fields[b"name"], "$"))
            await conn.replies(1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.writer.write(encode("EVAL", UNCONSUMED_SCRIPT, "1", stream))
            (left,) = await conn.replies(1)
            if not int(left):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{stream} was not consumed within {seconds:.0f} s")
    finally:
        await conn.close()


async def redis_used_memory(redis_url: str) -> int:
    from bench.resp import Resp, encode

    conn = await Resp.open(redis_url)
    try:
        conn.writer.write(encode("INFO", "memory"))
        (info,) = await conn.replies(1)
    finally:
        await conn.close()
    for line in info.decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError("INFO memory has no used_memory")


# ---- one load-client run ----------------------------------------------------------------------


def split(config: dict[str, Any], clients: int) -> list[dict[str, Any]]:
    """One load-client config per process: the sockets dealt round-robin, the open loop's rate
    and the HTTP workers divided between them."""
    parts = []
    for i in range(clients):
        part = {**config, "urls": config["urls"][i::clients]}
        if "rate" in config:
            part["rate"] = config["rate"] / clients
        if "workers" in config:
            part["workers"] = max(1, config["workers"] // clients)
        parts.append(part)
    return [p for p in parts if p["urls"]]


def merge(results: list[dict[str, Any]], samples: list[list[float]]) -> dict[str, Any]:
    """Several load clients' results as one: counts and rates summed, latency percentiles over
    every client's samples, CPU per client (the flag is per process: each is one thread)."""
    merged: dict[str, Any] = {"clients": len(results)}
    connects = [r["connect"] for r in results]
    seconds = max(c["connect_seconds"] for c in connects)
    sockets = sum(c["sockets"] for c in connects)
    merged["connect"] = {
        "sockets": sockets,
        "failed": sum(c["failed"] for c in connects),
        "first_failures": [f for c in connects for f in c["first_failures"]][:3],
        "connect_seconds": seconds,
        # The clients connect at the same time: the rate is all sockets over the slowest.
        "connects_per_second": round(sockets / seconds, 1) if seconds else None,
        "connect_latency": [c["connect_latency"] for c in connects],
        "client_cpu_percent": max(c["client_cpu_percent"] for c in connects),
        "client_cpu_percent_each": [c["client_cpu_percent"] for c in connects],
    }
    summed = (
        "replies_per_second",
        "received_per_second",
        "sent_in_window",
        "unanswered",
        "requests_per_second",
        "sent_ok",
        "delivered",
        "replies",
        "acks",
        "errors",
        "unmatched",
    )
    for key in summed:
        if any(key in r for r in results):
            merged[key] = round(sum(r.get(key, 0) for r in results), 1)
    merged["first_errors"] = [e for r in results for e in r.get("first_errors", [])][:5]
    for key in ("error_codes", "window_statuses"):
        counts: dict[str, int] = {}
        for r in results:
            for code, n in r.get(key, {}).items():
                counts[code] = counts.get(code, 0) + n
        if any(key in r for r in results):
            merged[key] = counts
    if any("window_seconds" in r for r in results):
        merged["window_seconds"] = max(r["window_seconds"] for r in results)
        each = [r["client_cpu_percent"] for r in results]
        merged["client_cpu_percent"] = max(each)
        merged["client_cpu_percent_each"] = each
    if any("max_schedule_lag_ms" in r for r in results):
        merged["max_schedule_lag_ms"] = max(r.get("max_schedule_lag_ms", 0) for r in results)
    if any("latency" in r for r in results):
        merged["latency"] = percentiles([s for part in samples for s in part])
    return merged


async def drive(
    config: dict[str, Any],
    watches: dict[str, int],
    on_connected: Callable[[dict[int, dict[str, Any]]], Awaitable[None]] | None = None,
    deadline_seconds: float = 300,
    clients: int = 1,
) -> dict[str, Any]:
    """Run :mod:`bench.loadclient` once in ``clients`` processes at the same time; their merged
    result with every watched process's CPU % over the measured window (``cpu``; ``client`` is
    the clients' sum), and a load client above :data:`CPU_FLAG_PERCENT` flagged."""
    workdir = Path(tempfile.mkdtemp(prefix="po-bench-"))
    parts = split(config, clients)
    procs: list[asyncio.subprocess.Process] = []
    lines: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    async def read(i: int, proc: asyncio.subprocess.Process) -> None:
        if proc.stdout is not None:
            while line := (await proc.stdout.readline()).decode().strip():
                await lines.put((i, line))
        await lines.put((i, "exit"))

    for i, part in enumerate(parts):
        part["samples_path"] = str(workdir / f"samples-{i}")
        (workdir / f"config-{i}.json").write_bytes(orjson.dumps(part))
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.loadclient",
                str(workdir / f"config-{i}.json"),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        )
    readers = [asyncio.create_task(read(i, p)) for i, p in enumerate(procs)]
    watched = {who: ProcWatch(pid) for who, pid in watches.items()}
    watched.update({f"client{i}": ProcWatch(p.pid) for i, p in enumerate(procs)})
    results: dict[int, dict[str, Any]] = {}
    connected: dict[int, dict[str, Any]] = {}
    before: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    measuring = done = exited = 0
    try:
        async with asyncio.timeout(deadline_seconds):
            while exited < len(procs):
                i, line = await lines.get()
                word, _, rest = line.partition(" ")
                if word == "connected":
                    connected[i] = orjson.loads(rest)
                    if len(connected) < len(procs):
                        continue
                    if on_connected is not None:
                        await on_connected(connected)
                    command = b"go\n" if config["mode"] != "idle" else b"stop\n"
                    for proc in procs:
                        if proc.stdin is not None:
                            proc.stdin.write(command)
                            await proc.stdin.drain()
                elif word == "measuring":
                    measuring += 1
                    if measuring == 1:
                        before = {who: w.sample() for who, w in watched.items()}
                elif word == "done":
                    done += 1
                    if done < len(procs):
                        continue
                    for who, w in watched.items():
                        after = w.sample()
                        elapsed = max(after.at - before[who].at, 1e-9)
                        cpu[who] = round(
                            100 * (after.cpu_seconds - before[who].cpu_seconds) / elapsed, 1
                        )
                    cpu["client"] = round(sum(v for k, v in cpu.items() if k[:6] == "client"), 1)
                elif word == "result":
                    results[i] = orjson.loads(rest)
                elif word == "exit":
                    exited += 1
            codes = [await p.wait() for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for task in readers:
            task.cancel()
        samples = [_samples(workdir / f"samples-{i}") for i in range(len(procs))]
        shutil.rmtree(workdir, ignore_errors=True)
    if len(results) < len(procs):
        raise RuntimeError(f"{len(procs) - len(results)} load clients gave no result ({codes})")
    ordered = [results[i] for i in range(len(procs))]
    result = ordered[0] if len(procs) == 1 else merge(ordered, samples)
    result["cpu"] = cpu
    client_cpu = result.get("client_cpu_percent", result["connect"].get("client_cpu_percent"))
    result["client_bottleneck"] = bool(client_cpu and client_cpu > CPU_FLAG_PERCENT)
    return result


def _samples(path: Path) -> list[float]:
    if not path.exists():
        return []
    values = array("d")
    values.frombytes(path.read_bytes())
    return values.tolist()


def run_problems(result: dict[str, Any], expect_acks: bool) -> list[str]:
    """What makes a run wrong rather than slow."""
    problems = []
    connect = result["connect"]
    if connect["failed"]:
        problems.append(f"{connect['failed']} connects failed: {connect['first_failures']}")
    errors = result.get("errors", 0)
    if result.get("overloaded"):
        # Past its capacity the gateway refuses messages with error 'unavailable' (its
        # publish queue, or the channel's queue, is full): shedding load, as documented.
        result["shed"] = result.get("error_codes", {}).get("unavailable", 0)
        errors -= result["shed"]
    if errors:
        problems.append(f"{errors} errors: {result['first_errors'][:2]}")
    if result.get("unanswered"):
        problems.append(f"{result['unanswered']} messages unanswered after the drain")
    if result.get("unmatched"):
        problems.append(f"{result['unmatched']} frames matched no message")
    if expect_acks and "sent_in_window" in result and result["acks"] < result["replies"]:
        problems.append(f"{result['acks']} acks for {result['replies']} answers")
    if "delivered" in result and result["delivered"] < result["sent_ok"]:
        problems.append(f"{result['sent_ok']} deliveries accepted, {result['delivered']} arrived")
    return problems


# ---- figures ----------------------------------------------------------------------------------


def figure(values: list[float | None], unit: str, flags: list[str]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    if not got:
        return {
            "median": None,
            "min": None,
            "max": None,
            "runs": values,
            "unit": unit,
            "flags": sorted(set(flags)),
        }
    return {
        "median": round(statistics.median(got), 3),
        "min": round(min(got), 3),
        "max": round(max(got), 3),
        "runs": values,
        "unit": unit,
        "flags": sorted(set(flags)),
    }


def _flags(result: dict[str, Any]) -> list[str]:
    flags = []
    if result.get("client_bottleneck"):
        flags.append(f"load client above {CPU_FLAG_PERCENT:.0f} % of a core")
    if result.get("overloaded"):
        flags.append("overloaded: answers fell behind the offered rate")
    return flags


class Bench:
    def __init__(self, p: Plan, sio_python: Path | None) -> None:
        self.plan = p
        self.sio_python = sio_python
        self.figures: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.settings: dict[str, Any] = {}

    def record(self, key: str, values: list[float | None], unit: str, results: list[Any]) -> None:
        flags = [f for r in results for f in _flags(r)]
        self.figures[key] = figure(values, unit, flags)
        shown = self.figures[key]
        client = [r.get("client_cpu_percent", r["connect"]["client_cpu_percent"]) for r in results]
        flagged = f"  [{'; '.join(shown['flags'])}]" if shown.get("flags") else ""
        print(f"  {key:<36} {_fmt(shown)} {unit}  (client cpu {client} %){flagged}", flush=True)

    def keep(self, kind: str, system: str, result: dict[str, Any], expect_acks: bool) -> None:
        problems = run_problems(result, expect_acks)
        self.runs.append({"kind": kind, "system": system, "problems": problems, **result})
        if problems:
            self.failures.append(f"{system} {kind}: {'; '.join(problems)}")
            print(f"  !! {system} {kind}: {'; '.join(problems)}", flush=True)

    async def round_trips(self, http: aiohttp.ClientSession, name: str) -> None:
        p = self.plan
        print(f"-- {name}: {LABELS[name]}", flush=True)
        async with start_system(name, self.sio_python) as system:
            self.settings[name] = system.settings
            base = {
                "dialect": system.dialect,
                "payload_bytes": p.payload_bytes,
                "connect_concurrency": 100,
                "warmup": p.warmup,
                "drain": p.drain,
            }
            expect_acks = system.dialect == "po"
            closed = []
            for run in range(p.runs):
                await queue_drained(system.redis.url)
                urls = await system.urls(http, p.sockets, f"{name}-c{run}")
                config = {**base, "urls": urls, "mode": "closed", "in_flight": p.in_flight}
                config["seconds"] = p.closed_seconds
                result = await drive(config, system.watches, clients=p.clients)
                self.keep("closed", name, result, expect_acks)
                closed.append(result)
            self.record(
                f"closed.{name}", [r.get("replies_per_second") for r in closed], "msg/s", closed
            )
            self.figures[f"closed.{name}"]["cpu"] = [r["cpu"] for r in closed]
            if name == "po_2gw":
                return
            for rate in p.rates:
                opened = []
                for run in range(p.runs):
                    await queue_drained(system.redis.url)
                    urls = await system.urls(http, p.sockets, f"{name}-o{rate}-{run}")
                    config = {**base, "urls": urls, "mode": "open", "rate": rate}
                    config["seconds"] = p.open_seconds
                    result = await drive(config, system.watches)
                    sent = max(result.get("sent_in_window", 0), 1)
                    # Behind the offered rate: answers arrived slower than messages were sent
                    # during the window, or did not all arrive within the drain.
                    result["overloaded"] = result.get("received_per_second", 0) < 0.95 * rate or (
                        result.get("unanswered", 0) > 0.01 * sent
                    )
                    # An overloaded run's lost answers say "too slow", not "broken".
                    if result["overloaded"]:
                        result["unanswered_overloaded"] = result.pop("unanswered", 0)
                    self.keep(f"open{rate}", name, result, expect_acks)
                    opened.append(result)
                for pct in ("p50", "p99", "p999"):
                    self.record(
                        f"open{rate}.{name}.{pct}",
                        [None if r["overloaded"] else r["latency"][f"{pct}_ms"] for r in opened],
                        "ms",
                        opened,
                    )
                self.figures[f"open{rate}.{name}.p99"]["cpu"] = [r["cpu"] for r in opened]

    async def idle(self, http: aiohttp.ClientSession, name: str) -> None:
        p = self.plan
        print(f"-- idle {p.idle_sockets} sockets: {LABELS[name]}", flush=True)
        rss, redis_bytes, rates = [], [], []
        results = []
        for run in range(p.idle_runs):
            async with start_system(name, self.sio_python) as system:
                urls = await system.urls(http, p.idle_sockets, f"{name}-idle{run}")
                server = ProcWatch(system.server_pid)
                # Settle: what start-up allocated is not per socket.
                await asyncio.sleep(1.0)
                rss0 = server.sample().rss_mb
                mem0 = await redis_used_memory(system.redis.url)
                seen: dict[str, float] = {}

                async def connected(
                    info: dict[int, dict[str, Any]],
                    system: System = system,
                    server: ProcWatch = server,
                    seen: dict[str, float] = seen,
                ) -> None:
                    # Let the last registrations and buffers settle before reading RSS.
                    await asyncio.sleep(2.0)
                    seen["rss"] = server.sample().rss_mb
                    seen["redis"] = await redis_used_memory(system.redis.url)

                config = {
                    "dialect": system.dialect,
                    "urls": urls,
                    "mode": "idle",
                    "connect_concurrency": 100,
                }
                result = await drive(config, system.watches, connected, clients=p.clients)
                self.keep("idle", name, result, expect_acks=False)
                results.append(result)
                n = max(result["connect"]["sockets"], 1)
                rss.append(round((seen["rss"] - rss0) * 1024 / n, 2))
                redis_bytes.append(round((seen["redis"] - mem0) / n, 1))
                rates.append(result["connect"]["connects_per_second"])
        self.record(f"idle.{name}.rss_kb_per_socket", list(rss), "KB", results)
        self.record(f"idle.{name}.redis_bytes_per_socket", list(redis_bytes), "B", results)
        self.record(f"connect.{name}.per_second", list(rates), "connects/s", results)

    async def send_to_connection(self, http: aiohttp.ClientSession) -> None:
        p = self.plan
        print("-- send_to_connection on one API process", flush=True)
        results = []
        async with start_system("po_api", None) as system:
            self.settings["po_api"] = system.settings
            for run in range(p.runs):
                urls = await system.urls(http, p.http_sockets, f"api-{run}")
                config = {
                    "dialect": "po",
                    "urls": urls,
                    "mode": "http",
                    "api_url": system.api_url,
                    "realm_key": REALM_KEY,
                    "workers": p.http_workers,
                    "warmup": p.warmup,
                    "seconds": p.http_seconds,
                    "drain": p.drain,
                }
                result = await drive(config, system.watches, clients=p.clients)
                statuses = result.get("window_statuses", {})
                if set(statuses) - {"202"}:
                    result["errors"] = result.get("errors", 0) + sum(
                        v for k, v in statuses.items() if k != "202"
                    )
                    result.setdefault("first_errors", []).append(f"statuses {statuses}")
                self.keep("http", "po_api", result, expect_acks=False)
                results.append(result)
        self.record(
            "api.send_to_connection.per_second",
            [r.get("requests_per_second") for r in results],
            "req/s",
            results,
        )


def _fmt(fig: dict[str, Any] | None) -> str:
    if not fig or fig.get("median") is None:
        return "—"
    med, lo, hi = fig["median"], fig["min"], fig["max"]

    def n(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

    return n(med) if lo == hi else f"{n(med)} ({n(lo)}-{n(hi)})"


# ---- targets and the table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    value: str  # figure key
    goal: float
    over: str | None = None  # figure key of the reference: the goal is a ratio to it
    at_most: bool = False


TARGETS = (
    Target("closed-loop round trip ≥ 0.8x the floor", "closed.po", 0.8, "closed.floor"),
    Target(
        "p99 at 5,000 msg/s ≤ 1.5x the floor's",
        "open5000.po.p99",
        1.5,
        "open5000.floor.p99",
        at_most=True,
    ),
    Target(
        "p99 at 2,500 msg/s ≤ 1.25x the floor's",
        "open2500.po.p99",
        1.25,
        "open2500.floor.p99",
        at_most=True,
    ),
    Target(
        "≤ 16 KB RSS per idle socket (heartbeats on)",
        "idle.po.rss_kb_per_socket",
        16,
        at_most=True,
    ),
    Target("≥ 2,000 connects/s on one gateway", "connect.po.per_second", 2000),
    Target(
        "send_to_connection ≥ 5,000 req/s, one API process",
        "api.send_to_connection.per_second",
        5000,
    ),
    Target("agent path ≥ 0.5x the raw responder's round trip", "closed.po_agent", 0.5, "closed.po"),
)


def targets(figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        value = figures.get(t.value, {}).get("median")
        ref = figures.get(t.over, {}).get("median") if t.over else None
        measured = None
        if value is not None and (t.over is None or ref):
            measured = value / ref if t.over and ref else value
        met = None
        if measured is not None:
            met = measured <= t.goal if t.at_most else measured >= t.goal
        # Every run of it fell behind the offered rate: no latency to compare, and missed
        # (unless the reference fell behind too and this did not).
        overloaded = _overloaded(figures.get(t.value))
        if overloaded:
            met = False
        elif value is not None and t.over and _overloaded(figures.get(t.over)):
            met = True
        out.append(
            {
                "target": t.name,
                "figure": t.value,
                "value": value,
                "reference": t.over,
                "reference_value": ref,
                "ratio": round(measured, 3) if t.over and measured is not None else None,
                "is_ratio": t.over is not None,
                "goal": t.goal,
                "at_most": t.at_most,
                "overloaded": overloaded,
                "met": met,
            }
        )
    return out


def expected_figures(p: Plan, systems: tuple[str, ...]) -> list[str]:
    """Every figure key a run of ``systems`` produces."""
    keys = [f"closed.{s}" for s in systems]
    for s in systems:
        if s == "po_2gw":
            continue
        keys += [f"open{r}.{s}.{pct}" for r in p.rates for pct in ("p50", "p99", "p999")]
    for s in ("floor", "po", "sio"):
        if s in systems:
            keys += [
                f"idle.{s}.rss_kb_per_socket",
                f"idle.{s}.redis_bytes_per_socket",
                f"connect.{s}.per_second",
            ]
    if "po" in systems:
        keys.append("api.send_to_connection.per_second")
    return keys


def _overloaded(fig: dict[str, Any] | None) -> bool:
    return bool(fig and fig.get("median") is None and fig.get("runs"))


def markdown(figures: dict[str, dict[str, Any]], goals: list[dict[str, Any]], p: Plan) -> str:
    cols = ("floor", "po", "po_agent", "po_2gw", "sio")
    rows = [
        (f"closed loop, {p.sockets} sockets x {p.in_flight} in flight (msg/s)", "closed.{}"),
    ]
    for rate in p.rates:
        for pct, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
            rows.append((f"open loop {rate:,} msg/s: {label} (ms)", f"open{rate}.{{}}.{pct}"))
    rows += [
        (f"{p.idle_sockets:,} idle sockets: RSS per socket (KB)", "idle.{}.rss_kb_per_socket"),
        (
            f"{p.idle_sockets:,} idle sockets: Redis bytes per socket",
            "idle.{}.redis_bytes_per_socket",
        ),
        ("connects/s (handshake, validation, registration)", "connect.{}.per_second"),
    ]
    lines = [
        "| figure | " + " | ".join(LABELS[c] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, key in rows:
        cells = []
        for c in cols:
            fig = figures.get(key.format(c))
            cell = (
                "—"
                if fig is None or (fig.get("median") is None and not fig.get("runs"))
                else _fmt(fig)
            )
            if fig and fig.get("median") is None and fig.get("runs"):
                cell = "overloaded"
            if fig and fig.get("flags") and fig.get("median") is not None:
                cell += " ⚑"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if key == "closed.{}":
            cpu = [_cpu_cell(figures.get(key.format(c))) for c in cols]
            lines.append(
                "| closed loop: CPU % of a core, server / agent (+ API) / load client | "
                + " | ".join(cpu)
                + " |"
            )
    api = figures.get("api.send_to_connection.per_second")
    lines += [
        "",
        f"`send_to_connection` on one API process: {_fmt(api)} req/s "
        f"({p.http_workers} concurrent requests).",
        "",
        "Cells are the median of the runs (min-max); ⚑ marks a figure with a flagged run (the "
        f"load client above {CPU_FLAG_PERCENT:.0f} % of a core, or answers falling behind the "
        "offered rate); 'overloaded' means every run fell behind.",
        "",
        "| target | measured | goal | met |",
        "|---|---:|---:|:---:|",
    ]
    for g in goals:
        sign = "≤" if g["at_most"] else "≥"
        if g["is_ratio"]:
            measured = "overloaded" if g["overloaded"] else "—"
            if g["ratio"] is not None:
                measured = f"{g['ratio']:.2f}x ({_num(g['value'])} vs {_num(g['reference_value'])})"
            goal = f"{sign} {g['goal']}x"
        else:
            measured = _num(g["value"])
            goal = f"{sign} {g['goal']:,.0f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[g["met"]]
        lines.append(f"| {g['target']} | {measured} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def _cpu_cell(fig: dict[str, Any] | None) -> str:
    """Median CPU % over the runs: the server (gateways summed), the agent side, the client."""
    runs = (fig or {}).get("cpu") or []
    if not runs:
        return "—"

    def median_of(pick: Callable[[dict[str, float]], float]) -> str:
        return f"{statistics.median(pick(r) for r in runs):.0f}"

    server = median_of(
        lambda r: sum(v for k, v in r.items() if k.startswith(("gateway", "server")))
    )
    agent = median_of(lambda r: r.get("agent", 0.0) + r.get("api", 0.0))
    return f"{server} / {agent} / {median_of(lambda r: r.get('client', 0.0))}"


def _num(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


# ---- the reference peer's venv -------------------------------------------------------------------


def ensure_sio_venv() -> Path:
    """``.bench-venv/bin/python`` with python-socketio 5.x; created or updated when needed."""
    python = SIO_VENV / "bin" / "python"
    stamp = SIO_VENV / ".requirements"
    wanted = "\n".join(SIO_REQUIREMENTS)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"-- creating {SIO_VENV.relative_to(ROOT)} for python-socketio", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(SIO_VENV)], check=True)
    pip = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *SIO_REQUIREMENTS,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if pip.returncode != 0:
        raise RuntimeError(f"pip could not install {SIO_REQUIREMENTS}: {pip.stderr[-2000:]}")
    stamp.write_text(wanted)
    return python


def sio_versions(python: Path) -> str:
    out = subprocess.run(
        [
            str(python),
            "-c",
            "from importlib.metadata import version as v; "
            "print('python-socketio', v('python-socketio'), "
            "'python-engineio', v('python-engineio'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or out.stderr.strip()[-200:]


def raise_nofile() -> dict[str, int]:
    """RLIMIT_NOFILE to what 10,000 sockets need (children inherit it); the limits seen."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_NEEDED if hard == resource.RLIM_INFINITY else min(hard, max(soft, NOFILE_NEEDED))
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return {
        "soft_before": soft,
        "hard": hard,
        "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# ---- the run ------------------------------------------------------------------------------------


async def _main(p: Plan, systems: tuple[str, ...]) -> int:
    nofile = raise_nofile()
    if nofile["soft"] < NOFILE_NEEDED:
        print(
            f"RLIMIT_NOFILE is {nofile['soft']} (hard {nofile['hard']}); {p.idle_sockets} idle "
            f"sockets need {NOFILE_NEEDED}: raise the hard limit (ulimit -Hn)",
            flush=True,
        )
    sio_python = ensure_sio_venv() if "sio" in systems else None
    bench = Bench(p, sio_python)
    started = time.monotonic()
    print(
        "gateway settings: "
        + " ".join(f"{k}={v}" for k, v in GATEWAY_SETTINGS.items())
        + "; API: "
        + " ".join(f"{k}={v}" for k, v in API_SETTINGS.items()),
        flush=True,
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        for name in systems:
            try:
                await bench.round_trips(http, name)
            except Exception as exc:
                bench.failures.append(f"{name}: {exc!r}")
                print(f"  !! {name} stopped: {exc!r}", flush=True)
        for name in ("floor", "po", "sio"):
            if name not in systems:
                continue
            try:
                await bench.idle(http, name)
            except Exception as exc:
                bench.failures.append(f"idle {name}: {exc!r}")
                print(f"  !! idle {name} stopped: {exc!r}", flush=True)
        if "po" in systems:
            try:
                await bench.send_to_connection(http)
            except Exception as exc:
                bench.failures.append(f"send_to_connection: {exc!r}")
                print(f"  !! send_to_connection stopped: {exc!r}", flush=True)
    goals = targets(bench.figures)
    table = markdown(bench.figures, goals, p)
    info = machine()
    params = {
        **p.__dict__,
        "systems": list(systems),
        "settings": bench.settings,
        "gateway_settings": GATEWAY_SETTINGS,
        "api_settings": API_SETTINGS,
        "rlimit_nofile": nofile,
        "nofile_needed": NOFILE_NEEDED,
        "python_socketio": sio_versions(sio_python) if sio_python else None,
        "client": "picows + uvloop, one process",
        "client_cpu_flag_percent": CPU_FLAG_PERCENT,
        "seconds": round(time.monotonic() - started, 1),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    header = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {info['nproc']} x "
        f"{info['cpu_model']}, Python {info['python']}, redis-server {info['redis_server']}"
        f"{', QUICK run: the figures mean nothing' if quick() else ''}.\n\n"
    )
    (RESULTS_DIR / "roundtrip.md").write_text(header + table)
    summary = ["round trip and targets (issue 12):", *table.splitlines()]
    if bench.failures:
        summary.append("FAILED: " + " | ".join(bench.failures))
    write_result(
        "roundtrip",
        params,
        bench.runs,
        summary,
        extra={"figures": bench.figures, "targets": goals, "failures": bench.failures},
    )
    return 1 if bench.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run of everything")
    parser.add_argument("--runs", type=int, help="runs per figure (3; 1 with --quick)")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}"
    )
    parser.add_argument(
        "--table-from", type=Path, metavar="JSON", help="print the tables of a saved result"
    )
    args = parser.parse_args(argv)
    if args.table_from:
        doc = orjson.loads(args.table_from.read_bytes())
        fields = {k: v for k, v in doc["params"].items() if k in Plan.__dataclass_fields__}
        fields["rates"] = tuple(fields.get("rates", ()))
        print(markdown(doc["figures"], targets(doc["figures"]), Plan(**fields)), end="")
        return 0
    if args.quick:
        os.environ["BENCH_QUICK"] = "1"
    systems = tuple(s for s in args.systems.split(",") if s)
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}")
    return uvloop.run(_main(plan(quick(), args.runs), systems))


if __name__ == "__main__":
    raise SystemExit(main())
