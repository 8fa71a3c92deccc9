"""End to end through real gateway processes: connects, acked messages, deliveries out.

Everything is real and local: a private redis-server, a Traffic Cop process, one (then two)
gateway processes, and a counting agent process subscribed to ``websocket:guide``
(:class:`bench.common.CountingSubscriber`). This script is the load generator: it runs in its
own process (the gateways are its children), over loopback, with one aiohttp client session.

Each scenario opens C sockets and measures, in order:

* ``connect``: every socket opened with at most ``CONNECT_CONCURRENCY`` handshakes in flight,
  each counted once its ``welcome`` frame arrived (upgrade, Traffic Cop validation, pub/sub
  subscription, registry write, Traffic Cop bookkeeping): sockets/s and latency;
* ``in`` (client to agent): every socket sends M chat messages with at most ``WINDOW`` un-acked
  at a time; acked messages/s and ack latency (send to ack). The counting agent must have seen
  exactly as many messages as were acked ``published``; any difference, any ``queued`` ack or
  any error frame fails the run;
* ``out`` (agent to client): frames published from a Redis client straight to every
  ``websocket:connection:<id>:messages`` channel, pipelined, K per socket; delivered frames/s at
  the clients and latency from the pipeline being sent to the frame being read. Every frame
  must arrive.

Gateway CPU % and RSS come from /proc for each phase (:class:`bench.common.ProcWatch`), with
the load generator's, Traffic Cop's and redis-server's CPU alongside, since they all share the
same cores. Each scenario gets fresh gateway processes; rate limits are raised so the limiter
does not throttle the benchmark.

Run: ``python -m bench.gateway_throughput`` (``BENCH_QUICK=1`` for a smoke run). The whole run
stops by itself within ``DEADLINE_SECONDS``; the exit code is non-zero on any loss, error or
the deadline.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop
from redis.asyncio import Redis

from bench.common import CountingSubscriber, ProcWatch, latency_summary, quick, write_result
from shared import redis_names as names
from shared.redis_client import make_redis
from tests.helpers import TRAFFIC_COP_KEY, RedisServer, ServiceProcess

#: The whole benchmark stops by itself within this many seconds, whatever the machine.
DEADLINE_SECONDS = 225.0
#: Handshakes in flight at once while connecting (a burst of arrivals, not a thundering herd).
CONNECT_CONCURRENCY = 50
#: Messages a socket may have sent and not yet seen acked.
WINDOW = 4
#: Frames per Redis pipeline when publishing the out direction.
OUT_PIPELINE = 500
#: Sessions created per Traffic Cop request burst.
SESSION_CONCURRENCY = 50
#: No single wait (all acks, all deliveries) may take longer than this.
PHASE_TIMEOUT = 60.0
#: Roughly the size of a chat message from the page.
PAYLOAD_TEXT = "benchmark message " + "x" * 100


@dataclass(frozen=True)
class Scenario:
    name: str
    gateways: int
    connections: int
    messages: int  # per socket, client to agent
    out_frames: int  # per socket, agent to client
    #: Un-acked messages per socket. 1 with one socket is the unloaded round trip; the out
    #: direction then also publishes one frame at a time and waits for it.
    window: int = WINDOW

    @property
    def lockstep(self) -> bool:
        return self.window == 1


def scenarios() -> list[Scenario]:
    if quick():
        return [
            Scenario("c1_w1_1gw", 1, 1, 20, 20, window=1),
            Scenario("c20_1gw", 1, 20, 5, 5),
            Scenario("c20_2gw", 2, 20, 5, 5),
        ]
    return [
        # Sizes chosen so each phase lasts seconds (CPU is sampled in 10 ms ticks) and the whole
        # run stays near a minute on 2 cores.
        Scenario("c1_w1_1gw", 1, 1, 3000, 3000, window=1),
        Scenario("c100_1gw", 1, 100, 800, 400),
        Scenario("c500_1gw", 1, 500, 120, 80),
        Scenario("c1000_1gw", 1, 1000, 60, 40),
        Scenario("c1000_2gw", 2, 1000, 60, 40),
    ]


@dataclass
class Stats:
    """What every socket's reader adds to, on the one event loop (no locks needed)."""

    ack_latency: list[float] = field(default_factory=list)
    acks_published: int = 0
    acks_queued: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    out_latency: list[float] = field(default_factory=list)
    out_received: int = 0
    out_expected: int = 0
    out_last: float = 0.0
    out_done: asyncio.Event = field(default_factory=asyncio.Event)
    out_progress: asyncio.Event = field(default_factory=asyncio.Event)
    unexpected: list[str] = field(default_factory=list)


class Client:
    """One socket: a reader task that turns acks into window slots and times out-frames."""

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, connection_id: str, stats: Stats, window: int
    ) -> None:
        self.ws = ws
        self.connection_id = connection_id
        self.stats = stats
        self.window = asyncio.Semaphore(window)
        self.sent_at: dict[int, float] = {}
        self.answered = 0
        self.expected = 0
        self.all_answered = asyncio.Event()
        self.closing = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        stats = self.stats
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                stats.unexpected.append(f"{self.connection_id}: {msg.type!r}")
                continue
            now = time.perf_counter()
            frame = orjson.loads(msg.data)
            kind = frame.get("type")
            if kind == "bench":
                stats.out_latency.append(now - frame["t"])
                stats.out_received += 1
                stats.out_last = now
                stats.out_progress.set()
                if stats.out_received >= stats.out_expected:
                    stats.out_done.set()
            elif kind == "ack" or kind == "error":
                started = self.sent_at.pop(frame.get("id"), None)
                if started is None:
                    stats.unexpected.append(f"{self.connection_id}: unmatched {frame!r}")
                    continue
                if kind == "ack":
                    stats.ack_latency.append(now - started)
                    if frame.get("status") == "published":
                        stats.acks_published += 1
                    else:
                        stats.acks_queued += 1
                else:
                    stats.errors.append(frame)
                self.window.release()
                self.answered += 1
                if self.answered >= self.expected:
                    self.all_answered.set()
            elif kind == "ping":
                await self.ws.send_str('{"type":"pong"}')
            else:
                stats.unexpected.append(f"{self.connection_id}: {frame!r}")
        if not self.closing:
            # The server closed it (1013 too slow, 1011...): a failure, and nothing to wait for.
            stats.unexpected.append(
                f"{self.connection_id}: closed by the server, {self.ws.close_code}"
            )
            self.all_answered.set()

    async def send_messages(self, count: int) -> None:
        self.expected = count
        for n in range(count):
            await self.window.acquire()
            text = orjson.dumps(
                {"id": n, "payload": {"message": PAYLOAD_TEXT, "conversation_id": "bench"}}
            )
            self.sent_at[n] = time.perf_counter()
            await self.ws.send_str(text.decode())
        await self.all_answered.wait()

    async def close(self) -> None:
        self.closing = True
        await self.ws.close()
        self.reader.cancel()
        with suppress(asyncio.CancelledError):
            await self.reader


# ---- processes ------------------------------------------------------------------------------


def start_traffic_cop(redis_url: str) -> ServiceProcess:
    service = ServiceProcess(
        "services.traffic_cop_stub",
        {"REDIS_URL": redis_url, "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY},
    )
    service.env["TRAFFIC_COP_PORT"] = str(service.port)
    return service.start()


#: The gateway settings every benchmark uses, on top of the defaults.
GATEWAY_BENCH_SETTINGS = {
    # The limiter is per socket; the benchmark measures the gateway, not its limiter.
    "GATEWAY_RATE_LIMIT_PER_SECOND": "1000000",
    "GATEWAY_RATE_LIMIT_BURST": "1000000",
    # A connect burst queues Traffic Cop calls behind each other on a shared core.
    "GATEWAY_TRAFFIC_COP_TIMEOUT_SECONDS": "10",
    "GATEWAY_SHUTDOWN_TIMEOUT": "10",
    # The raw responders read the tap and no consumer group reads the stream, so nothing is
    # acked and nothing trimmed: a bound this high keeps a long run from being refused.
    "GATEWAY_STREAM_MAX_PENDING": "100000000",
    # Every load client connects from 127.0.0.1: the per-address budget of unauthenticated
    # upgrades (50 at once by default, docs/operations.md "Security") would refuse its bursts.
    "GATEWAY_UNAUTH_BURST": "1000000",
    "GATEWAY_UNAUTH_RATE_PER_SECOND": "1000000",
}


def start_gateway(
    redis_url: str, traffic_cop_url: str, index: int, extra: Mapping[str, str] | None = None
) -> ServiceProcess:
    """A gateway with :data:`GATEWAY_BENCH_SETTINGS` and ``extra`` on top."""
    service = ServiceProcess(
        "services.gateway",
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": traffic_cop_url,
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            **GATEWAY_BENCH_SETTINGS,
            **(extra or {}),
        },
    )
    service.env["GATEWAY_PORT"] = str(service.port)
    service.env["GATEWAY_INSTANCE_ID"] = f"gw-bench-{index}-{service.port}"
    return service.start()


@contextmanager
def measuring(watches: dict[str, ProcWatch], into: dict[str, Any], phase: str) -> Iterator[None]:
    """CPU % over the block and RSS at its end, for every watched process, under ``phase``."""
    with ExitStack() as stack:
        parts: dict[str, dict[str, Any]] = {}
        for who, watch in watches.items():
            parts[who] = {}
            stack.enter_context(watch.measure(parts[who], phase))
        yield
    for who, values in parts.items():
        for key, value in values.items():
            if who == "loadgen" and key.endswith("_rss_mb"):
                continue
            if who in ("traffic_cop", "redis") and key.endswith("_rss_mb"):
                continue
            into[f"{who}_{key}"] = value


async def create_sessions(
    http: aiohttp.ClientSession, traffic_cop_url: str, users: list[str]
) -> list[str]:
    limit = asyncio.Semaphore(SESSION_CONCURRENCY)
    headers = {"Authorization": f"Bearer {TRAFFIC_COP_KEY}"}

    async def one(user: str) -> str:
        async with (
            limit,
            http.post(
                traffic_cop_url + "/v1/sessions", json={"user_id": user}, headers=headers
            ) as r,
        ):
            if r.status != 201:
                raise RuntimeError(f"Traffic Cop refused a session: {r.status} {await r.text()}")
            return str((await r.json())["session_token"])

    return list(await asyncio.gather(*(one(u) for u in users)))


# ---- one scenario ---------------------------------------------------------------------------


async def run_scenario(
    sc: Scenario,
    server: RedisServer,
    traffic_cop: ServiceProcess,
    redis: Redis,
    http: aiohttp.ClientSession,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "scenario": sc.name,
        "gateways": sc.gateways,
        "connections": sc.connections,
        "messages_per_connection": sc.messages,
        "out_frames_per_connection": sc.out_frames,
        "window": sc.window,
    }
    failures: list[str] = []
    gateways: list[ServiceProcess] = []
    clients: list[Client] = []
    stats = Stats()
    try:
        for i in range(sc.gateways):
            gateways.append(start_gateway(server.url, traffic_cop.url, i))
        if server.proc is None or traffic_cop.proc is None:
            raise RuntimeError("redis-server or Traffic Cop is not running")
        watches = {
            f"gw{i}": ProcWatch(g.proc.pid) for i, g in enumerate(gateways) if g.proc is not None
        }
        watches["loadgen"] = ProcWatch(os.getpid())
        watches["traffic_cop"] = ProcWatch(traffic_cop.proc.pid)
        watches["redis"] = ProcWatch(server.proc.pid)
        row["gateway_idle_rss_mb"] = [
            round(w.sample().rss_mb, 1) for k, w in watches.items() if k.startswith("gw")
        ]

        run_id = f"{sc.name}-{int(time.time())}"
        tokens = await create_sessions(
            http, traffic_cop.url, [f"bench-{run_id}-{i}" for i in range(sc.connections)]
        )

        # -- connect --
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
        connect_latency: list[float] = []

        async def connect(i: int, token: str) -> Client:
            gateway = gateways[i % len(gateways)]
            url = gateway.url.replace("http://", "ws://") + "/ws?session_token=" + token
            async with limit:
                t0 = time.perf_counter()
                ws = await http.ws_connect(url, autoping=True, heartbeat=None)
                msg = await ws.receive(timeout=PHASE_TIMEOUT)
                connect_latency.append(time.perf_counter() - t0)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                await ws.close()
                raise RuntimeError(f"no welcome: {msg!r}")
            welcome = orjson.loads(msg.data)
            if welcome.get("type") != "welcome":
                await ws.close()
                raise RuntimeError(f"expected welcome, got {welcome!r}")
            return Client(ws, welcome["connection_id"], stats, sc.window)

        with measuring(watches, row, "connect"):
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(connect(i, t) for i, t in enumerate(tokens)), return_exceptions=True
            )
            connect_seconds = time.perf_counter() - t0
        clients = [r for r in results if isinstance(r, Client)]
        refused = [r for r in results if not isinstance(r, Client)]
        row["connect_seconds"] = round(connect_seconds, 3)
        row["connects_per_second"] = round(len(clients) / connect_seconds, 1)
        row["connect_latency"] = latency_summary(connect_latency)
        row["gateway_connected_rss_mb"] = [
            round(w.sample().rss_mb, 1) for k, w in watches.items() if k.startswith("gw")
        ]
        if refused:
            # The other phases would measure a different load; the row says what failed.
            raise RuntimeError(f"{len(refused)} of {len(tokens)} connects failed: {refused[0]!r}")

        # -- in: client to agent --
        total = len(clients) * sc.messages
        agent = CountingSubscriber(server.url, names.agent_channel("guide"))
        try:
            with measuring(watches, row, "in"):
                t0 = time.perf_counter()
                await asyncio.wait_for(
                    asyncio.gather(*(c.send_messages(sc.messages) for c in clients)), PHASE_TIMEOUT
                )
                in_seconds = time.perf_counter() - t0
        finally:
            observed = agent.stop()
        acked = stats.acks_published + stats.acks_queued
        row["in_messages"] = total
        row["in_seconds"] = round(in_seconds, 3)
        row["acked_per_second"] = round(acked / in_seconds)
        row["ack_latency"] = latency_summary(stats.ack_latency)
        row["acks_published"] = stats.acks_published
        row["acks_queued"] = stats.acks_queued
        row["error_frames"] = len(stats.errors)
        row["agent_observed"] = int(observed["count"])
        if observed["count"] and observed["last"] > observed["first"]:
            row["agent_observed_per_second"] = round(
                observed["count"] / (observed["last"] - observed["first"])
            )
        if acked != total:
            failures.append(f"{total - acked} of {total} messages not acked")
        if stats.errors:
            failures.append(f"{len(stats.errors)} error frames, first: {stats.errors[0]!r}")
        if stats.acks_queued:
            failures.append(f"{stats.acks_queued} acks 'queued' although an agent listened")
        if observed["count"] != stats.acks_published:
            failures.append(
                f"agent observed {observed['count']} messages, "
                f"{stats.acks_published} were acked published"
            )

        # -- out: agent to client --
        stats.out_expected = len(clients) * sc.out_frames
        channels = [names.connection_messages(c.connection_id) for c in clients]
        receivers = 0
        with measuring(watches, row, "out"):
            t0 = time.perf_counter()
            if sc.lockstep:
                receivers = await publish_lockstep(redis, channels, sc.out_frames, stats)
            else:
                receivers = await publish_pipelined(redis, channels, sc.out_frames)
            published_seconds = time.perf_counter() - t0
            try:
                await asyncio.wait_for(stats.out_done.wait(), PHASE_TIMEOUT)
            except TimeoutError:
                failures.append(
                    f"out: {stats.out_received} of {stats.out_expected} frames arrived in time"
                )
            out_seconds = max(stats.out_last - t0, 1e-9)
        row["out_frames"] = stats.out_expected
        row["out_publish_seconds"] = round(published_seconds, 3)
        row["out_seconds"] = round(out_seconds, 3)
        row["out_delivered"] = stats.out_received
        row["delivered_per_second"] = round(stats.out_received / out_seconds)
        row["out_latency"] = latency_summary(stats.out_latency)
        if receivers != stats.out_expected:
            failures.append(
                f"out: PUBLISH reached {receivers} subscribers for {stats.out_expected} frames"
            )
    except Exception as exc:
        # Whatever went wrong is reported in the row (and the exit code), not as a crash.
        failures.append(f"{sc.name} stopped: {exc!r}")
    finally:
        t0 = time.perf_counter()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        row["close_seconds"] = round(time.perf_counter() - t0, 3)
        for gateway in gateways:
            code = gateway.stop()
            if code != 0:
                failures.append(f"{gateway.env['GATEWAY_INSTANCE_ID']} exited with {code}")
    if stats.unexpected:
        failures.append(
            f"{len(stats.unexpected)} unexpected frames or closes: {stats.unexpected[0]}"
        )
    row["failures"] = failures
    row["ok"] = not failures
    return row


async def publish_pipelined(redis: Redis, channels: list[str], rounds: int) -> int:
    """``rounds`` frames to every channel, ``OUT_PIPELINE`` per round trip; receivers reached."""
    receivers = seq = 0
    pending: list[str] = []
    for _ in range(rounds):
        for channel in channels:
            pending.append(channel)
            if len(pending) >= OUT_PIPELINE:
                receivers += await publish_batch(redis, pending, seq)
                seq += len(pending)
                pending = []
    if pending:
        receivers += await publish_batch(redis, pending, seq)
    return receivers


async def publish_lockstep(redis: Redis, channels: list[str], rounds: int, stats: Stats) -> int:
    """One frame at a time, each published once the previous one arrived: unloaded latency."""
    receivers = seq = 0
    for _ in range(rounds):
        for channel in channels:
            stats.out_progress.clear()
            receivers += await publish_batch(redis, [channel], seq)
            seq += 1
            while stats.out_received < seq:
                await asyncio.wait_for(stats.out_progress.wait(), PHASE_TIMEOUT)
                stats.out_progress.clear()
    return receivers


async def publish_batch(redis: Redis, channels: list[str], first_seq: int) -> int:
    """One pipeline of PUBLISH commands; the number of subscribers they reached."""
    async with redis.pipeline(transaction=False) as pipe:
        t = time.perf_counter()
        for i, channel in enumerate(channels):
            pipe.publish(channel, orjson.dumps({"type": "bench", "seq": first_seq + i, "t": t}))
        results = await pipe.execute()
    return sum(int(r) for r in results)


# ---- the run --------------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    # Each socket costs a descriptor here and one in a gateway (children inherit the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _summary(rows: list[dict[str, Any]], note: str) -> list[str]:
    lines = [f"gateway throughput (loopback, load generator on the same cores){note}:"]
    for r in rows:
        if "acked_per_second" not in r:
            lines.append(f"  {r['scenario']:<10} incomplete: {'; '.join(r.get('failures', []))}")
            continue
        gw_cpu = "+".join(str(r.get(f"gw{i}_in_cpu_percent", "?")) for i in range(r["gateways"]))
        gw_rss = "+".join(str(v) for v in r.get("gateway_connected_rss_mb", []))
        lines.append(
            f"  {r['scenario']:<10} w{r['window']} connect {r['connects_per_second']:>7,.0f}/s "
            f"(p99 {r['connect_latency']['p99_ms']:.0f} ms)  "
            f"in {r['acked_per_second']:>7,} acked/s (p50 {r['ack_latency']['p50_ms']:.1f} / "
            f"p99 {r['ack_latency']['p99_ms']:.1f} ms, gw cpu {gw_cpu}%)  "
            f"out {r.get('delivered_per_second', 0):>7,} frames/s "
            f"(p50 {r['out_latency']['p50_ms']:.1f} / "
            f"p99 {r['out_latency']['p99_ms']:.1f} ms)  gw rss {gw_rss} MB  "
            f"{'ok' if r['ok'] else 'FAILED: ' + '; '.join(r['failures'])}"
        )
    return lines


async def _main() -> int:
    _raise_fd_limit()
    plan = scenarios()
    rows: list[dict[str, Any]] = []
    note = ""
    server = RedisServer().start()
    traffic_cop: ServiceProcess | None = None
    redis = make_redis(server.url, max_connections=8)
    try:
        traffic_cop = start_traffic_cop(server.url)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            try:
                async with asyncio.timeout(DEADLINE_SECONDS):
                    for sc in plan:
                        print(f"-- {sc.name}", flush=True)
                        rows.append(await run_scenario(sc, server, traffic_cop, redis, http))
            except TimeoutError:
                note = (
                    f" [DEADLINE {DEADLINE_SECONDS:.0f}s HIT: {len(rows)} of {len(plan)} scenarios]"
                )
    finally:
        await redis.aclose()
        if traffic_cop is not None:
            traffic_cop.stop()
        server.cleanup()
    write_result(
        "gateway_throughput",
        {
            "default_window": WINDOW,
            "connect_concurrency": CONNECT_CONCURRENCY,
            "out_pipeline": OUT_PIPELINE,
            "payload_text_bytes": len(PAYLOAD_TEXT),
            "scenarios": [sc.__dict__ for sc in plan],
            "deadline_seconds": DEADLINE_SECONDS,
        },
        rows,
        _summary(rows, note),
    )
    return 0 if rows and len(rows) == len(plan) and all(r["ok"] for r in rows) else 1


def main() -> None:
    code = uvloop.run(_main())
    sys.exit(code)


if __name__ == "__main__":
    main()
