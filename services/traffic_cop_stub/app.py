"""``create_app(settings)``: Traffic Cop's application, every resource in a cleanup context.

Its one background task is Consul's ``consul-registration`` (when ``CONSUL_URL`` is set),
supervised like every other (:func:`shared.service.spawn`).

Sessions live only in Redis. When Redis loses its data (:mod:`shared.epoch` notices within
``REDIS_EPOCH_CHECK_SECONDS``) every session is gone, and that is what Traffic Cop answers from
then on: a vanished session is invalid (``401 session_invalid`` on validate, registration of a
connection against it refused), exactly like a revoked or expired one. Nothing is rebuilt from
memory — a session revoked before the loss must never come back — so every client signs in
again: the gateways' re-assert registers each live connection again, is refused, and closes it
with 4401, which tells the client to get a new session token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from services.traffic_cop_stub.handlers import service_key_middleware
from services.traffic_cop_stub.keys import SETTINGS, STORE
from services.traffic_cop_stub.routes import setup_routes
from services.traffic_cop_stub.sessions import SessionStore
from services.traffic_cop_stub.settings import TrafficCopSettings
from shared.address_budget import BUDGET, AddressBudget, address_budget_middleware
from shared.discovery import registration_context
from shared.epoch import DataLoss, epoch_context
from shared.service import REDIS, base_app, redis_context
from shared.service_names import TRAFFIC_COP_SERVICE

__all__ = ["SERVICE_NAME", "create_app"]

log = logging.getLogger(__name__)

SERVICE_NAME = TRAFFIC_COP_SERVICE.name


async def _session_store(app: web.Application) -> AsyncIterator[None]:
    app[STORE] = SessionStore(app[REDIS])
    yield


def create_app(settings: TrafficCopSettings) -> web.Application:
    app = base_app(
        SERVICE_NAME,
        settings.instance,
        client_max_size=settings.max_body_bytes,
        body_timeout=settings.http_body_timeout_seconds,
        middlewares=[address_budget_middleware, service_key_middleware],
        fail_tasks=settings.failing_tasks,
    )
    app[BUDGET] = AddressBudget.of(settings)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(
        redis_context(settings.redis_target, max_connections=settings.redis_max_connections)
    )
    app.cleanup_ctx.append(_session_store)

    async def sessions_lost(loss: DataLoss) -> None:
        log.error(
            "Redis lost its data: every session issued before is gone and now invalid (401 "
            "session_invalid); their clients must sign in again (gateways close them 4401)"
        )

    app.cleanup_ctx.append(
        epoch_context(SERVICE_NAME, sessions_lost, settings.redis_epoch_check_seconds)
    )
    # Registered last so it is deregistered first: Consul stops sending callers here before
    # Redis goes away.
    app.cleanup_ctx.append(
        registration_context(
            TRAFFIC_COP_SERVICE,
            settings.instance,
            settings.advertised_host,
            settings.port,
            settings.consul_url or None,
        )
    )
    setup_routes(app)
    return app
