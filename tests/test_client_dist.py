"""``post_office_client`` as its own distribution (``post_office_client/pyproject.toml``).

The wheel is built from a copy of the package directory, installed into a fresh venv in a
temporary directory with ``pip install --no-index --no-deps``, and its declared dependencies
(and theirs) are copied there from this venv's site-packages, nothing else. Then, from outside
the repository: the package imports, nothing of the server distribution (``shared``,
``redis``) is reachable, ``pip check`` finds every requirement met, and the example agent,
run from that venv, answers a real API process.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from packaging.requirements import Requirement
from redis.asyncio import Redis

from shared import redis_names as names
from shared.protocol import AgentMessage, new_connection_id
from shared.registry import ConnectionRecord, Registry
from tests.api_util import api_process, listening, numsub
from tests.helpers import ROOT, ServiceProcess, timeout, wait_for

PACKAGE = ROOT / "post_office_client"


def _pip(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout(60),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions ``requirements`` need, recursively (markers evaluated)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in importlib.metadata.requires(name) or ())
    return seen


def _copy_installed(names_: set[str], site: Path) -> None:
    """Copy each distribution's files (its RECORD) from this venv into ``site``."""
    here = Path(sysconfig.get_paths()["purelib"]).resolve()
    for name in names_:
        for file in importlib.metadata.distribution(name).files or ():
            source = Path(str(file.locate())).resolve()
            if not source.is_relative_to(here) or "__pycache__" in source.parts:
                continue  # console scripts and the like live outside site-packages
            target = site / source.relative_to(here)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("client-dist")
    src = tmp / "src"
    shutil.copytree(
        PACKAGE, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    wheels = tmp / "wheels"
    _pip(
        "wheel",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "-w",
        str(wheels),
        str(src),
        cwd=tmp,
    )
    [wheel] = wheels.glob("post_office_client-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    _pip("--python", str(python), "install", "--no-index", "--no-deps", str(wheel), cwd=tmp)
    requires = importlib.metadata.Distribution.at(
        next((env_dir / "lib").glob("python3.*/site-packages/post_office_client-*.dist-info"))
    ).requires
    site = next((env_dir / "lib").glob("python3.*/site-packages"))
    _copy_installed(_closure(list(requires or ())), site)
    yield python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin"},  # no PYTHONPATH: only what the venv holds
        capture_output=True,
        text=True,
        timeout=timeout(30),
        check=False,
    )


def test_the_wheel_declares_only_what_the_client_uses(client_venv: Path) -> None:
    site = next((client_venv.parent.parent / "lib").glob("python3.*/site-packages"))
    [info] = site.glob("post_office_client-*.dist-info")
    requires = importlib.metadata.Distribution.at(info).requires or []
    assert sorted(Requirement(r).name for r in requires) == ["aiohttp", "orjson", "yarl"]


def test_installed_client_imports_from_outside_the_repository(client_venv: Path) -> None:
    outside = client_venv.parent.parent
    code = (
        "import importlib.util, post_office_client as p\n"
        "print(p.__file__)\n"
        "print(importlib.util.find_spec('shared'), importlib.util.find_spec('redis'))\n"
        "print(sorted(p.__all__)[:3])\n"
    )
    result = _run(client_venv, "-c", code, cwd=outside)
    assert result.returncode == 0, result.stderr
    where, missing, names_ = result.stdout.splitlines()
    assert Path(where).is_relative_to(outside) and not Path(where).is_relative_to(ROOT)
    assert missing == "None None"  # the server distribution is not there
    assert names_ == "['AgentMessage', 'BadRequest', 'BroadcastResult']"
    check = _pip("--python", str(client_venv), "check", cwd=outside)
    assert "No broken requirements" in check


async def test_the_example_agent_answers_from_the_fresh_venv(
    client_venv: Path, redis: Redis, redis_url: str, traffic_cop: ServiceProcess
) -> None:
    api = api_process(redis_url, traffic_cop)
    api.start()
    channel = "pillar:content"
    agent = await asyncio.create_subprocess_exec(
        str(client_venv),
        "-m",
        "post_office_client.echo_agent",
        "--url",
        api.url,
        "--channel",
        channel,
        "--limit",
        "1",
        cwd=client_venv.parent.parent,
        env={"PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        cid = new_connection_id("alice")
        await Registry(redis, 60).register(
            ConnectionRecord(
                connection_id=cid,
                user_id="alice",
                session_id="sess_0123456789abcdef",
                gateway_instance="gw-1",
                connected_at=time.time(),
                channels=(channel,),
            )
        )
        await redis.set(names.gateway_instance("gw-1"), "1", ex=60)
        await wait_for(
            lambda: numsub(redis, names.agent_channel(channel)), what="the agent's stream"
        )
        message = AgentMessage(
            message_id="msg_0001",
            connection_id=cid,
            user_id="alice",
            gateway_instance="gw-1",
            message={"type": "message", "channel": channel, "payload": {"message": "hi"}},
            timestamp="2026-01-01T00:00:00Z",
            traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
        )
        async with listening(redis, names.connection_messages(cid)) as gateway:
            await redis.publish(names.agent_channel(channel), message.to_bytes())
            _, data = await gateway.next(10)
        assert orjson.loads(data) == {
            "type": "response",
            "agent_type": "echo",
            "in_reply_to": "msg_0001",
            "message": "echo: hi",
        }
        _, stderr = await asyncio.wait_for(agent.communicate(), timeout(10))
        assert agent.returncode == 0, stderr.decode()
        assert f"listening on {channel!r}" in stderr.decode()
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        api.stop()
