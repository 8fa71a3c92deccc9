"""``create_app(settings)``: the Post Office API, every resource in a cleanup context.

Cleanup contexts, in start order (torn down in reverse):

1. tracing (a no-op without an OTLP endpoint);
2. the pooled Redis client (the skeleton's, which also makes ``/ready`` check Redis);
3. the registry, deliveries and discovery built on it, and the task that tells Traffic Cop
   about stale connections the API removes (stale.py);
4. the SSE hub: one dedicated pub/sub connection for the whole process, its listener task
   (``/ready`` also checks that it is connected) and the task that notices departed clients;
5. Consul registration, deregistered first on shutdown.

SIGTERM: ``on_shutdown`` ends every SSE stream (buffered events are still sent), so
in-flight requests finish within ``SHUTDOWN_TIMEOUT`` and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from services.post_office_api.auth import RealmKeys
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
from shared.discovery import (
    API_SERVICE,
    Discovery,
    registration_context,
    traffic_cop_resolver,
)
from shared.pubsub import Hub
from shared.registry import Registry
from shared.service import REDIS, SERVICE, base_app, redis_context
from shared.tracing import tracing_context
from shared.traffic_cop_client import TrafficCopClient

__all__ = ["PUBSUB_CLIENT_NAME", "SERVICE_NAME", "create_app"]

log = logging.getLogger(__name__)

SERVICE_NAME = "post-office-api"
#: CLIENT SETNAME of the hub's pub/sub connection (visible in CLIENT LIST).
PUBSUB_CLIENT_NAME = f"{SERVICE_NAME}-pubsub"
#: Registry records are written by gateways; the API never sets their TTL, but the registry
#: object needs one.
_RECORD_TTL = 3600


async def _components(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = app[REDIS]
    registry = Registry(redis, _RECORD_TTL)
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
        redis, registry, queue_max_length=settings.queue_max_length, on_stale=stale.report
    )
    app[ENDPOINTS] = WebSocketEndpoints(discovery, settings.public_ws_url, settings.gateway_urls)
    task = asyncio.create_task(stale.run(), name="traffic-cop-stale-reports")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])
        if stale.pending:
            log.info("%d stale-connection report(s) not sent at exit", stale.pending)
        if traffic_cop is not None:
            await traffic_cop.close()
        await discovery.close()


async def _hub(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pubsub = Hub(
        settings.redis_url,
        name=PUBSUB_CLIENT_NAME,
        backoff_base=settings.pubsub_backoff_min_seconds,
        backoff_cap=settings.pubsub_backoff_max_seconds,
        confirm_timeout=settings.sse_subscribe_timeout_seconds,
    )
    hub = ChannelHub(
        pubsub,
        queue_size=settings.sse_queue_size,
        max_subscribers=settings.sse_max_subscribers,
        max_event_bytes=settings.sse_max_event_bytes,
        disconnect_check=settings.sse_disconnect_check_seconds,
        requeue=app[DELIVERIES].requeue,
    )
    app[HUB] = hub
    app[SERVICE].add_check("pubsub", pubsub.check)
    tasks = [
        asyncio.create_task(pubsub.run(), name="sse-pubsub-listener"),
        asyncio.create_task(hub.watch(), name="sse-disconnect-watch"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        # Events collected for streams that left, whose UNSUBSCRIBE was never confirmed.
        await hub.flush_leaving()
        await pubsub.close()


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
        redis_context(settings.redis_url, max_connections=settings.redis_max_connections)
    )
    app.cleanup_ctx.append(_components)
    app.cleanup_ctx.append(_hub)
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
    setup_routes(app)
    return app
