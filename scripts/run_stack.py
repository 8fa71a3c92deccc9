"""``make run``: the whole Post Office stack on this machine, stopped cleanly by Ctrl-C.

Starts, in order, each as a child ``python -m ...`` process with its log in
``.run/logs/<name>.log`` (rewritten at every start of the stack, appended to on a restart):

1. a private ``redis-server`` on a free port, persisting to an append-only file in
   ``.run/redis/`` (``appendfsync everysec``; the directory is emptied at every start of the
   stack, so a stack starts empty but a Redis that crashes while it runs comes back from its
   AOF with at most about a second of writes lost); skipped when ``REDIS_URL`` is given: that
   Redis is used and left alone;
2. Traffic Cop (8300), the Post Office API (8200), the eviction worker (8400), two gateways
   (8100 and 8101), each waited for on ``/ready`` with a deadline;
3. the demo guide agent replicas (``RUN_GUIDE_REPLICAS``, 2), each waited for until it
   consumes the ``guide`` channel's group.

Then it prints the URLs, the development realm keys, a fresh session token, the chat-page link
and a command to connect from a terminal, and watches the children, as a process manager: a
child that dies on its own is restarted (same port, same settings) after
``shared.backoff.backoff(<restarts in the window>, RUN_RESTART_BACKOFF_BASE_SECONDS,
RUN_RESTART_BACKOFF_CAP_SECONDS)`` seconds, and both the death and the restart are logged on stdout;
the other children keep serving meanwhile. Only a crash loop (a child dying more than
``RUN_RESTART_LIMIT`` times within ``RUN_RESTART_WINDOW`` seconds) stops the stack, naming the
child with its log tail, with a non-zero exit. A child that fails while the stack starts stops
it too (a bad setting would only loop).

Ctrl-C or SIGTERM stops the children in reverse order (SIGTERM, a bounded wait, then SIGKILL)
and exits 0 when every one stopped cleanly; a second Ctrl-C skips the waits and kills what is
left. Children run in their own process groups (a terminal's Ctrl-C reaches only this
supervisor, which stops them in order) and, on Linux, receive SIGTERM should the supervisor
itself be killed, so nothing outlives it.

One stack per ``RUN_DIR``: the supervisor holds an exclusive lock on ``RUN_DIR/stack.lock``
while it runs; a second ``make run`` on the same directory is refused before it touches
anything there (the running stack's ``stack.json``, logs and Redis files stay as they are).

Environment (besides what the services read themselves; see ``python -m services.<name>
--help``):

=============================  ==========================================================
``REDIS_URL``                  use this Redis instead of starting a private one
``RUN_GATEWAY_PORTS``          comma-separated gateway ports (default ``8100,8101``)
``RUN_API_PORT``               Post Office API port (default 8200)
``RUN_TRAFFIC_COP_PORT``       Traffic Cop port (default 8300)
``RUN_EVICTION_PORT``          eviction worker port (default 8400)
``RUN_DIR``                    where ``logs/``, ``redis/`` and ``stack.json`` go (default
                               ``.run``)
``RUN_READY_TIMEOUT``          seconds each process has to become ready (default 30)
``RUN_STOP_TIMEOUT``           seconds each process has to exit after SIGTERM (default 15;
                               above the services' 10 s ``shutdown_timeout``)
``RUN_RESTART_LIMIT``          restarts of one child allowed within the window (default 5)
``RUN_RESTART_WINDOW``         the crash-loop window in seconds (default 60)
``RUN_RESTART_BACKOFF_BASE_SECONDS``   first restart delay's ceiling in seconds (default 0.5)
``RUN_RESTART_BACKOFF_CAP_SECONDS``    longest restart delay in seconds (default 10)
=============================  ==========================================================

``stack.json`` in ``RUN_DIR`` records the supervisor's pid and every child's name, pid, port
and restart count while the stack runs (rewritten at each restart; tests and scripts read it);
it is removed on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit

from shared import redis_names as names
from shared.backoff import backoff

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TRAFFIC_COP_KEY = "dev-traffic_cop"
#: The development realm keys (the Post Office API's defaults; production refuses them).
REALM_KEYS = {
    "dev-smart_city": "smart_city",
    "dev-experience": "experience",
    "dev-business_enablement": "business_enablement",
}
DEMO_USER = "demo"
#: The channel and consumer group the guide agent replicas consume.
GUIDE_CHANNEL = "guide"
GUIDE_GROUP = "guide"
LOG_TAIL_LINES = 25


class StackError(Exception):
    """The stack could not start or a child died; the message says which and why."""


@dataclass
class Child:
    """One process the supervisor owns."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int | None = None  # None: no HTTP server (the agent)
    tier: int = 0  # stopped in descending tier order
    proc: subprocess.Popen[bytes] | None = None
    #: Its exit was already reported (it died on its own); stop() does not report it again.
    reported: bool = False
    log_file: IO[bytes] | None = field(default=None, repr=False)
    #: Restarts so far, and the monotonic times of its deaths within the crash-loop window.
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)
    #: Monotonic time of a pending restart (None: none pending).
    restart_at: float | None = None
    #: Restarted and not yet seen ready again.
    rejoining: bool = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _env_number(name: str, default: float, kind: type[float] | type[int], what: str) -> float:
    """``name`` from the environment parsed by ``kind``; ``default`` when unset. A float must
    be positive, an int 0 or more."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise StackError(f"{name}={raw!r}: expected {what}") from None
    if value < 0 or (kind is float and value == 0):
        raise StackError(f"{name}={raw!r}: must be {'positive' if kind is float else '0 or more'}")
    return value


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number of seconds")


def _env_int(name: str, default: int) -> int:
    return int(_env_number(name, default, int, "a whole number"))


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return _parse_port(name, raw) if raw.strip() else default


def _parse_port(name: str, raw: str) -> int:
    try:
        port = int(raw.strip())
    except ValueError:
        raise StackError(f"{name}={raw!r}: expected a port number") from None
    if not 1 <= port <= 65535:
        raise StackError(f"{name}={raw!r}: a port is between 1 and 65535")
    return port


def _gateway_ports() -> list[int]:
    raw = os.environ.get("RUN_GATEWAY_PORTS", "")
    if not raw.strip():
        return [8100, 8101]
    ports = [_parse_port("RUN_GATEWAY_PORTS", part) for part in raw.split(",") if part.strip()]
    if not ports:
        raise StackError("RUN_GATEWAY_PORTS is empty: give at least one port")
    return ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        # Without SO_REUSEADDR a port in TIME_WAIT would look busy although a server can bind it
        # (aiohttp sets SO_REUSEADDR too).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def module_exists(module: str) -> bool:
    """Whether ``python -m module`` can run: the package and its ``__main__`` exist."""
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except (ImportError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (Linux), so a supervisor
    killed with SIGKILL leaves nothing behind; the child still drains normally."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _resp(*args: str) -> bytes:
    """A Redis command in the wire protocol (RESP)."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(out)


def _redis_command(url: str, *args: str, timeout: float = 1.0) -> bytes | None:
    """One command over a plain socket: no client library needed to ask Redis a question."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or HOST, parts.port or 6379), timeout) as s:
            if parts.password:
                user = [parts.username] if parts.username else []
                s.sendall(_resp("AUTH", *user, parts.password))
                if not s.recv(64).startswith(b"+OK"):
                    return None
            s.sendall(_resp(*args))
            return s.recv(4096)
    except OSError:
        return None


class Stack:
    """Starts the children, watches them, stops them."""

    def __init__(self) -> None:
        self.run_dir = Path(os.environ.get("RUN_DIR") or ROOT / ".run").resolve()
        self.log_dir = self.run_dir / "logs"
        self.state_path = self.run_dir / "stack.json"
        self.lock_path = self.run_dir / "stack.lock"
        self._lock_file: IO[bytes] | None = None
        self.ready_timeout = _env_float("RUN_READY_TIMEOUT", 30.0)
        self.stop_timeout = _env_float("RUN_STOP_TIMEOUT", 15.0)
        self.restart_limit = _env_int("RUN_RESTART_LIMIT", 5)
        self.restart_window = _env_float("RUN_RESTART_WINDOW", 60.0)
        self.restart_base = _env_float("RUN_RESTART_BACKOFF_BASE_SECONDS", 0.5)
        self.restart_cap = _env_float("RUN_RESTART_BACKOFF_CAP_SECONDS", 10.0)
        self.traffic_cop_port = _env_port("RUN_TRAFFIC_COP_PORT", 8300)
        self.api_port = _env_port("RUN_API_PORT", 8200)
        self.eviction_port = _env_port("RUN_EVICTION_PORT", 8400)
        self.gateway_ports = _gateway_ports()
        self.guide_replicas = max(1, int(_env_float("RUN_GUIDE_REPLICAS", 2)))
        ports = [self.traffic_cop_port, self.api_port, self.eviction_port, *self.gateway_ports]
        if len(set(ports)) != len(ports):
            raise StackError(f"the RUN_*_PORT settings give one port twice: {ports}")
        self.redis_url = os.environ.get("REDIS_URL", "").strip()
        self.own_redis = not self.redis_url
        self.redis_dir: str | None = None
        self.children: list[Child] = []
        self.stop_signal: str | None = None
        # Set by the signal handlers; every wait polls it, so a Ctrl-C during start-up is
        # honoured as promptly as one while running.
        self._stop = threading.Event()
        # A second Ctrl-C while stopping: do not wait for the drains, SIGKILL what is left.
        self._force = threading.Event()

    # -- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            if self.stop_signal is None:
                self.stop_signal = signal.Signals(signum).name
            elif self._stop.is_set():
                self._force.set()
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGHUP, handler)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- start --------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take ``RUN_DIR``'s lock, or refuse without touching anything a running stack owns.

        An ``flock`` rather than a pid file: the kernel drops it when the supervisor dies, even
        by SIGKILL, so a stale lock can never block the next ``make run``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.lock_path, "ab")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            owner = "another supervisor"
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pid = json.loads(self.state_path.read_text())["supervisor_pid"]
                owner = f"supervisor pid {pid}"
            raise StackError(
                f"another `make run` ({owner}) is running with RUN_DIR={self.run_dir}; "
                "stop it first (Ctrl-C in its terminal), or give this one another RUN_DIR and "
                "other ports. Nothing of the running stack was touched."
            ) from None
        self._lock_file = lock_file

    @property
    def locked(self) -> bool:
        return self._lock_file is not None

    def plan(self) -> None:
        """Build the children to start, skipping modules that do not exist (yet)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        gateway_urls = ",".join(f"http://{HOST}:{p}" for p in self.gateway_ports)
        common = {
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "TRAFFIC_COP_URL": f"http://{HOST}:{self.traffic_cop_port}",
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            "POST_OFFICE_URL": f"http://{HOST}:{self.api_port}",
            "GATEWAY_URLS": gateway_urls,
            "PUBLIC_WS_URL": f"ws://{HOST}:{self.gateway_ports[0]}/ws",
        }

        def add(name: str, module: str, port: int | None, tier: int, env: dict[str, str]) -> None:
            if not module_exists(module):
                # Every part of the stack exists; a module that cannot be found means the
                # script runs outside the repository's import path (python scripts/run_stack.py).
                raise SystemExit(
                    f"cannot find {module}: run `make run`, or `python -m scripts.run_stack` "
                    "from the repository root"
                )
            self.children.append(
                Child(
                    name=name,
                    argv=[sys.executable, "-m", module],
                    env={**common, **env},
                    log_path=self.log_dir / f"{name}.log",
                    port=port,
                    tier=tier,
                )
            )

        add(
            "traffic_cop",
            "services.traffic_cop_stub",
            self.traffic_cop_port,
            1,
            {"TRAFFIC_COP_PORT": str(self.traffic_cop_port)},
        )
        add(
            "post_office_api",
            "services.post_office_api",
            self.api_port,
            2,
            {"POST_OFFICE_PORT": str(self.api_port)},
        )
        add(
            "eviction_worker",
            "services.eviction_worker",
            self.eviction_port,
            2,
            {"EVICTION_PORT": str(self.eviction_port)},
        )
        for number, port in enumerate(self.gateway_ports, 1):
            add(
                f"gateway-{number}",
                "services.gateway",
                port,
                3,
                {"GATEWAY_PORT": str(port), "GATEWAY_INSTANCE_ID": f"gateway-{number}"},
            )
        # Replicas share the guide's consumer group: each message goes to one of them.
        for number in range(1, self.guide_replicas + 1):
            name = "guide_agent" if number == 1 else f"guide_agent-{number}"
            add(name, "agents.guide", None, 4, {"GUIDE_AGENT_CONSUMER": f"guide-{number}"})

    def check_ports(self) -> None:
        busy = [f"{c.port} ({c.name})" for c in self.children if c.port and port_in_use(c.port)]
        if busy:
            raise StackError(
                f"port(s) already in use: {', '.join(busy)}. Another `make run`? Stop it, or "
                "choose others with RUN_GATEWAY_PORTS, RUN_API_PORT, RUN_TRAFFIC_COP_PORT, "
                "RUN_EVICTION_PORT"
            )

    def start_redis(self) -> None:
        if not self.own_redis:
            if _redis_command(self.redis_url, "PING") is None:
                raise StackError(
                    f"REDIS_URL is set but that Redis does not answer PING: {self._redis_shown()}"
                )
            return
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError(
                "redis-server is not installed: `make run` installs it (apt-get, as root)"
            )
        planned = {c.port for c in self.children}
        port = free_port()
        while port in planned:  # a planned port is free until its service binds it
            port = free_port()
        # A fresh stack starts empty: the previous run's data would name connections of
        # gateways that no longer exist. Within a run, the AOF brings a crashed Redis back.
        redis_dir = self.run_dir / "redis"
        shutil.rmtree(redis_dir, ignore_errors=True)
        redis_dir.mkdir(parents=True)
        self.redis_dir = str(redis_dir)
        self.redis_url = f"redis://{HOST}:{port}/0"
        redis = Child(
            name="redis",
            argv=[
                exe,
                "--port",
                str(port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                self.redis_dir,
                "--loglevel",
                "notice",
            ],
            env={},
            log_path=self.log_dir / "redis.log",
            port=port,
            tier=0,
        )
        # In the list before it is spawned, so the state file written at spawn names it too.
        self.children.insert(0, redis)
        self._spawn(redis)
        print(f"starting redis (pid {redis.pid}) on port {port} ...", flush=True)
        self._wait(redis, lambda: _redis_command(self.redis_url, "PING") == b"+PONG\r\n", "PING")

    def _redis_shown(self) -> str:
        parts = urlsplit(self.redis_url)
        if parts.password:  # never print a password
            return self.redis_url.replace(f":{parts.password}@", ":***@")
        return self.redis_url

    def _spawn(self, child: Child) -> None:
        # A restart appends: the log of the run that died is what explains the death.
        mode = "ab" if child.restarts else "wb"
        if child.log_file is not None:
            child.log_file.close()
        child.log_file = open(child.log_path, mode)  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **child.env}
        if child.name != "redis":
            env["REDIS_URL"] = self.redis_url
        child.proc = subprocess.Popen(
            child.argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=child.log_file,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_die_with_parent,  # the supervisor runs no threads
        )
        self.write_state()

    def _wait(self, child: Child, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.stopping:
                return
            if child.proc is not None and child.proc.poll() is not None:
                child.reported = True
                raise StackError(
                    f"{child.name} exited with code {child.proc.returncode} while starting; "
                    f"the end of {child.log_path}:\n{child.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{child.name} was not ready ({what}) within {self.ready_timeout:g}s; "
                    f"the end of {child.log_path}:\n{child.log_tail()}"
                )
            self._stop.wait(0.05)

    def start_services(self) -> None:
        for child in [c for c in self.children if c.name != "redis"]:
            if self.stopping:
                return
            self._spawn(child)
            print(f"starting {child.name} (pid {child.pid}) ...", flush=True)
            if child.port is not None:
                url = child.url + "/ready"
                self._wait(child, lambda url=url: _http_status(url) == 200, f"GET {url}")
            else:
                self._wait(
                    child,
                    lambda child=child: self._agent_consuming(child),
                    f"consumer {GUIDE_GROUP}/{child.env['GUIDE_AGENT_CONSUMER']} of "
                    f"{names.stream_consumers(GUIDE_CHANNEL)}",
                )

    def _agent_consuming(self, child: Child) -> bool:
        """An agent has no port; it is ready once its group stream is open: the API marks its
        consumer live in Redis at every step of that stream."""
        member = f"{GUIDE_GROUP}/{child.env['GUIDE_AGENT_CONSUMER']}"
        reply = _redis_command(
            self.redis_url, "ZSCORE", names.stream_consumers(GUIDE_CHANNEL), member
        )
        return reply not in (None, b"$-1\r\n", b"_\r\n")

    def create_session(self) -> dict[str, Any] | None:
        if not any(c.name == "traffic_cop" for c in self.children):
            return None
        request = urllib.request.Request(
            f"http://{HOST}:{self.traffic_cop_port}/v1/sessions",
            data=json.dumps({"user_id": DEMO_USER}).encode(),
            method="POST",
            headers={
                "Authorization": f"Bearer {TRAFFIC_COP_KEY}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                body: dict[str, Any] = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise StackError(f"could not create the demo session with Traffic Cop: {exc}") from None
        return body

    def write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "redis_url": self._redis_shown(),
            "own_redis": self.own_redis,
            "children": [
                {
                    "name": c.name,
                    "pid": c.pid,
                    "port": c.port,
                    "log": str(c.log_path),
                    "restarts": c.restarts,
                }
                for c in self.children
                if c.proc is not None
            ],
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def banner(self, session: dict[str, Any] | None) -> str:
        lines = ["", "Post Office is running. Ctrl-C stops everything.", ""]
        width = max(len(c.name) for c in self.children)
        for c in self.children:
            if c.name == "redis":
                where = f"{self.redis_url} (private, in {self.redis_dir})"
            elif c.port is None:
                where = "(no port; talks to the API)"
            else:
                where = c.url
            lines.append(f"  {c.name:<{width}}  {where:<40}  pid {c.pid}")
        if not self.own_redis:
            lines.append(f"  {'redis':<{width}}  {self._redis_shown()} (given by REDIS_URL)")
        lines.append(f"  API reference: http://{HOST}:{self.api_port}/v1/openapi.json")
        lines.append("  every service: /health, /ready, /metrics")
        lines += ["", "  development realm keys (Authorization: Bearer <key> on the API):"]
        lines += [f"    {key:<26} realm {realm}" for key, realm in REALM_KEYS.items()]
        lines.append(f"  Traffic Cop service key: {TRAFFIC_COP_KEY}")
        if session is not None:
            token = session["session_token"]
            gateway = self.gateway_ports[0]
            lines += [
                "",
                f"  session token for user {DEMO_USER!r} (expires {session.get('expires_at')}):",
                f"    {token}",
            ]
            if any(c.name.startswith("gateway") for c in self.children):
                lines += [
                    f"  chat page:  http://{HOST}:{gateway}/?session_token={token}",
                    "  from a terminal:",
                    f"    echo hello | {_python_shown()} -m scripts.ws_client "
                    f"'ws://{HOST}:{gateway}/ws?session_token={token}'",
                ]
        lines += [
            "",
            f"  logs: {self.log_dir}/<name>.log   state: {self.state_path}",
            f"Post Office is ready (supervisor pid {os.getpid()})",
        ]
        return "\n".join(lines)

    # -- watch and stop -----------------------------------------------------------------------

    def watch(self) -> Child | None:
        """Restart children that die until a stop is requested (``None``) or one of them is
        in a crash loop (that child)."""
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._restart(child)
                elif not child.alive():
                    if self._died(child, now):
                        return child
                elif child.rejoining and self._ready(child):
                    child.rejoining = False
                    print(f"make run: {child.name} (pid {child.pid}) is ready again", flush=True)
        return None

    def _died(self, child: Child, now: float) -> bool:
        """Log the death and schedule the restart; True when it is one death too many."""
        code = child.proc.returncode if child.proc is not None else None
        child.reported = True  # stop() must not count this death as a failed stop
        child.deaths = [t for t in child.deaths if now - t <= self.restart_window] + [now]
        if len(child.deaths) > self.restart_limit:
            return True
        delay = backoff(len(child.deaths) - 1, self.restart_base, self.restart_cap)
        child.restart_at = now + delay
        print(
            f"make run: {child.name} (pid {child.pid}) died with code {code}; restarting it in "
            f"{delay:.2f}s ({len(child.deaths)} of at most {self.restart_limit} deaths in "
            f"{self.restart_window:g}s); the others keep serving",
            flush=True,
        )
        return False

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.reported = False
        child.restarts += 1
        child.rejoining = True
        self._spawn(child)
        print(
            f"make run: restarted {child.name} (pid {child.pid}, restart {child.restarts})",
            flush=True,
        )

    def _ready(self, child: Child) -> bool:
        if child.name == "redis":
            return _redis_command(self.redis_url, "PING") == b"+PONG\r\n"
        if child.port is None:
            return self._agent_consuming(child)
        return _http_status(child.url + "/ready", timeout=0.5) == 200

    def stop(self) -> list[str]:
        """Stop every child, highest tier first; the problems met (empty: all clean)."""
        problems: list[str] = []
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            group = [c for c in self.children if c.tier == tier and c.proc is not None]
            for child in group:
                if child.proc is not None and child.alive():
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            for child in group:
                proc = child.proc
                if proc is None:
                    continue
                while proc.poll() is None and time.monotonic() < deadline:
                    if self._force.wait(0.02):
                        break
                code = proc.poll()
                if code is None:
                    proc.kill()
                    proc.wait()
                    why = (
                        "a second Ctrl-C"
                        if self._force.is_set()
                        else f"it did not exit within {self.stop_timeout:g}s of SIGTERM"
                    )
                    problems.append(f"{child.name} was killed: {why}")
                elif code not in (0, -signal.SIGTERM) and not child.reported:
                    problems.append(f"{child.name} exited with code {code}")
                if child.log_file is not None:
                    child.log_file.close()
                    child.log_file = None
        # The Redis directory stays (its AOF shows what the run held); the next start empties it.
        if self.locked:
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
        return problems


def _python_shown() -> str:
    venv_python = ROOT / ".venv" / "bin" / "python"
    if Path(sys.executable).resolve() == venv_python.resolve():
        return ".venv/bin/python"
    return sys.executable


def main() -> int:
    try:
        stack = Stack()
    except StackError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    stack.install_signal_handlers()
    failure: str | None = None
    try:
        stack.lock()
    except StackError as exc:
        # Refused before anything started: nothing of ours to stop, nothing of theirs to touch.
        print(f"make run: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        stack.plan()
        stack.check_ports()
        stack.start_redis()
        stack.start_services()
        if not stack.stopping:
            print(stack.banner(stack.create_session()), flush=True)
            died = stack.watch()
            if died is not None:
                code = died.proc.returncode if died.proc is not None else None
                failure = (
                    f"crash loop: {died.name} (pid {died.pid}) died with code {code}, "
                    f"{len(died.deaths)} deaths within {stack.restart_window:g}s (more than "
                    f"RUN_RESTART_LIMIT={stack.restart_limit}); stopping everything. The end of "
                    f"{died.log_path}:\n{died.log_tail()}"
                )
                died.reported = True
    except StackError as exc:
        failure = str(exc)
    except BaseException as exc:  # anything unforeseen: still stop every child before leaving
        failure = f"unexpected error: {exc!r}"
    if failure is not None:
        print(f"make run: {failure}", file=sys.stderr, flush=True)
    else:
        print(f"stopping ({stack.stop_signal or 'requested'}) ...", flush=True)
    problems = stack.stop()
    for problem in problems:
        print(f"make run: {problem}", file=sys.stderr, flush=True)
    if failure is None and not problems:
        print("all stopped", flush=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
