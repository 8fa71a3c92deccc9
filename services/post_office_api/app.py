"""``create_app(settings)``: the Post Office API, every resource in a cleanup context.

Cleanup contexts, in start order (torn down in reverse):

1. tracing (a no-op without an OTLP endpoint);
2. the pooled Redis client (the skeleton's, which also makes ``/ready`` check Redis);
3. the registry, deliveries and discovery built on it, and the task that tells Traffic Cop
   about stale connections the API removes (stale.py; only when Traffic Cop is configured);
4. the SSE hub: one dedicated pub/sub connection for the whole process, its listener task
   (``/ready`` also checks that it is connected) and the task that notices departed clients;
5. Consul registration, deregistered first on shutdown.

Every background task (:data:`TASKS`, and Consul's ``consul-registration``) is started with
:func:`shared.service.spawn` and supervised: one that dies turns ``/ready`` 503 and ends the
process with exit code 1 after the drain, so that its orchestrator restarts it.

SIGTERM: ``on_shutdown`` ends every SSE stream (buffered events are still sent), so
in-flight requests finish within ``SHUTDOWN_TIMEOUT`` and the process exits 0.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from services.post_office_api.auth import RealmKeys
from services.post_office_api.consumers import end_group_streams, groups_context
from services.post_office_api.delivery import Deliveries
from services.post_office_api.endpoint import WebSocketEndpoints
from services.post_office_api.handlers import metrics_middleware, realm_middleware
from services.post_office_api.hub import ChannelHub
from services.post_office_api.keys import (
    DELIVERIES,
    ENDPOINTS,
    HUB,
    OPENAPI,
    RATE_LIMITER,
    REALM_KEYS,
    REGISTRY,
    SETTINGS,
)
from services.post_office_api.openapi import build_openapi
from services.post_office_api.ratelimit import RealmRateLimiter
from services.post_office_api.routes import setup_routes
from services.post_office_api.settings import ApiSettings, parse_realm_keys
from services.post_office_api.stale import StaleReporter
from shared.address_budget import BUDGET, AddressBudget, address_budget_middleware
from shared.discovery import Discovery, registration_context, traffic_cop_resolver
from shared.pubsub import Hub
from shared.registry import Registry
from shared.service import REDIS, SERVICE, base_app, cancel_and_wait, redis_context, spawn
from shared.service_names import API_SERVICE
from shared.tracing import tracing_context
from shared.traffic_cop_client import TrafficCopClient

__all__ = ["PUBSUB_CLIENT_NAME", "SERVICE_NAME", "TASKS", "create_app"]

log = logging.getLogger(__name__)

SERVICE_NAME = API_SERVICE.name
#: CLIENT SETNAME of the hub's pub/sub connection (visible in CLIENT LIST).
PUBSUB_CLIENT_NAME = f"{SERVICE_NAME}-pubsub"
#: The API's own background tasks, by name (the names the FAIL_TASKS test hook takes).
STALE_REPORTS_TASK = "traffic-cop-stale-reports"
PUBSUB_TASK = "sse-pubsub-listener"
WATCH_TASK = "sse-disconnect-watch"
TASKS = (STALE_REPORTS_TASK, PUBSUB_TASK, WATCH_TASK)


async def _components(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = app[REDIS]
    registry = Registry(redis)
    app[REGISTRY] = registry
    discovery = Discovery(settings.consul_url or None)

    traffic_cop_url = traffic_cop_resolver(
        discovery, settings.traffic_cop_url, settings.traffic_cop_from_consul
    )
    traffic_cop = (
        TrafficCopClient(
            traffic_cop_url,
            settings.traffic_cop_service_key,
            timeout=settings.traffic_cop_timeout_seconds,
            pool_limit=4,
        )
        if settings.traffic_cop_url
        else None
    )
    stale = StaleReporter(traffic_cop, settings.traffic_cop_pending_limit)
    app[DELIVERIES] = Deliveries(
        redis, registry, stream_max_pending=settings.stream_max_pending, on_stale=stale.report
    )
    app[ENDPOINTS] = WebSocketEndpoints(discovery, settings.public_ws_url, settings.gateway_urls)
    tasks = [spawn(app, STALE_REPORTS_TASK, stale.run())] if traffic_cop is not None else []
    try:
        yield
    finally:
        await cancel_and_wait(tasks)
        if stale.pending:
            log.info("%d stale-connection report(s) not sent at exit", stale.pending)
        if traffic_cop is not None:
            await traffic_cop.aclose()
        await discovery.aclose()


async def _hub(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pubsub = Hub(
        settings.redis_target,
        name=PUBSUB_CLIENT_NAME,
        backoff_base=settings.pubsub_backoff_base_seconds,
        backoff_cap=settings.pubsub_backoff_cap_seconds,
        confirm_timeout=settings.sse_subscribe_timeout_seconds,
    )
    hub = ChannelHub(
        pubsub,
        queue_size=settings.sse_queue_size,
        max_subscribers=settings.sse_max_subscribers,
        max_event_bytes=settings.sse_max_event_bytes,
        disconnect_check=settings.sse_disconnect_check_seconds,
    )
    app[HUB] = hub
    app[SERVICE].add_check("pubsub", pubsub.check)
    tasks = [spawn(app, PUBSUB_TASK, pubsub.run()), spawn(app, WATCH_TASK, hub.watch())]
    try:
        yield
    finally:
        await cancel_and_wait(tasks)
        await pubsub.aclose()


async def _end_streams(app: web.Application) -> None:
    hub = app.get(HUB)
    if hub is not None:
        log.info("draining: ending %d SSE stream(s)", hub.subscriber_count)
        hub.close_all("shutdown")


def create_app(settings: ApiSettings) -> web.Application:
    app = base_app(
        SERVICE_NAME,
        settings.instance,
        client_max_size=settings.max_body_bytes,
        body_timeout=settings.http_body_timeout_seconds,
        middlewares=[metrics_middleware, address_budget_middleware, realm_middleware],
        fail_tasks=settings.failing_tasks,
    )
    app[BUDGET] = AddressBudget.of(settings)
    app[SETTINGS] = settings
    app[REALM_KEYS] = RealmKeys(parse_realm_keys(settings.realm_keys))
    app[RATE_LIMITER] = RealmRateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    app[OPENAPI] = orjson.dumps(build_openapi(settings.channels))
    app.cleanup_ctx.append(
        tracing_context(SERVICE_NAME, settings.instance, settings.otel_exporter_otlp_endpoint)
    )
    app.cleanup_ctx.append(
        redis_context(settings.redis_target, max_connections=settings.redis_max_connections)
    )
    app.cleanup_ctx.append(_components)
    app.cleanup_ctx.append(_hub)
    app.cleanup_ctx.append(groups_context)
    app.cleanup_ctx.append(
        registration_context(
            API_SERVICE,
            settings.instance,
            settings.advertised_host,
            settings.port,
            settings.consul_url or None,
        )
    )
    app.on_shutdown.append(_end_streams)
    app.on_shutdown.append(end_group_streams)
    setup_routes(app)
    return app
