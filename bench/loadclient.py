"""The load client, in a process of its own: ``python -m bench.loadclient CONFIG.json``.

picows (a WebSocket client in Cython) on uvloop, so that reading and writing frames costs the
client far less than it costs the servers measured; its own CPU share over the measured window
is in every result (``client_cpu_percent``), and :mod:`bench.roundtrip` flags a run where it
passed :data:`CPU_FLAG_PERCENT` of a core, since the client may then be what limited it.

It speaks three dialects over the same sockets and messages (a 100-character chat message in
the Post Office envelope, ``{"channel": "guide", "payload": {"message": ...}, "id": n}``):

* ``po``: Post Office's ``/ws`` (:doc:`docs/protocol.md`): ready at ``welcome``, answers app
  pings with pongs, counts ``ack`` and ``error`` frames; a ``response`` frame whose ``id`` is a
  message's answers it;
* ``floor``: :mod:`bench.floor`, ready once open; the answer is the same ``response`` frame;
* ``sio``: Socket.IO over Engine.IO 4 on a WebSocket (``/socket.io/?EIO=4&transport=websocket``):
  answers the open packet with a namespace connect (``40``), ready at its ``40`` answer,
  answers Engine.IO pings (``2``) with pongs (``3``), sends ``42["msg", envelope]`` and takes
  ``42["reply", frame]`` as the answer.

Modes (``mode`` in the config):

* ``closed``: every socket keeps ``in_flight`` messages unanswered; each answer sends the next;
* ``open``: ``rate`` messages a second in all, round-robin over the sockets, on a fixed
  schedule; latency counts from the scheduled send time, so a client or server that falls
  behind shows in it (no coordinated omission);
* ``idle``: connect, report, hold the sockets (answering pings) until told to stop;
* ``http``: connect (``po``), then ``workers`` tasks call ``POST /v1/connections/{id}/messages``
  on the API in a loop for the window; every 202 must be delivered to its socket.

Protocol with the parent, one line each way: the client prints ``connected <json>`` and waits
for a line on stdin (``go``, or ``stop`` to end at once); then ``measuring`` and ``done`` bound
the measured window (after ``warmup`` seconds, for ``seconds``); answers still outstanding may
arrive for ``drain`` seconds; finally ``result <json>``. Idle mode prints ``connected`` and
waits for ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import resource
import sys
import time
from array import array
from typing import Any

import aiohttp
import orjson
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

__all__ = ["CPU_FLAG_PERCENT", "main"]

#: A run in which the client used more than this share of one core is flagged: past it, the
#: client may be part of what limited the figure.
CPU_FLAG_PERCENT = 50.0
#: Latencies kept for percentiles; beyond it every k-th is kept (p99.9 needs about 10,000).
MAX_SAMPLES = 400_000


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max in milliseconds (nearest rank), None without samples."""
    values = sorted(seconds)
    out: dict[str, float | None] = {}
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100)):
        if not values:
            out[f"{name}_ms"] = None
            continue
        rank = max(1, -(-len(values) * p // 100))
        out[f"{name}_ms"] = round(values[min(int(rank), len(values)) - 1] * 1000, 3)
    return out


class Socket(WSListener):  # type: ignore[misc]  # picows ships Cython classes
    def __init__(self, client: Client, index: int) -> None:
        self.client = client
        self.index = index
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.connection_id = ""
        self.closed_by_server = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.client.dialect == "floor":
            self.ready.set_result("")

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            self.client.on_text(self, frame.get_payload_as_bytes())
        elif kind is WSMsgType.CLOSE:
            self.closed_by_server = True
            reason = f"close {frame.get_close_code()!r} {frame.get_close_reason()!r}"
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(reason))
            elif not self.client.closing:
                self.client.note_error(f"socket {self.index}: {reason}")
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before ready"))
        elif not self.client.closing and not self.closed_by_server:
            self.client.note_error(f"socket {self.index}: disconnected")

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.send(WSMsgType.TEXT, data)


class Client:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.dialect: str = config["dialect"]
        self.mode: str = config["mode"]
        self.sockets: list[Socket] = []
        self.ids = itertools.count(1)
        text = ("x" * int(config.get("payload_bytes", 100))).encode()
        self.head = b'{"channel":"guide","payload":{"message":"' + text + b'"},"id":'
        #: id -> (scheduled send time, inside the measured window)
        self.sent_at: dict[int, tuple[float, bool]] = {}
        self.in_window = False
        self.latencies: list[float] = []
        self.keep_every = 1
        self.seen = 0
        self.replies = self.window_replies = self.acks = self.errors = 0
        #: answers that arrived inside the window, whenever their message was sent
        self.window_received = 0
        self.window_sent = 0
        self.deliveries = 0
        #: set once the HTTP load ends: deliveries the API accepted, which must all arrive
        self.deliveries_expected = 1 << 62
        self.delivered = asyncio.Event()
        self.unmatched = 0
        self.first_errors: list[str] = []
        #: error frames by code (``unavailable`` is the gateway shedding load)
        self.error_codes: dict[str, int] = {}
        self.closing = False
        self.running = False
        self.max_lag = 0.0
        self.drained = asyncio.Event()

    # -- frames --------------------------------------------------------------------------

    def note_error(self, what: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(what)

    def message(self, socket: Socket, scheduled: float) -> None:
        n = next(self.ids)
        self.sent_at[n] = (scheduled, self.in_window)
        if self.in_window:
            self.window_sent += 1
        body = self.head + str(n).encode() + b"}"
        socket.send(b'42["msg",' + body + b"]" if self.dialect == "sio" else body)

    def on_text(self, socket: Socket, data: bytes) -> None:
        if self.dialect == "sio":
            self._on_sio(socket, data)
            return
        frame = orjson.loads(data)
        kind = frame.get("type")
        if kind == "response":
            self.on_reply(socket, frame.get("id"))
        elif kind == "ack":
            self.acks += 1
        elif kind == "ping":
            socket.send(b'{"type":"pong"}')
        elif kind == "welcome":
            socket.connection_id = frame["connection_id"]
            if not socket.ready.done():
                socket.ready.set_result(socket.connection_id)
        elif kind == "error":
            code = str(frame.get("code"))
            self.error_codes[code] = self.error_codes.get(code, 0) + 1
            self.note_error(f"error frame {frame!r}")
            # A refused message is answered: it no longer waits for a reply.
            self.sent_at.pop(frame.get("id"), None)
            if not self.sent_at and not self.running:
                self.drained.set()
        elif kind == "delivery":
            self.deliveries += 1
            if self.deliveries >= self.deliveries_expected:
                self.delivered.set()
        else:
            self.unmatched += 1

    def _on_sio(self, socket: Socket, data: bytes) -> None:
        if data.startswith(b"42"):
            event, frame = orjson.loads(data[2:])[:2]
            if event == "reply":
                self.on_reply(socket, frame.get("id"))
            else:
                self.unmatched += 1
        elif data == b"2":
            socket.send(b"3")
        elif data.startswith(b"40"):
            if not socket.ready.done():
                socket.connection_id = orjson.loads(data[2:]).get("sid", "")
                socket.ready.set_result(socket.connection_id)
        elif data.startswith(b"0"):
            socket.send(b"40")
        elif data.startswith(b"44"):
            self.note_error(f"socket.io connect error {data[:200]!r}")
        else:
            self.unmatched += 1

    def on_reply(self, socket: Socket, n: Any) -> None:
        entry = self.sent_at.pop(n, None) if isinstance(n, int) else None
        if entry is None:
            self.unmatched += 1
            return
        now = time.perf_counter()
        self.replies += 1
        self.window_received += self.in_window
        scheduled, measured = entry
        if (self.mode == "open" and measured) or (self.mode == "closed" and self.in_window):
            self.window_replies += 1
            self.seen += 1
            if self.seen % self.keep_every == 0:
                self.latencies.append(now - scheduled)
                if len(self.latencies) >= MAX_SAMPLES:
                    self.latencies = self.latencies[::2]
                    self.keep_every *= 2
        if self.mode == "closed" and self.running:
            self.message(socket, now)
        if not self.sent_at and not self.running:
            self.drained.set()

    # -- phases --------------------------------------------------------------------------

    async def connect(self) -> dict[str, Any]:
        urls: list[str] = self.config["urls"]
        limit = asyncio.Semaphore(int(self.config.get("connect_concurrency", 100)))
        failures: list[str] = []
        latencies: list[float] = []

        async def one(index: int, url: str) -> Socket | None:
            async with limit:
                t0 = time.perf_counter()
                socket: Socket | None = None

                def factory() -> Socket:
                    nonlocal socket
                    socket = Socket(self, index)
                    return socket

                try:
                    await ws_connect(factory, url, websocket_handshake_timeout=30)
                    if socket is None:
                        raise RuntimeError("picows connected without calling the factory")
                    await asyncio.wait_for(socket.ready, 30)
                except Exception as exc:
                    failures.append(repr(exc))
                    if socket is not None and socket.transport is not None:
                        socket.transport.disconnect()
                    return None
                latencies.append(time.perf_counter() - t0)
                return socket

        t0 = time.perf_counter()
        cpu0 = cpu_seconds()
        results = await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
        elapsed = time.perf_counter() - t0
        self.sockets = [s for s in results if s is not None]
        return {
            "sockets": len(self.sockets),
            "failed": len(failures),
            "first_failures": sorted(set(failures))[:3],
            "connect_seconds": round(elapsed, 3),
            "connects_per_second": round(len(self.sockets) / elapsed, 1) if elapsed else None,
            "connect_latency": percentiles(latencies),
            "client_cpu_percent": round(100 * (cpu_seconds() - cpu0) / max(elapsed, 1e-9), 1),
        }

    async def window(self, load: Any) -> dict[str, Any]:
        """Run ``load`` through warm-up, the measured window and the drain."""
        warmup = float(self.config.get("warmup", 1.0))
        seconds = float(self.config["seconds"])
        self.running = True
        task = asyncio.create_task(load())
        await asyncio.sleep(warmup)
        self.in_window = True
        print("measuring", flush=True)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, t1 = cpu_seconds(), time.perf_counter()
        self.in_window = False
        print("done", flush=True)
        self.running = False
        await task
        if self.sent_at:
            self.drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), float(self.config.get("drain", 5)))
        elapsed = t1 - t0
        return {
            "window_seconds": round(elapsed, 3),
            "client_cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1),
        }

    async def closed_loop(self) -> None:
        now = time.perf_counter()
        for _ in range(int(self.config["in_flight"])):
            for socket in self.sockets:
                self.message(socket, now)

    async def open_loop(self) -> None:
        rate = float(self.config["rate"])
        total = float(self.config.get("warmup", 1.0)) + float(self.config["seconds"])
        sockets = self.sockets
        t0 = time.perf_counter()
        k = 0
        while self.running:
            now = time.perf_counter()
            due = min(int((now - t0) * rate), int(total * rate))
            while k < due:
                scheduled = t0 + k / rate
                self.max_lag = max(self.max_lag, now - scheduled)
                self.message(sockets[k % len(sockets)], scheduled)
                k += 1
            await asyncio.sleep(0.001)

    async def http_load(self, stats: dict[str, Any]) -> None:
        api = self.config["api_url"].rstrip("/")
        headers = {"Authorization": f"Bearer {self.config['realm_key']}"}
        body = orjson.dumps({"message": {"type": "delivery", "text": "x" * 100}})
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

            async def worker(w: int) -> None:
                targets = itertools.cycle(self.sockets[w % len(self.sockets) :] + self.sockets)
                for socket in targets:
                    if not self.running:
                        return
                    t = time.perf_counter()
                    url = f"{api}/v1/connections/{socket.connection_id}/messages"
                    async with http.post(url, data=body) as r:
                        await r.read()
                        key = str(r.status)
                    if self.in_window:
                        statuses[key] = statuses.get(key, 0) + 1
                        latencies.append(time.perf_counter() - t)
                    stats["sent_ok"] += key == "202"

            await asyncio.gather(*(worker(w) for w in range(int(self.config["workers"]))))
        stats["window_statuses"] = statuses
        stats["latency"] = percentiles(latencies)
        stats["samples"] = latencies


async def run(config: dict[str, Any]) -> int:
    client = Client(config)
    connected = await client.connect()
    print("connected " + orjson.dumps(connected).decode(), flush=True)
    command = (await asyncio.to_thread(sys.stdin.readline)).strip()
    result: dict[str, Any] = {"connect": connected}
    if command == "go" and client.sockets:
        if client.mode == "closed":
            result.update(await client.window(client.closed_loop))
        elif client.mode == "open":
            result.update(await client.window(client.open_loop))
            result["max_schedule_lag_ms"] = round(client.max_lag * 1000, 3)
        elif client.mode == "http":
            stats: dict[str, Any] = {"sent_ok": 0}
            result.update(await client.window(lambda: client.http_load(stats)))
            # Deliveries still on their way when the window closed.
            client.deliveries_expected = stats["sent_ok"]
            if client.deliveries < client.deliveries_expected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.delivered.wait(), float(config.get("drain", 5)))
            ok = stats["window_statuses"].get("202", 0)
            save_samples(config, stats.pop("samples"))
            result.update(stats)
            result["requests_per_second"] = round(ok / result["window_seconds"], 1)
            result["delivered"] = client.deliveries
        if client.mode in ("closed", "open"):
            seconds = result["window_seconds"]
            result["replies_per_second"] = round(client.window_replies / seconds, 1)
            result["received_per_second"] = round(client.window_received / seconds, 1)
            result["sent_in_window"] = client.window_sent
            result["latency"] = percentiles(client.latencies)
            save_samples(config, client.latencies)
            result["unanswered"] = len(client.sent_at)
    client.closing = True
    result.update(
        {
            "replies": client.replies,
            "acks": client.acks,
            "errors": client.errors,
            "first_errors": client.first_errors,
            "error_codes": client.error_codes,
            "unmatched": client.unmatched,
        }
    )
    await close_all(client.sockets)
    print("result " + orjson.dumps(result).decode(), flush=True)
    return 0


def save_samples(config: dict[str, Any], seconds: list[float]) -> None:
    """The window's latencies to ``samples_path``, when given: the parent merges several
    clients' samples into one set of percentiles."""
    if config.get("samples_path"):
        with open(config["samples_path"], "wb") as f:
            array("d", seconds).tofile(f)


async def close_all(sockets: list[Socket]) -> None:
    async def one(socket: Socket) -> None:
        transport = socket.transport
        if transport is None or transport.is_disconnected:
            return
        transport.send_close(WSCloseCode.OK)
        try:
            await asyncio.wait_for(transport.wait_disconnected(), 5)
        except TimeoutError:
            transport.disconnect(graceful=False)

    await asyncio.gather(*(one(s) for s in sockets), return_exceptions=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.loadclient CONFIG.json", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        config = orjson.loads(f.read())
    return uvloop.run(run(config))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
