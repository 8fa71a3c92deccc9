"""Every background task of every service is owned and supervised.

Each task is made to die through the ``FAIL_TASKS`` test hook (a real setting, refused in
production: the named task raises as it starts, see ``shared.service.spawn``). Two views of
each death:

* in-process (``aiohttp_client(create_app(settings))``, where a failure does not stop the
  test's own event loop): ``/ready`` answers 503 ``failed``, naming the task;
* as a real process (``python -m services.<name>``): the process drains and exits 1, and its
  log says which task died.

The task lists below are the services' own (``TASKS`` in their app modules), so a task added
without being listed here fails ``test_every_task_is_listed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from services.eviction_worker import app as worker_app
from services.eviction_worker.settings import PREFIX as WORKER_PREFIX
from services.eviction_worker.settings import EvictionSettings
from services.gateway import app as gateway_app
from services.gateway.settings import PREFIX as GATEWAY_PREFIX
from services.gateway.settings import GatewaySettings
from services.post_office_api import app as api_app
from services.traffic_cop_stub import app as traffic_cop_app
from services.traffic_cop_stub.settings import TrafficCopSettings
from shared.discovery import REGISTRATION_TASK
from shared.settings import SettingsError, load
from tests.api_util import api_settings
from tests.eviction_util import FAST as WORKER_FAST
from tests.eviction_util import worker_process
from tests.gateway_util import FAST as GATEWAY_FAST
from tests.gateway_util import gateway_process
from tests.helpers import TRAFFIC_COP_KEY, ServiceProcess, timeout, wait_for

pytestmark = pytest.mark.filterwarnings("error")

#: Nothing listens there: Consul (or Traffic Cop) calls fail fast, which is all these tests need.
NOWHERE = "http://127.0.0.1:9"

API_TASKS = [*api_app.TASKS, REGISTRATION_TASK]
WORKER_TASKS = [*worker_app.TASKS, REGISTRATION_TASK]
TRAFFIC_COP_TASKS = [REGISTRATION_TASK]
GATEWAY_TASKS = [*gateway_app.TASKS, REGISTRATION_TASK]


def test_every_task_is_listed() -> None:
    # The lists the tests below kill, against the names the services start their tasks with.
    assert api_app.TASKS == (
        "traffic-cop-stale-reports",
        "sse-pubsub-listener",
        "sse-disconnect-watch",
    )
    assert worker_app.TASKS == ("eviction-loop", "traffic-cop-reporter")
    assert gateway_app.TASKS == (
        "gateway-pubsub-reader",
        "gateway-publisher",
        "gateway-upkeep",
        "gateway-instance-heartbeat",
    )


def test_production_refuses_the_hook() -> None:
    env = {"ENVIRONMENT": "production", "TRAFFIC_COP_SERVICE_KEY": "k" * 40}
    with pytest.raises(SettingsError, match="EVICTION_FAIL_TASKS is a test hook"):
        load(EvictionSettings, WORKER_PREFIX, {**env, "EVICTION_FAIL_TASKS": "eviction-loop"})


async def _failed_ready(client: Any, task: str) -> None:
    async def failed() -> dict[str, Any] | None:
        async with client.get("/ready") as resp:
            body: dict[str, Any] = await resp.json()
            return body if resp.status == 503 and body["status"] == "failed" else None

    body = await wait_for(failed, what=f"/ready failed after {task} died")
    assert body is not None
    assert f"background task {task} died" in body["failing"]["service"]
    assert "InjectedFault" in body["failing"]["service"]


# -- in-process: /ready turns 503 naming the dead task ------------------------------------------


def _api_app(request: pytest.FixtureRequest, redis_url: str, task: str) -> web.Application:
    settings = api_settings(redis_url, traffic_cop_url=NOWHERE, consul_url=NOWHERE, fail_tasks=task)
    return api_app.create_app(settings)


def _worker_app(request: pytest.FixtureRequest, redis_url: str, task: str) -> web.Application:
    env = {**WORKER_FAST, "REDIS_URL": redis_url, "TRAFFIC_COP_URL": NOWHERE}
    env.update({"CONSUL_URL": NOWHERE, "EVICTION_FAIL_TASKS": task})
    return worker_app.create_app(load(EvictionSettings, WORKER_PREFIX, env))


def _traffic_cop_app(request: pytest.FixtureRequest, redis_url: str, task: str) -> web.Application:
    settings = TrafficCopSettings(
        redis_url=redis_url, service_key=TRAFFIC_COP_KEY, consul_url=NOWHERE, fail_tasks=task
    )
    return traffic_cop_app.create_app(settings)


def _gateway_app(request: pytest.FixtureRequest, redis_url: str, task: str) -> web.Application:
    # The gateway starts its tasks only once Traffic Cop answers: a real one.
    traffic_cop: ServiceProcess = request.getfixturevalue("traffic_cop")
    env = {
        **GATEWAY_FAST,
        "REDIS_URL": redis_url,
        "TRAFFIC_COP_URL": traffic_cop.url,
        "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
        "CONSUL_URL": NOWHERE,
        "GATEWAY_FAIL_TASKS": task,
    }
    return gateway_app.create_app(load(GatewaySettings, GATEWAY_PREFIX, env))


IN_PROCESS = [
    *[(_api_app, task) for task in API_TASKS],
    *[(_worker_app, task) for task in WORKER_TASKS],
    *[(_traffic_cop_app, task) for task in TRAFFIC_COP_TASKS],
    *[(_gateway_app, task) for task in GATEWAY_TASKS],
]


@pytest.mark.parametrize(
    ("make_app", "task"),
    IN_PROCESS,
    ids=[f"{make.__name__[1:-4]}-{task}" for make, task in IN_PROCESS],
)
async def test_a_dead_task_fails_ready(
    request: pytest.FixtureRequest,
    aiohttp_client: Any,
    redis_url: str,
    make_app: Callable[[pytest.FixtureRequest, str, str], web.Application],
    task: str,
) -> None:
    client = await aiohttp_client(make_app(request, redis_url, task))
    await _failed_ready(client, task)


# -- real processes: the process drains and exits 1 ---------------------------------------------


def _exits_1_naming(service: ServiceProcess, task: str) -> None:
    service.start(wait_ready=False)
    try:
        assert service.proc is not None
        code = service.proc.wait(timeout(20))
    finally:
        service.stop()
    log = service.log()
    assert code == 1, log[-3000:]
    assert f"background task {task} died" in log
    assert "cannot go on" in log


def _process(module: str, prefix: str, redis_url: str, task: str, **env: str) -> ServiceProcess:
    service = ServiceProcess(
        module, {"REDIS_URL": redis_url, "CONSUL_URL": NOWHERE, f"{prefix}FAIL_TASKS": task, **env}
    )
    service.env[f"{prefix}PORT"] = str(service.port)
    return service


@pytest.mark.parametrize("task", API_TASKS)
def test_api_process_exits_1_when_a_task_dies(redis_url: str, task: str) -> None:
    env = {"POST_OFFICE_TRAFFIC_COP_URL": NOWHERE, "POST_OFFICE_SHUTDOWN_TIMEOUT": "1"}
    api = _process("services.post_office_api", "POST_OFFICE_", redis_url, task, **env)
    _exits_1_naming(api, task)


@pytest.mark.parametrize("task", WORKER_TASKS)
def test_worker_process_exits_1_when_a_task_dies(redis_url: str, task: str) -> None:
    worker = worker_process(redis_url, NOWHERE, CONSUL_URL=NOWHERE, EVICTION_FAIL_TASKS=task)
    _exits_1_naming(worker, task)


@pytest.mark.parametrize("task", TRAFFIC_COP_TASKS)
def test_traffic_cop_process_exits_1_when_a_task_dies(redis_url: str, task: str) -> None:
    env = {"TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY}
    cop = _process("services.traffic_cop_stub", "TRAFFIC_COP_", redis_url, task, **env)
    _exits_1_naming(cop, task)


@pytest.mark.parametrize("task", GATEWAY_TASKS)
def test_gateway_process_exits_1_when_a_task_dies(
    redis_url: str, traffic_cop: ServiceProcess, task: str
) -> None:
    gateway = gateway_process(
        redis_url,
        traffic_cop.url,
        CONSUL_URL=NOWHERE,
        GATEWAY_FAIL_TASKS=task,
    )
    _exits_1_naming(gateway, task)
