"""The skeleton every Post Office process shares.

* :func:`base_app` — an ``aiohttp`` application with JSON errors, ``/health`` (liveness),
  ``/ready`` (200 only when every dependency answers, else 503 naming the failing ones) and
  ``/metrics`` (Prometheus text, by prometheus_client's own aiohttp handler).
* :func:`redis_context` and :func:`background` — cleanup contexts: every resource and every
  background task is created, yielded, cancelled and awaited by its owner (aiohttp's
  ``cleanup_ctx``), so nothing outlives the app and nothing leaks in tests.
* :func:`run` — uvloop, then ``web.run_app``'s loop with the guarded server of
  shared/http_server.py (header timeouts, a cap on pending connections, no inflated bodies,
  JSON answers to malformed requests). SIGTERM (or SIGINT) first runs the service's own
  drain (:func:`on_drain`: the gateway leaves Consul, hands over what it accepted and closes its
  sockets with 1001 there) while the server still reads from every connection, then aiohttp's
  shutdown: stop accepting, ``on_shutdown``, wait up to ``shutdown_timeout`` for in-flight
  handlers, run the cleanup contexts (Consul deregistration among them), exit 0. The service's
  drain comes first because aiohttp's shutdown starts by marking every connection closing, and
  a closing connection discards what it receives: frames a client sent during the drain would
  get no answer at all.
* :func:`fail` and :func:`supervise` — a process that cannot go on (a task that must run for
  the process's whole life has died, a dependency never answered at start) says so: ``/ready``
  answers 503 naming why, and under :func:`run` the process drains as on SIGTERM and then
  exits non-zero, so that its orchestrator restarts it rather than leaving a half-working
  process in rotation.
* :func:`spawn` — the one way a service starts a background task: named, supervised, and
  subject to the ``FAIL_TASKS`` test hook (a task named there raises :class:`InjectedFault` as
  it starts, so the tests can show that each task's death is noticed; production refuses the
  setting).

Every background task of every service is started by :func:`spawn` (directly, or through
:func:`background`) from a cleanup context that cancels and awaits it.

Exception tree::

    RuntimeError
     └── InjectedFault     a task named in FAIL_TASKS, failing on purpose
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_runner import GracefulExit
from redis.asyncio import Redis

from shared.http import (
    body_timeout_middleware,
    encoding_middleware,
    error_middleware,
    json_response,
    server_header,
)
from shared.http_server import ServerLimits, serve
from shared.metrics import metrics_handler
from shared.redis_client import make_redis
from shared.settings import HttpLimitSettings, ServiceSettings
from shared.tracing import tracing_middleware

__all__ = [
    "REDIS",
    "SERVICE",
    "InjectedFault",
    "ReadinessCheck",
    "ServiceState",
    "background",
    "base_app",
    "cancel_and_wait",
    "fail",
    "on_drain",
    "redis_context",
    "run",
    "run_service",
    "spawn",
    "supervise",
]

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]


@dataclass
class ServiceState:
    """What the skeleton knows of its process: identity, uptime, readiness checks, draining."""

    name: str
    instance: str
    started: float = field(default_factory=time.monotonic)
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    draining: bool = False
    check_timeout: float = 2.0
    #: Why the process gave up (see :func:`fail`); empty while it has not.
    failed: str = ""
    #: The exit code :func:`run` ends the process with (non-zero once :func:`fail` was called).
    exit_code: int = 0
    #: Set by :func:`run`: a failure stops the process. Off in tests that serve the app in
    #: the test's own event loop, where a failure only turns ``/ready`` 503.
    stop_on_failure: bool = False
    stopping: bool = field(default=False, repr=False)
    #: The service's drain (:func:`on_drain`), run before aiohttp's shutdown under :func:`run`.
    drains: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)
    #: Test hook (the ``FAIL_TASKS`` setting): background tasks that fail as they start.
    fail_tasks: frozenset[str] = frozenset()

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self.checks[name] = check

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    async def failing(self) -> dict[str, str]:
        """Run every check concurrently; name each one that fails, with why."""

        async def one(check: ReadinessCheck) -> str | None:
            try:
                await asyncio.wait_for(check(), self.check_timeout)
            except Exception as exc:  # a check that fails for any reason means not ready
                return f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
            return None

        names = list(self.checks)
        results = await asyncio.gather(*(one(self.checks[n]) for n in names))
        return {n: r for n, r in zip(names, results, strict=True) if r is not None}


SERVICE = web.AppKey("service", ServiceState)
REDIS = web.AppKey("redis", Redis)


async def _health(request: web.Request) -> web.Response:
    state = request.app[SERVICE]
    return json_response(
        {
            "status": "ok",
            "service": state.name,
            "instance": state.instance,
            "uptime_seconds": round(state.uptime, 3),
        }
    )


async def _ready(request: web.Request) -> web.Response:
    state = request.app[SERVICE]
    if state.failed:
        return json_response({"status": "failed", "failing": {"service": state.failed}}, 503)
    if state.draining:
        return json_response({"status": "draining", "failing": {"service": "draining"}}, 503)
    failing = await state.failing()
    checks = {name: failing.get(name, "ok") for name in state.checks}
    if failing:
        return json_response({"status": "unavailable", "failing": failing, "checks": checks}, 503)
    return json_response({"status": "ready", "checks": checks})


async def _mark_draining(app: web.Application) -> None:
    app[SERVICE].draining = True


def base_app(
    name: str,
    instance: str,
    *,
    client_max_size: int = 1024 * 1024,
    body_timeout: float = 30.0,
    middlewares: Iterable[Callable[..., Awaitable[web.StreamResponse]]] = (),
    fail_tasks: Iterable[str] = (),
) -> web.Application:
    """An application with JSON errors and the three operational routes already in place.

    ``middlewares`` (the service's own: authentication, budgets) run after the compressed-body
    refusal and before the body is read (within ``body_timeout``), so no body is read for a
    request its credentials already refuse. ``name`` is the service's entry in
    :mod:`shared.service_names`; ``fail_tasks`` is the ``FAIL_TASKS`` test hook (see
    :func:`spawn`)."""
    # Tracing outermost, so a request's span sees the status the error middleware settles on;
    # it is a pass-through unless tracing_context turned tracing on.
    app = web.Application(
        client_max_size=client_max_size,
        middlewares=[
            tracing_middleware,
            error_middleware,
            encoding_middleware,
            *middlewares,
            body_timeout_middleware(body_timeout),
        ],
    )
    app.on_response_prepare.append(server_header)
    app[SERVICE] = ServiceState(name=name, instance=instance, fail_tasks=frozenset(fail_tasks))
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", metrics_handler)
    app.on_shutdown.append(_mark_draining)
    return app


def redis_context(
    url: str,
    key: web.AppKey[Redis] = REDIS,
    *,
    max_connections: int = 64,
    check_name: str = "redis",
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that owns one pooled Redis client and registers its readiness check."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = make_redis(url, max_connections=max_connections, name=app[SERVICE].name)
        app[key] = client

        async def ping() -> None:
            await client.ping()

        app[SERVICE].add_check(check_name, ping)
        try:
            yield
        finally:
            await client.aclose()

    return ctx


def fail(app: web.Application, reason: str, exit_code: int = 1) -> None:
    """The process cannot go on: ``/ready`` answers 503 ``failed`` naming ``reason`` from now
    on, and under :func:`run` the process drains (``on_shutdown``, cleanup contexts) as on
    SIGTERM, then exits with ``exit_code``. Safe to call from any callback, more than once
    (the first reason wins), during start-up or while already draining."""
    state = app[SERVICE]
    if not state.failed:
        log.critical("%s cannot go on: %s", state.name, reason)
        state.failed = reason
        state.exit_code = exit_code
    if not state.stop_on_failure or state.stopping or state.draining:
        return
    state.stopping = True
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if state.draining:
            return  # a SIGTERM got there first; its drain is under way
        if not app.frozen:
            # Still starting: web.run_app runs its cleanup only once start-up has returned, so
            # stopping now would skip the cleanup contexts. Start-up is short; look again soon.
            loop.call_later(0.05, stop)
            return
        _begin_stop(app)

    loop.call_soon(stop)


def on_drain(app: web.Application, drain: Callable[[], Awaitable[None]]) -> None:
    """Run ``drain`` when the process is told to stop (SIGTERM, SIGINT, :func:`fail`), before
    aiohttp's own shutdown, while every connection is still read. It must be idempotent: under
    a test server (no :func:`run`) nothing calls it, so the service also calls it from
    ``on_shutdown``."""
    app[SERVICE].drains.append(drain)


def _begin_stop(app: web.Application) -> None:
    """Drain, then raise what web.run_app's own SIGTERM handler raises (GracefulExit), which
    makes it run aiohttp's shutdown and the cleanup contexts. Once only."""
    state = app[SERVICE]
    if state.draining:
        return
    state.draining = True
    loop = asyncio.get_running_loop()

    async def drain_then_exit() -> None:
        for drain in state.drains:
            try:
                await drain()
            except Exception:  # the shutdown must go on whatever a drain step did
                log.exception("drain step failed")

        def stop() -> None:
            raise GracefulExit

        loop.call_soon(stop)

    task = loop.create_task(drain_then_exit(), name="service-drain")
    _DRAINS.add(task)
    task.add_done_callback(_DRAINS.discard)


#: The drain task, owned here until it ends (it ends the process).
_DRAINS: set[asyncio.Task[None]] = set()


async def _install_signal_handlers(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _begin_stop, app)


def supervise(app: web.Application, task: asyncio.Task[Any]) -> None:
    """Watch a task that must run for the process's whole life: if it ends in any way but
    cancellation (an exception, or returning before the process drains), it is logged and the
    process fails (:func:`fail`). Returning once the drain has begun is how a loop honours a
    stop request (the eviction worker's), so that is not a failure."""

    def done(t: asyncio.Task[Any]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.error("background task %s died", t.get_name(), exc_info=exc)
            fail(app, f"background task {t.get_name()} died: {exc!r}"[:300])
        elif not app[SERVICE].draining:
            log.error("background task %s returned; it should run until shutdown", t.get_name())
            fail(app, f"background task {t.get_name()} ended")

    task.add_done_callback(done)


class InjectedFault(RuntimeError):
    """Raised by a task named in the ``FAIL_TASKS`` test hook, as it starts."""


async def _injected_fault(name: str, coro: Coroutine[Any, Any, Any]) -> None:
    coro.close()  # never started: nothing of it to clean up
    await asyncio.sleep(0)
    raise InjectedFault(f"{name} failed on purpose (FAIL_TASKS test hook)")


def spawn(
    app: web.Application,
    name: str,
    coro: Coroutine[Any, Any, Any],
    *,
    critical: bool = True,
) -> asyncio.Task[Any]:
    """Start a background task named ``name`` for ``app``; the caller owns it (cancels and
    awaits it at cleanup). ``critical`` (the default): its end fails the process
    (:func:`supervise`); otherwise a death is only logged, never silently lost. A name listed
    in the ``FAIL_TASKS`` test hook gets a task that raises :class:`InjectedFault` instead."""
    if name in app[SERVICE].fail_tasks:
        coro = _injected_fault(name, coro)
    task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
    if critical:
        supervise(app, task)
    else:

        def report(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s died", name, exc_info=t.exception())

        task.add_done_callback(report)
    return task


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, recancel_after: float = 1.0
) -> None:
    """Cancel ``tasks`` and wait until every one has ended; never raises what a task raised
    (a task that died was reported by :func:`spawn` already).

    A task that swallows its cancellation (redis-py can lose a cancel that lands while it
    connects) is cancelled again every ``recancel_after`` seconds, with a warning, so that
    a cleanup context never hangs the process's exit."""
    pending = set(tasks)
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=recancel_after)
        for task in pending:
            log.warning(
                "background task %s ignored its cancellation; cancelling again", task.get_name()
            )
            task.cancel()


def background(
    name: str,
    factory: Callable[[web.Application], Coroutine[Any, Any, None]],
    *,
    critical: bool = False,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context owning one background task: started with the app, cancelled and
    awaited at cleanup. A task that dies unexpectedly is logged, never silently lost; with
    ``critical`` its end also fails the process (:func:`supervise`)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = spawn(app, name, factory(app), critical=critical)
        try:
            yield
        finally:
            await cancel_and_wait([task])

    return ctx


def run(
    app: web.Application | Awaitable[web.Application],
    host: str,
    port: int,
    shutdown_timeout: float,
    limits: ServerLimits | None = None,
) -> None:
    """Serve with uvloop until SIGTERM/SIGINT, then drain (see module docstring). After a
    :func:`fail`, the drain runs the same way and the process then exits with its code.
    ``limits`` bound connections before any handler (shared/http_server.py)."""
    import uvloop

    state = app[SERVICE] if isinstance(app, web.Application) else None
    if state is not None and isinstance(app, web.Application):
        state.stop_on_failure = True
        # Our own SIGTERM/SIGINT handlers, installed at start-up over the runner's: the
        # service's drain first, see above.
        app.on_startup.append(_install_signal_handlers)
    serve(app, host, port, shutdown_timeout, limits or ServerLimits(), uvloop.new_event_loop())
    if state is not None and state.exit_code:
        raise SystemExit(state.exit_code)


def run_service(app: web.Application, settings: ServiceSettings) -> None:
    """:func:`run` on the service's listen address, drain time and ``HTTP_*`` limits."""
    if not isinstance(settings, HttpLimitSettings):
        raise TypeError(f"{type(settings).__name__} lacks the HTTP_* limits (HttpLimitSettings)")
    run(
        app,
        settings.host,
        settings.port,
        settings.shutdown_timeout,
        ServerLimits.of(settings),
    )
