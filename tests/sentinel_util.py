"""A real Redis Sentinel set on loopback: a primary, a replica and three sentinels (Debian's
``redis-sentinel``), each on a free port in one temporary directory."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import free_port, timeout, wait_for_sync

MASTER = "po-primary"
#: How long a sentinel waits before it calls the primary down; the failover follows.
DOWN_AFTER_MS = 1000


def _ask(port: int, *command: str) -> bytes:
    """One inline command over a plain socket (``b""`` when nothing answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(" ".join(command).encode() + b"\r\n")
            return s.recv(4096)
    except OSError:
        return b""


class SentinelSet:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="po-sentinel-"))
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _server(self, name: str, port: int, *extra: str) -> None:
        data = self.dir / name
        data.mkdir(exist_ok=True)
        exe = shutil.which("redis-server") or "redis-server"
        self._spawn(
            name,
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(data),
                *list(extra),
            ],
        )

    def start(self) -> SentinelSet:
        exe = shutil.which("redis-sentinel")
        if exe is None:
            raise RuntimeError("redis-sentinel is not installed: apt-get install redis-sentinel")
        self._server("primary", self.primary_port)
        self._server(
            "replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port)
        )
        for n, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel-{n}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self._spawn(f"sentinel-{n}", [exe, str(conf)])
        wait_for_sync(self._replica_in_sync, 20, what="the replica in sync")
        wait_for_sync(self._sentinels_agree, 20, what="three sentinels that see the replica")
        return self

    def _replica_in_sync(self) -> bool:
        return b"master_link_status:up" in _ask(self.replica_port, "INFO", "replication")

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            info = _ask(port, "SENTINEL", "MASTER", MASTER)
            if b"num-slaves" not in info or b"num-other-sentinels" not in info:
                return False
            fields = info.split(b"\r\n")
            slaves = fields[fields.index(b"num-slaves") + 2]
            others = fields[fields.index(b"num-other-sentinels") + 2]
            if slaves != b"1" or others != b"2":
                return False
        return True

    def primary_address(self) -> int | None:
        """The port the sentinels name as the primary now."""
        reply = _ask(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        parts = reply.split(b"\r\n")
        try:
            return int(parts[4])
        except (IndexError, ValueError):
            return None

    def kill_primary(self) -> None:
        proc = self.procs["primary"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout(10))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
