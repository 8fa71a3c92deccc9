"""Test harness: real redis-server and real service processes, deadlines instead of sleeps.

Every timeout is a multiple of one unit scaled by ``PO_TEST_TIMEOUT_SCALE`` (CI sets 3), so a
loaded 2-core machine makes the suite slower, not flaky.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("PO_TEST_TIMEOUT_SCALE", "1"))

T = TypeVar("T")


def timeout(seconds: float) -> float:
    """``seconds`` scaled by PO_TEST_TIMEOUT_SCALE."""
    return seconds * SCALE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    seconds: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...
@overload
async def wait_for(
    predicate: Callable[[], T], seconds: float = ..., interval: float = ..., what: str = ...
) -> T: ...
async def wait_for(
    predicate: Callable[[], Any], seconds: float = 5.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; fail after
    ``timeout(seconds)``, showing the last value seen."""
    deadline = time.monotonic() + timeout(seconds)
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"condition not met within {timeout(seconds):.1f}s: "
                f"{what or predicate!r} (last {result!r})"
            )
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], T], seconds: float = 5.0, interval: float = 0.02, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout(seconds)
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"condition not met within {timeout(seconds):.1f}s: {what or predicate!r}"
            )
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a free port in a temporary directory; ``aof``: with an
    append-only file (``appendfsync everysec``, or ``fsync`` as given) in that directory, so a
    restart (``stop`` then ``start``) comes back with its data, else it comes back empty."""

    def __init__(self, aof: bool = False, fsync: str = "everysec", *extra: str) -> None:
        self.aof = aof
        self.fsync = fsync
        self.extra = list(extra)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="po-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: run `make install` (it installs it)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.aof else "no",
                "--appendfsync",
                self.fsync,
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_sync(self._answers, 10, what=f"redis-server on {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ServiceProcess:
    """A real ``python -m services.<name>`` (or any module) on a free port.

    ``start()`` waits for ``/ready`` with a deadline; ``stop()`` sends SIGTERM and returns the
    exit code. The process's stderr (JSON log lines) goes to a file, shown when start fails.
    """

    def __init__(
        self,
        module: str,
        env: Mapping[str, str],
        port: int | None = None,
        ready_path: str = "/ready",
    ) -> None:
        self.module = module
        self.port = port or free_port()
        self.env = dict(env)
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(
            tempfile.mkstemp(prefix=f"po-{module.rsplit('.', 1)[-1]}-", suffix=".log")[1]
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServiceProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait_ready:
            try:
                wait_for_sync(
                    self._ready, 20, interval=0.05, what=f"{self.module} {self.ready_path}"
                )
            except AssertionError:
                self.stop()
                raise AssertionError(
                    f"{self.module} never became ready; its log:\n{self.log()[-4000:]}"
                ) from None
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.module} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, wait: float = 15) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout(wait))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
            self.proc = None
            with contextlib.suppress(Exception):
                self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        self.stop(signal.SIGKILL)


TRAFFIC_COP_KEY = "dev-traffic_cop"
#: The least a production configuration needs beyond its keys (ENVIRONMENT=production refuses
#: a Redis URL without a password, and on the gateway ALLOWED_ORIGINS unset or "*").
PRODUCTION_ENV = {
    "ENVIRONMENT": "production",
    "REDIS_URL": "redis://:test-password@127.0.0.1:6379/0",
    "ALLOWED_ORIGINS": "https://app.example.com",
}


def create_session(traffic_cop_url: str, user_id: str, ttl_seconds: int | None = None) -> str:
    """A fresh session token from a real Traffic Cop (``POST /v1/sessions``)."""
    import json

    body: dict[str, Any] = {"user_id": user_id}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    request = urllib.request.Request(
        traffic_cop_url + "/v1/sessions",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {TRAFFIC_COP_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout(5)) as r:
        return str(json.loads(r.read())["session_token"])


async def stream_data(redis: Any, channel: str) -> list[bytes]:
    """The agent messages a channel's stream holds, oldest first (what was accepted and not
    trimmed: the durable counterpart of the tap)."""
    from shared import redis_names

    return [fields[b"data"] for _id, fields in await redis.xrange(redis_names.stream(channel))]


async def live_consumers(redis: Any, channel: str = "guide", since: float | None = None) -> int:
    """Group consumers of ``channel`` that said they are live (the API's group streams do at
    every step) since ``since`` (default: the last 10 s) — "an agent listens" on the stream."""
    from shared import redis_names

    cutoff = time.time() - 10 if since is None else since
    return int(await redis.zcount(redis_names.stream_consumers(channel), f"({cutoff}", "+inf"))
