"""``create_app(settings)``: the gateway application, every resource in a cleanup context.

Start-up (``_gateway`` below) waits up to ``STARTUP_WAIT_SECONDS`` for Redis and Traffic Cop
and raises :class:`StartupError` naming the one that never answered; then starts the pub/sub
reader, the publisher, the tick and the instance heartbeat, and only once the pub/sub
connection is subscribed does the gateway accept upgrades. SIGTERM (``on_shutdown``): stop
accepting, close every socket with 1001, let the handlers unregister them, then the cleanup
contexts stop the background tasks and delete the instance key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from services.gateway.core import Gateway
from services.gateway.hub import Hub
from services.gateway.keys import GATEWAY, ORIGINS, SETTINGS
from services.gateway.origins import OriginPolicy
from services.gateway.routes import setup_routes
from services.gateway.settings import Settings
from shared.discovery import GATEWAY_SERVICE, TRAFFIC_COP_SERVICE, Discovery, registration_context
from shared.protocol import CloseCode
from shared.service import REDIS, SERVICE, base_app, redis_context
from shared.tracing import tracing_context
from shared.traffic_cop_client import TrafficCopClient

__all__ = ["SERVICE_NAME", "StartupError", "create_app"]

log = logging.getLogger(__name__)

SERVICE_NAME = "gateway"
TEMPLATES_DIR = Path(__file__).parent / "templates"


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


def _gateway_context(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[SERVICE]
        discovery = Discovery(settings.consul_url or None)

        async def traffic_cop_url() -> str:
            return await discovery.resolve(TRAFFIC_COP_SERVICE, settings.traffic_cop_url or None)

        traffic_cop = TrafficCopClient(
            traffic_cop_url,
            settings.traffic_cop_service_key,
            timeout=settings.traffic_cop_timeout_seconds,
            pool_limit=settings.traffic_cop_max_connections,
        )
        hub = Hub(
            settings.redis_url,
            name=f"{SERVICE_NAME}-pubsub",
            backoff_base=settings.pubsub_backoff_base,
            backoff_cap=settings.pubsub_backoff_cap,
        )
        gw = Gateway(settings, app[REDIS], hub, traffic_cop)
        app[GATEWAY] = gw
        state.add_check("traffic_cop", traffic_cop.ping)
        state.add_check("pubsub", hub.check)
        tasks: list[asyncio.Task[None]] = []
        try:
            deadline = time.monotonic() + settings.startup_wait_seconds
            await _wait_until("redis", gw.redis.ping, deadline)
            await _wait_until("traffic_cop", traffic_cop.ping, deadline)
            gw.watch_process_channels()
            for name, factory in (
                ("pubsub-reader", hub.run),
                ("publisher", gw.publisher.run),
                ("tick", gw.tick),
                ("instance-heartbeat", gw.keep_instance_alive),
            ):
                task = asyncio.create_task(factory(), name=f"gateway-{name}")
                task.add_done_callback(_report)
                tasks.append(task)
            await _wait_until("pubsub", hub.check, deadline)
            gw.ready = True
            log.info("gateway %s ready", gw.instance)
            yield
        finally:
            gw.ready = False
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            gw.publisher.abandon()
            await gw.forget_instance()
            await hub.close()
            await traffic_cop.close()
            await discovery.close()

    return ctx


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s died", task.get_name(), exc_info=task.exception())


async def _drain(app: web.Application) -> None:
    """SIGTERM: no new upgrades, every socket closed with 1001; handlers then unregister."""
    gw = app.get(GATEWAY)
    if gw is None:
        return
    gw.ready = False
    settings = app[SETTINGS]
    log.info("draining %d connections", len(gw.connections))
    await gw.close_all(CloseCode.GOING_AWAY, "server shutting down", settings.close_timeout)


def create_app(settings: Settings) -> web.Application:
    app = base_app(SERVICE_NAME, settings.instance)
    app[SETTINGS] = settings
    app[ORIGINS] = OriginPolicy(settings.allowed_origins, settings.public_ws_url)
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=jinja2.select_autoescape()
    )
    app.cleanup_ctx.append(
        tracing_context(SERVICE_NAME, settings.instance, settings.otel_exporter_otlp_endpoint)
    )
    app.cleanup_ctx.append(
        redis_context(settings.redis_url, max_connections=settings.redis_max_connections)
    )
    app.cleanup_ctx.append(_gateway_context(settings))
    # Registered last so it is deregistered first: Consul stops routing here before we drain.
    app.cleanup_ctx.append(
        registration_context(
            GATEWAY_SERVICE,
            settings.instance,
            settings.advertised_host,
            settings.port,
            settings.consul_url or None,
        )
    )
    app.on_shutdown.append(_drain)
    setup_routes(app)
    return app
