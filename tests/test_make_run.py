"""``make run`` end to end: the real Makefile target, real processes, real ports.

The stack runs on free ports (``RUN_*_PORT``) with its state in a temporary ``RUN_DIR``, so
the test does not collide with a developer's own ``make run``. The supervisor's
``stack.json`` names every child with its pid and port; the tests check each of them answers,
and that after the stop none is left and every port is free again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, RedisServer, free_port, timeout, wait_for_sync

READY_LINE = "Post Office is ready"


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout(2)) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Run:
    """One ``make run`` (or ``python -m scripts.run_stack``) with its output in a file."""

    def __init__(self, tmp: Path, argv: list[str], env: dict[str, str], gateways: int = 2) -> None:
        self.run_dir = tmp / "run"
        self.out_path = tmp / "out.log"
        chosen: list[int] = []
        while len(chosen) < 3 + gateways:  # distinct: the supervisor refuses a port twice
            port = free_port()
            if port not in chosen:
                chosen.append(port)
        self.ports = {
            "RUN_API_PORT": str(chosen[0]),
            "RUN_TRAFFIC_COP_PORT": str(chosen[1]),
            "RUN_EVICTION_PORT": str(chosen[2]),
            "RUN_GATEWAY_PORTS": ",".join(str(p) for p in chosen[3:]),
        }
        base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CONSUL_URL")}
        self.env = {
            **base,
            **self.ports,
            "RUN_DIR": str(self.run_dir),
            "RUN_READY_TIMEOUT": str(timeout(30)),
            "RUN_STOP_TIMEOUT": str(timeout(15)),
            **env,
        }
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        # A session of its own: a stray signal to the test's group never reaches it, and the
        # test can signal the whole group the way a terminal's Ctrl-C does.
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state: dict[str, Any] = {}

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_ready(self) -> dict[str, Any]:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
            return READY_LINE in self.output()

        wait_for_sync(ready, 60, interval=0.05, what="the ready banner")
        self.state = json.loads((self.run_dir / "stack.json").read_text())
        return self.state

    def children(self) -> list[dict[str, Any]]:
        return list(self.state["children"])

    def wait_exit(self, seconds: float = 40) -> int:
        try:
            return self.proc.wait(timeout(seconds))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit in time:\n{self.output()}") from None

    def close(self) -> None:
        """Whatever happened, leave nothing behind (the children follow the supervisor)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout(30))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for child in self.state.get("children", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child["pid"], signal.SIGKILL)
        self._out.close()

    def assert_all_gone(self) -> None:
        for child in self.children():
            pid, port = int(child["pid"]), child["port"]
            wait_for_sync(partial(_pid_gone, pid), 10, what=f"{child['name']} exited")
            if port:
                wait_for_sync(partial(_port_free, int(port)), 10, what=f"port {port} free")
        assert not (self.run_dir / "stack.json").exists()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[Run]:
    run = Run(tmp_path, ["make", "--no-print-directory", "run"], {})
    yield run
    run.close()


def test_make_run_starts_the_stack_and_ctrl_c_stops_it(make_run: Run) -> None:
    state = make_run.wait_ready()
    out = make_run.output()
    names = [c["name"] for c in make_run.children()]
    assert state["own_redis"] is True
    assert names == [
        "redis",
        "traffic_cop",
        "post_office_api",
        "eviction_worker",
        "gateway-1",
        "gateway-2",
        "guide_agent",
        "guide_agent-2",
    ], state
    for key in ("dev-smart_city", "dev-experience", "dev-business_enablement"):
        assert key in out

    for child in make_run.children():
        assert (make_run.run_dir / "logs" / f"{child['name']}.log").exists(), child
        if child["name"] == "redis" or child["port"] is None:
            continue
        base = f"http://127.0.0.1:{child['port']}"
        assert _status(base + "/health") == 200, child["name"]
        assert _status(base + "/ready") == 200, child["name"]
        assert _status(base + "/metrics") == 200, child["name"]

    # The banner's token is a live session.
    token = re.search(r"session token for user 'demo'.*\n\s+(\S+)", out)
    assert token is not None, out
    gateway = make_run.ports["RUN_GATEWAY_PORTS"].split(",")[0]
    assert f"http://127.0.0.1:{gateway}/?session_token={token[1]}" in out
    assert "scripts.ws_client" in out

    # The printed way to connect works: a message reaches the guide agent and comes back.
    url = f"ws://127.0.0.1:{gateway}/ws?session_token={token[1]}"
    client = subprocess.run(
        [sys.executable, "-m", "scripts.ws_client", url],
        input=b"hello guide\n",
        capture_output=True,
        cwd=ROOT,
        timeout=timeout(30),
    )
    frames = [json.loads(line) for line in client.stdout.decode().splitlines()]
    kinds = [f.get("type") for f in frames]
    assert kinds[0] == "welcome", client
    assert "ack" in kinds and "response" in kinds, client
    assert "You said: hello guide" in client.stdout.decode(), client
    assert client.returncode == 0, client

    # Ctrl-C on the supervisor (make passes its exit status through): exit 0, nothing left.
    os.kill(state["supervisor_pid"], signal.SIGINT)
    assert make_run.wait_exit() == 0, make_run.output()
    assert "all stopped" in make_run.output()
    make_run.assert_all_gone()


def test_terminal_ctrl_c_and_an_external_redis(
    tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    """REDIS_URL given: no private Redis, and that Redis survives. SIGINT to the whole process
    group, as a terminal's Ctrl-C sends it, still stops the children in order, exit 0."""
    run = Run(
        tmp_path,
        [sys.executable, "-m", "scripts.run_stack"],
        {"REDIS_URL": redis_url},  # the fixture flushes it afterwards
        gateways=1,
    )
    try:
        state = run.wait_ready()
        assert state["own_redis"] is False
        assert all(c["name"] != "redis" for c in run.children())
        os.killpg(run.proc.pid, signal.SIGINT)
        assert run.wait_exit() == 0, run.output()
        run.assert_all_gone()
        assert redis_server._answers()
    finally:
        run.close()


def _state(run: Run) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((run.run_dir / "stack.json").read_text())
    return state


def _child(run: Run, name: str) -> dict[str, Any]:
    return next(c for c in _state(run)["children"] if c["name"] == name)


def _restarted(run: Run, name: str, old_pid: int) -> bool:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        return int(_child(run, name)["pid"]) != old_pid
    return False


async def test_kill_9_of_a_gateway_leaves_the_others_serving_and_it_rejoins(
    tmp_path: Path,
) -> None:
    """The supervisor is a process manager: a gateway killed with SIGKILL is restarted (logged)
    and answers /ready again, while the clients of the other gateway stay open and served."""
    import aiohttp

    from tests.gateway_util import chat, create_sessions, recv

    run = Run(
        tmp_path,
        [sys.executable, "-m", "scripts.run_stack"],
        {"RUN_RESTART_BACKOFF_BASE_SECONDS": "0.2", "RUN_RESTART_BACKOFF_CAP_SECONDS": "1"},
    )
    clients: list[aiohttp.ClientWebSocketResponse] = []
    try:
        run.wait_ready()
        first, second = run.ports["RUN_GATEWAY_PORTS"].split(",")
        cop = f"http://127.0.0.1:{run.ports['RUN_TRAFFIC_COP_PORT']}"
        tokens = await create_sessions(cop, [f"user{n}" for n in range(5)])
        async with aiohttp.ClientSession() as http:
            for token in tokens:
                ws = await http.ws_connect(f"ws://127.0.0.1:{first}/ws?session_token={token}")
                assert (await recv(ws))["type"] == "welcome"
                clients.append(ws)
            victim = _child(run, "gateway-2")
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for_sync(
                partial(_restarted, run, "gateway-2", victim["pid"]), 20, what="gateway-2 back"
            )
            wait_for_sync(
                lambda: _status(f"http://127.0.0.1:{second}/ready") == 200,
                30,
                what="the restarted gateway-2 ready",
            )
            # Every client of the first gateway is still open and still served end to end
            # (acked, and answered by the guide agent).
            sent = acked = answered = 0
            for n, ws in enumerate(clients):
                await ws.send_str(chat(f"still here {n}", id=f"m{n}"))
                sent += 1
                kinds: set[str] = set()
                while not {"ack", "response"} <= kinds:
                    frame = await recv(ws, 15)
                    kinds.add(frame["type"])
                acked += "ack" in kinds
                answered += "response" in kinds
            still_open = sum(not ws.closed for ws in clients)
            print(
                f"clients=5 still_open={still_open} sent={sent} acked={acked} answered={answered}"
            )
            assert (still_open, sent, acked, answered) == (5, 5, 5, 5)
            for ws in clients:
                await ws.close()
        out = run.output()
        assert "gateway-2 (pid" in out and "died with code -9; restarting it in" in out, out
        assert "restarted gateway-2" in out and "gateway-2 (pid" in out
        assert _child(run, "gateway-2")["restarts"] == 1
        assert "crash loop" not in out
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.wait_exit() == 0, run.output()
    finally:
        run.close()


def test_a_crash_loop_stops_everything(tmp_path: Path) -> None:
    """Only a child dying more than RUN_RESTART_LIMIT times in RUN_RESTART_WINDOW stops the
    stack, naming it; each death before that is restarted."""
    run = Run(
        tmp_path,
        [sys.executable, "-m", "scripts.run_stack"],
        {
            "RUN_RESTART_LIMIT": "2",
            "RUN_RESTART_WINDOW": "120",
            "RUN_RESTART_BACKOFF_BASE_SECONDS": "0.1",
            "RUN_RESTART_BACKOFF_CAP_SECONDS": "0.2",
        },
        gateways=1,
    )
    try:
        run.wait_ready()
        kills = 0
        for _ in range(2):
            pid = int(_child(run, "traffic_cop")["pid"])
            os.kill(pid, signal.SIGKILL)
            kills += 1
            wait_for_sync(partial(_restarted, run, "traffic_cop", pid), 20, what="restarted")
        os.kill(int(_child(run, "traffic_cop")["pid"]), signal.SIGKILL)
        kills += 1
        code = run.wait_exit()
        out = run.output()
        assert kills == 3 and out.count("restarted traffic_cop") == 2, out
        assert code != 0
        assert "crash loop: traffic_cop" in out and "RUN_RESTART_LIMIT=2" in out, out
        run.state = {"children": [c for c in run.state["children"] if c["name"] != "traffic_cop"]}
        run.assert_all_gone()
    finally:
        run.close()


def test_a_second_make_run_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    """A second supervisor on the same RUN_DIR is refused before it touches the running
    stack's files: stack.json, the logs and Redis's AOF stay as they are."""
    run = Run(tmp_path, [sys.executable, "-m", "scripts.run_stack"], {}, gateways=1)
    try:
        run.wait_ready()
        state_before = (run.run_dir / "stack.json").read_bytes()
        logs = {p.name: p.stat().st_size for p in (run.run_dir / "logs").iterdir()}
        assert list((run.run_dir / "redis").iterdir()), "the AOF directory is populated"
        # The same RUN_DIR and ports, as a second `make run` in another terminal.
        again = subprocess.run(
            [sys.executable, "-m", "scripts.run_stack"],
            cwd=ROOT,
            env=run.env,
            capture_output=True,
            timeout=timeout(30),
        )
        message = again.stderr.decode()
        assert again.returncode == 2, message
        assert "another `make run`" in message and "Nothing of the running stack" in message
        assert f"supervisor pid {run.state['supervisor_pid']}" in message, message
        assert (run.run_dir / "stack.json").read_bytes() == state_before
        for name, size in logs.items():
            assert (run.run_dir / "logs" / name).stat().st_size >= size, name
        # The first stack still serves.
        for child in run.children():
            if child["port"] and child["name"] != "redis":
                assert _status(f"http://127.0.0.1:{child['port']}/ready") == 200, child
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.wait_exit() == 0, run.output()
        run.assert_all_gone()
    finally:
        run.close()


def test_a_busy_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = Run(
            tmp_path,
            [sys.executable, "-m", "scripts.run_stack"],
            {"RUN_TRAFFIC_COP_PORT": str(port)},
        )
        try:
            assert run.wait_exit(20) != 0
            assert f"{port} (traffic_cop)" in run.output()
            assert not (run.run_dir / "stack.json").exists()
        finally:
            run.close()


def test_a_child_that_cannot_start_is_named_with_its_log(tmp_path: Path) -> None:
    """A process that exits while starting (here: a misspelt setting, which every service
    refuses) fails the start naming it, with its log tail, and what had started is stopped."""
    run = Run(
        tmp_path, [sys.executable, "-m", "scripts.run_stack"], {"EVICTION_NO_SUCH_SETTING": "1"}
    )
    try:
        assert run.wait_exit() != 0
        out = run.output()
        assert "eviction_worker exited with code 2 while starting" in out, out
        assert "EVICTION_NO_SUCH_SETTING" in out  # the log tail says why
        assert "Post Office is ready" not in out
        assert not (run.run_dir / "stack.json").exists()
        started = [int(pid) for pid in re.findall(r"starting [\w-]+ \(pid (\d+)\)", out)]
        assert started  # Traffic Cop, at least, had started
        for pid in started:
            wait_for_sync(partial(_pid_gone, pid), 10, what=f"pid {pid} exited")
    finally:
        run.close()


def test_kill_9_of_the_private_redis_restarts_it_from_its_aof(tmp_path: Path) -> None:
    """The private Redis writes an AOF under RUN_DIR/redis: killed, it is restarted on its port
    and comes back with its data — the banner's session still validates."""
    run = Run(
        tmp_path,
        [sys.executable, "-m", "scripts.run_stack"],
        {"RUN_RESTART_BACKOFF_BASE_SECONDS": "0.2", "RUN_RESTART_BACKOFF_CAP_SECONDS": "0.5"},
        gateways=1,
    )
    try:
        run.wait_ready()
        token = re.search(r"session token for user 'demo'.*\n\s+(\S+)", run.output())
        assert token is not None
        cop = f"http://127.0.0.1:{run.ports['RUN_TRAFFIC_COP_PORT']}"
        assert _validate(cop, token[1]) == 200
        victim = _child(run, "redis")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for_sync(partial(_restarted, run, "redis", victim["pid"]), 20, what="redis back")
        wait_for_sync(lambda: "redis (pid" in run.output() and "is ready again" in run.output(), 20)
        wait_for_sync(lambda: _validate(cop, token[1]) == 200, 20, what="the session again")
        assert "crash loop" not in run.output()
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.wait_exit() == 0, run.output()
    finally:
        run.close()


def _validate(traffic_cop_url: str, token: str) -> int | None:
    request = urllib.request.Request(
        traffic_cop_url + "/v1/sessions/validate",
        data=json.dumps({"session_token": token}).encode(),
        method="POST",
        headers={"Authorization": "Bearer dev-traffic_cop", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout(2)) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None
