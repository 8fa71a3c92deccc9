"""``create_app(settings)``: the gateway application, every resource in a cleanup context.

Start-up. The port is bound at once, so ``/health`` answers (liveness) while the start-up task
(``_start``) waits up to ``STARTUP_WAIT_SECONDS`` for Redis and Traffic Cop, then starts the
pub/sub reader, the publisher, the tick and the instance heartbeat, and waits for the pub/sub
connection to be subscribed. Until then ``/ws`` answers 503 and ``/ready`` 503 naming what it
waits for (``"startup": "Starting: waiting for traffic_cop"``). A dependency that never answers
fails the start: ``gateway cannot start: ...`` is logged, the process stops and exits 1.

Supervision. Those four tasks must live as long as the process: one that ends other than by
cancellation fails it (:func:`shared.service.fail`): ``/ws`` and ``/ready`` answer 503, the
process drains as on SIGTERM and exits 1, so that its orchestrator restarts it.

SIGTERM (``_drain``, before aiohttp's own shutdown so that every socket is still read, with
``/ready`` and ``/ws`` answering 503):
leave Consul first, so nothing new is routed here; then the publisher hands every accepted
message to Redis, the breaker's buffer included (new messages are refused ``unavailable``
meanwhile), for at most ``SHUTDOWN_TIMEOUT - CLOSE_TIMEOUT`` (at least half of
``SHUTDOWN_TIMEOUT``); the sockets stay open meanwhile, so the acks still reach their clients.
Then every socket is closed with 1001, the handlers unregister their connections, and the
cleanup contexts stop the background tasks and delete the instance key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from services.gateway.keys import GATEWAY, ORIGINS, SETTINGS
from services.gateway.origins import OriginPolicy
from services.gateway.process import Gateway
from services.gateway.routes import setup_routes
from services.gateway.settings import GatewaySettings
from services.gateway.upkeep import reassert_after_data_loss, run_upkeep
from shared.address_budget import BUDGET, AddressBudget, address_budget_middleware
from shared.discovery import DEREGISTER, Discovery, registration_context, traffic_cop_resolver
from shared.epoch import DataLoss, epoch_context
from shared.http import Handler
from shared.protocol import CloseCode
from shared.pubsub import Hub
from shared.service import (
    REDIS,
    SERVICE,
    base_app,
    cancel_and_wait,
    fail,
    on_drain,
    redis_context,
    spawn,
)
from shared.service_names import GATEWAY_SERVICE
from shared.tracing import tracing_context
from shared.traffic_cop_client import TrafficCopClient

__all__ = [
    "PAGE_HEADERS",
    "SERVICE_NAME",
    "TASKS",
    "StartupError",
    "create_app",
    "page_headers_middleware",
]

log = logging.getLogger(__name__)

SERVICE_NAME = GATEWAY_SERVICE.name
TEMPLATES_DIR = Path(__file__).parent / "templates"
#: The tasks the start-up starts, by name (the names the FAIL_TASKS test hook takes).
TASKS = (
    "gateway-pubsub-reader",
    "gateway-publisher",
    "gateway-upkeep",
    "gateway-instance-heartbeat",
)


#: Headers of the chat page, whose URL carries a session token (``/?session_token=...``): no
#: framing (clickjacking), no script, style or connection but its own, and no Referer, so the
#: token never reaches another site; nor a cache.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@web.middleware
async def page_headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The chat page's :data:`PAGE_HEADERS`; ``nosniff`` and no Referer on every response."""
    response = await handler(request)
    if request.path == "/":
        response.headers.update(PAGE_HEADERS)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


class StartupError(RuntimeError):
    """A dependency never answered within ``STARTUP_WAIT_SECONDS``."""


async def _wait_until(name: str, check: Callable[[], Awaitable[object]], deadline: float) -> None:
    delay = 0.05
    while True:
        try:
            await asyncio.wait_for(check(), max(0.1, min(2.0, deadline - time.monotonic())))
            return
        except Exception as exc:  # any failure means "not answering yet"
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"{name} did not answer at start: {type(exc).__name__}: {exc}"
                ) from None
            log.info("waiting for %s: %s", name, type(exc).__name__)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


class Starting(Exception):
    """The readiness check's answer while the start-up task waits for a dependency."""


@dataclass
class _Lifecycle:
    """What the start-up task, the drain and the cleanup share."""

    startup: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    waiting_for: str = "redis"  # empty once started
    drained: bool = False  # the drain ran (it runs once: before aiohttp's shutdown, or in it)

    async def check(self) -> None:
        if self.waiting_for:
            raise Starting(f"waiting for {self.waiting_for}")


def _gateway_context(
    settings: GatewaySettings, life: _Lifecycle
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[SERVICE]
        discovery = Discovery(settings.consul_url or None)

        traffic_cop_url = traffic_cop_resolver(
            discovery, settings.traffic_cop_url, settings.traffic_cop_from_consul
        )
        traffic_cop = TrafficCopClient(
            traffic_cop_url,
            settings.traffic_cop_service_key,
            timeout=settings.traffic_cop_timeout_seconds,
            pool_limit=settings.traffic_cop_max_connections,
        )
        hub = Hub(
            settings.redis_target,
            name=f"{SERVICE_NAME}-pubsub",
            backoff_base=settings.pubsub_backoff_base_seconds,
            backoff_cap=settings.pubsub_backoff_cap_seconds,
        )
        gw = Gateway(settings, app[REDIS], hub, traffic_cop)
        app[GATEWAY] = gw
        state.add_check("startup", life.check)
        state.add_check("traffic_cop", traffic_cop.ping)
        state.add_check("pubsub", hub.check)
        # Not awaited here: the port is bound only once every cleanup context has started.
        life.startup = asyncio.create_task(_start(app, gw, life), name="gateway-startup")
        try:
            yield
        finally:
            gw.ready = False
            await cancel_and_wait([t for t in (life.startup, *life.tasks) if t is not None])
            gw.publisher.abandon()
            if life.tasks:  # the instance key exists only once started
                await gw.forget_instance()
            await hub.aclose()
            await traffic_cop.aclose()
            await discovery.aclose()

    return ctx


async def _start(app: web.Application, gw: Gateway, life: _Lifecycle) -> None:
    """Wait for the dependencies, start the background tasks, then accept upgrades."""
    settings = gw.settings
    deadline = time.monotonic() + settings.startup_wait_seconds
    try:
        life.waiting_for = "redis"
        await _wait_until("redis", gw.redis.ping, deadline)
        life.waiting_for = "traffic_cop"
        await _wait_until("traffic_cop", gw.traffic_cop.ping, deadline)
        gw.watch_process_channels()
        factories: tuple[Callable[[], Coroutine[Any, Any, None]], ...] = (
            gw.hub.run,
            gw.publisher.run,
            functools.partial(run_upkeep, gw),
            gw.keep_instance_alive,
        )
        for name, factory in zip(TASKS, factories, strict=True):
            task = spawn(app, name, factory())
            life.tasks.append(task)
            task.add_done_callback(lambda t: _stop_accepting(gw, t))
        life.waiting_for = "pubsub"
        await _wait_until("pubsub", gw.hub.check, deadline)
    except StartupError as exc:
        log.critical("gateway cannot start: %s", exc)
        fail(app, f"cannot start: {exc}")
        return
    except Exception as exc:  # a bug: the process must not stay up half-started
        log.exception("gateway start-up failed")
        fail(app, f"start-up failed: {exc!r}")
        return
    life.waiting_for = ""
    if app[SERVICE].failed:
        return
    gw.ready = True
    log.info("gateway %s ready", gw.instance)


def _stop_accepting(gw: Gateway, task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        gw.ready = False  # a dead background task: no new upgrades while the process stops


async def _drain(app: web.Application, life: _Lifecycle) -> None:
    """SIGTERM: leave Consul, publish what was accepted, close every socket with 1001."""
    gw = app.get(GATEWAY)
    if gw is None or life.drained:
        return
    life.drained = True
    settings = app[SETTINGS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.shutdown_timeout
    gw.ready = False
    if life.startup is not None and not life.startup.done():
        life.startup.cancel()
        await asyncio.wait([life.startup])
    deregister = app.get(DEREGISTER)
    if deregister is not None:
        await deregister()
    # The sockets stay open while the publisher drains, so the acks of what it publishes now
    # still reach their clients; CLOSE_TIMEOUT is left for closing them.
    remaining = max(0.0, deadline - loop.time())
    await gw.publisher.drain(max(remaining - settings.close_timeout, remaining / 2))
    log.info("draining %d connections", len(gw.connections))
    await gw.close_all(CloseCode.GOING_AWAY, "server shutting down", settings.close_timeout)


def create_app(settings: GatewaySettings) -> web.Application:
    app = base_app(
        SERVICE_NAME,
        settings.instance,
        body_timeout=settings.http_body_timeout_seconds,
        middlewares=[page_headers_middleware, address_budget_middleware],
        fail_tasks=settings.failing_tasks,
    )
    # /ws is charged before its token goes to Traffic Cop; nothing else here takes credentials.
    app[BUDGET] = AddressBudget.of(settings, upgrade_paths=("/ws",))
    app[SETTINGS] = settings
    app[ORIGINS] = OriginPolicy(settings.allowed_origins, settings.public_ws_url)
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=jinja2.select_autoescape()
    )
    app.cleanup_ctx.append(
        tracing_context(SERVICE_NAME, settings.instance, settings.otel_exporter_otlp_endpoint)
    )
    app.cleanup_ctx.append(
        redis_context(settings.redis_target, max_connections=settings.redis_max_connections)
    )
    life = _Lifecycle()
    app.cleanup_ctx.append(_gateway_context(settings, life))

    async def data_lost(loss: DataLoss) -> None:
        gw = app.get(GATEWAY)
        if gw is not None and gw.ready:
            await reassert_after_data_loss(gw)

    # After the gateway's context: the re-assert uses its connections and registry.
    app.cleanup_ctx.append(
        epoch_context(SERVICE_NAME, data_lost, settings.redis_epoch_check_seconds)
    )
    # Registered last so its cleanup runs first; the drain leaves Consul even earlier
    # (app[DEREGISTER] in on_shutdown), so Consul stops routing here before anything closes.
    app.cleanup_ctx.append(
        registration_context(
            GATEWAY_SERVICE,
            settings.instance,
            settings.advertised_host,
            settings.port,
            settings.consul_url or None,
        )
    )

    async def drain(app: web.Application) -> None:
        await _drain(app, life)

    # Before aiohttp's shutdown, which would discard what clients send meanwhile (frames sent
    # during the drain are answered); on_shutdown too, for servers started without run().
    on_drain(app, lambda: _drain(app, life))
    app.on_shutdown.append(drain)
    setup_routes(app)
    return app
