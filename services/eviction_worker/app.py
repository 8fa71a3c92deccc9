"""The eviction worker's application, and its run-once mode.

Cleanup contexts, in start order (torn down in reverse):

1. Redis (the skeleton's :func:`shared.service.redis_context`, which also makes ``/ready``);
2. the Traffic Cop client and its reporter task;
3. the pass loop;
4. the Redis epoch watch (:mod:`shared.epoch`): when Redis lost its data the loop's recovery
   grace starts, as after an outage;
5. Consul registration — deregistered first on shutdown.

SIGTERM, the arq way: ``on_shutdown`` sets the stop event, so the loop takes no new page;
the loop's context then waits up to ``SHUTDOWN_TIMEOUT`` for the pass in flight before
cancelling it, and the reporter gets what is left of that bound to send its backlog.

Supervision: the pass loop, the reporter and Consul's ``consul-registration`` are started
with :func:`shared.service.spawn`; one that dies (or a loop that returns before SIGTERM)
turns ``/ready`` 503 and ends the process with exit code 1 after the drain, so that its
orchestrator restarts it rather than leaving a worker that evicts nothing in rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from services.eviction_worker.keys import EVICTOR, REPORTER, SETTINGS, STOP
from services.eviction_worker.reporter import TrafficCopReporter
from services.eviction_worker.routes import setup_routes
from services.eviction_worker.settings import EvictionSettings
from services.eviction_worker.worker import Evictor
from shared.discovery import Discovery, registration_context, traffic_cop_resolver
from shared.epoch import DataLoss, epoch_context
from shared.redis_client import make_redis
from shared.service import REDIS, base_app, cancel_and_wait, redis_context, spawn
from shared.service_names import EVICTION_WORKER_SERVICE
from shared.traffic_cop_client import TrafficCopClient

__all__ = [
    "LOOP_TASK",
    "REPORTER_TASK",
    "SERVICE_NAME",
    "TASKS",
    "create_app",
    "run_once",
    "traffic_cop_reporter",
]

log = logging.getLogger(__name__)

SERVICE_NAME = EVICTION_WORKER_SERVICE.name
#: The worker's own background tasks, by name (the names the FAIL_TASKS test hook takes).
LOOP_TASK = "eviction-loop"
REPORTER_TASK = "traffic-cop-reporter"
TASKS = (LOOP_TASK, REPORTER_TASK)


@contextlib.asynccontextmanager
async def traffic_cop_reporter(
    settings: EvictionSettings, flush_timeout: float, app: web.Application | None = None
) -> AsyncIterator[TrafficCopReporter]:
    """A reporter with its client and background task; on exit the backlog gets up to
    ``flush_timeout`` seconds to go out, then the task is cancelled and awaited. With ``app``
    the task is supervised (:func:`shared.service.spawn`); run-once mode has no app."""
    discovery = Discovery(settings.consul_url or None)

    base_url = traffic_cop_resolver(
        discovery, settings.traffic_cop_url, settings.traffic_cop_from_consul
    )
    client = TrafficCopClient(
        base_url,
        settings.traffic_cop_service_key,
        timeout=settings.traffic_cop_timeout_seconds,
        pool_limit=settings.concurrency,
    )
    reporter = TrafficCopReporter(
        client,
        concurrency=settings.concurrency,
        limit=settings.traffic_cop_pending_limit,
        backoff_base=settings.traffic_cop_retry_base_seconds,
        backoff_cap=settings.traffic_cop_retry_cap_seconds,
    )
    task = (
        spawn(app, REPORTER_TASK, reporter.run())
        if app is not None
        else asyncio.create_task(reporter.run(), name=REPORTER_TASK)
    )
    try:
        yield reporter
    finally:
        if not await reporter.flush(flush_timeout):
            log.warning("%d traffic cop reports were still pending at exit", reporter.pending)
        await cancel_and_wait([task])
        await client.aclose()
        await discovery.aclose()


def create_app(settings: EvictionSettings) -> web.Application:
    app = base_app(
        SERVICE_NAME,
        settings.instance,
        body_timeout=settings.http_body_timeout_seconds,
        fail_tasks=settings.failing_tasks,
    )
    app[SETTINGS] = settings
    app[STOP] = asyncio.Event()
    # The deadline SIGTERM starts; both teardown waits draw on it.
    shutdown_deadline: list[float] = []

    async def reporter_ctx(app: web.Application) -> AsyncIterator[None]:
        async with traffic_cop_reporter(settings, 0.0, app) as reporter:
            app[REPORTER] = reporter
            yield
            remaining = shutdown_deadline[0] - time.monotonic() if shutdown_deadline else 0.0
            await reporter.flush(max(0.0, remaining))

    async def loop_ctx(app: web.Application) -> AsyncIterator[None]:
        stop = app[STOP]
        evictor = Evictor.from_settings(app[REDIS], settings, app[REPORTER], stop)
        app[EVICTOR] = evictor
        task = spawn(
            app,
            LOOP_TASK,
            evictor.run(settings.interval_seconds, settings.error_backoff_cap_seconds),
        )
        # The one line that says the worker is at work, and how (its passes log only changes).
        log.info(
            "eviction worker %s started: a pass every %ss, connections idle after %ss, "
            "up to %d ids per pass",
            settings.instance,
            settings.interval_seconds,
            settings.max_idle_seconds,
            settings.pass_limit,
        )
        try:
            yield
        finally:
            stop.set()
            if not shutdown_deadline:
                shutdown_deadline.append(time.monotonic() + settings.shutdown_timeout)
            done, _ = await asyncio.wait({task}, timeout=settings.shutdown_timeout)
            if not done:
                log.warning(
                    "the pass in flight outlived SHUTDOWN_TIMEOUT=%s: cancelled",
                    settings.shutdown_timeout,
                )
            await cancel_and_wait([task])

    async def stop_taking_work(app: web.Application) -> None:
        shutdown_deadline.append(time.monotonic() + settings.shutdown_timeout)
        app[STOP].set()

    app.cleanup_ctx.append(
        redis_context(settings.redis_target, max_connections=settings.concurrency + 4)
    )
    app.cleanup_ctx.append(reporter_ctx)
    app.cleanup_ctx.append(loop_ctx)

    async def data_lost(loss: DataLoss) -> None:
        app[EVICTOR].redis_lost_data()

    app.cleanup_ctx.append(
        epoch_context(SERVICE_NAME, data_lost, settings.redis_epoch_check_seconds)
    )
    app.cleanup_ctx.append(
        registration_context(
            EVICTION_WORKER_SERVICE,
            settings.instance,
            settings.advertised_host,
            settings.port,
            settings.consul_url or None,
        )
    )
    app.on_shutdown.append(stop_taking_work)
    setup_routes(app)
    return app


async def run_once(settings: EvictionSettings) -> dict[str, Any]:
    """One pass (for tests and cron): its summary plus what became of the Traffic Cop reports,
    which get up to ``SHUTDOWN_TIMEOUT`` seconds to go out."""
    redis = make_redis(
        settings.redis_target, max_connections=settings.concurrency + 4, name=SERVICE_NAME
    )
    try:
        async with traffic_cop_reporter(settings, settings.shutdown_timeout) as reporter:
            summary = await Evictor.from_settings(redis, settings, reporter).run_pass()
        return {**summary.as_dict(), "traffic_cop": reporter.summary()}
    finally:
        await redis.aclose()
