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
from shared.discovery import API_SERVICE, TRAFFIC_COP_SERVICE, Discovery, registration_context
from shared.redis_client import make_redis
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

    async def traffic_cop_url() -> str:
        return await discovery.resolve(TRAFFIC_COP_SERVICE, settings.traffic_cop_url)

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
    # A connection of its own: no socket timeout on its blocking reads, no health-check PING
    # racing the reader, and no silent reconnect inside redis-py (retries=0), which would
    # come back without the hub's subscriptions; the listener reconnects and resubscribes.
    client = make_redis(
        settings.redis_target,
        max_connections=2,
        retries=0,
        health_check_interval=0,
        name=PUBSUB_CLIENT_NAME,
    )
    hub = ChannelHub(
        client,
        queue_size=settings.sse_queue_size,
        max_subscribers=settings.sse_max_subscribers,
        subscribe_timeout=settings.sse_subscribe_timeout_seconds,
        backoff_min=settings.pubsub_backoff_min_seconds,
        backoff_max=settings.pubsub_backoff_max_seconds,
        max_event_bytes=settings.sse_max_event_bytes,
        disconnect_check=settings.sse_disconnect_check_seconds,
        requeue=app[DELIVERIES].requeue,
    )
    app[HUB] = hub

    async def connected() -> None:
        if not hub.connected:
            raise ConnectionError("the SSE pub/sub listener is not connected to redis")

    app[SERVICE].add_check("pubsub", connected)
    tasks = [
        asyncio.create_task(hub.run(), name="sse-pubsub-listener"),
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
        await client.aclose()


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
        middlewares=[metrics_middleware, realm_middleware],
    )
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
