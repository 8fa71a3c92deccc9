"""Service discovery: Consul when ``CONSUL_URL`` is set, environment variables otherwise.

Registration uses Consul's agent HTTP API (``PUT /v1/agent/service/register`` with an HTTP
check on the service's ``/health``, ``PUT /v1/agent/service/deregister/<id>`` on shutdown);
lookup uses ``GET /v1/health/service/<name>?passing=true`` so only instances whose check
passes are returned. The calls are made with aiohttp against the documented HTTP API rather
than through a client library, so what the code sends is exactly what the docs describe and
what the tests exercise (no Consul binary is available on the development machines; the tests
run ``tests/consul_api.py``, a stand-in that runs the checks; the compose stack runs the real
Consul).

Failure behaviour, in one place:

* lookups are cached for ``cache_seconds`` and concurrent lookups of one service share one
  request, so discovery is never a round trip per call;
* Consul unreachable: the last answer it gave is used (for up to ``stale_seconds``), then the
  environment fallback, then :class:`DiscoveryError`;
* Consul reachable but no passing instance: the fallback when one is configured, else
  :class:`DiscoveryError`;
* registration retries with capped, jittered backoff until Consul answers, and re-registers when
  the agent has forgotten the service (an agent restart, or the reaper after a long stall);
* deregistration runs at cleanup, or earlier: ``app[DEREGISTER]()`` lets a service leave Consul
  at the very start of its drain (the gateway does, in ``on_shutdown``), so nothing is routed
  to it while it finishes its work. It runs once, whichever comes first.

Exception tree::

    Exception
     └── DiscoveryError        no instance of the service could be found
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from shared.backoff import backoff
from shared.service import cancel_and_wait, spawn
from shared.service_names import TRAFFIC_COP_SERVICE, ServiceName

__all__ = [
    "DEREGISTER",
    "REGISTRATION_TASK",
    "Discovery",
    "DiscoveryError",
    "registration_context",
    "traffic_cop_resolver",
]

log = logging.getLogger(__name__)

#: The name of the task that keeps a service registered (supervised: see shared.service).
REGISTRATION_TASK = "consul-registration"

#: Set by :func:`registration_context` (when Consul is configured): leave Consul now, and stop
#: re-registering. Idempotent; the context's cleanup calls it too.
DEREGISTER: web.AppKey[Callable[[], Awaitable[None]]] = web.AppKey("consul_deregister")


class DiscoveryError(Exception):
    """No instance of a service could be found (neither in Consul nor in the fallback)."""


def _strip(urls: Sequence[str]) -> list[str]:
    return [u.rstrip("/") for u in urls if u]


class Discovery:
    """Resolve a service name to base URLs, with a short cache so lookups are not per request."""

    def __init__(
        self,
        consul_url: str | None,
        *,
        cache_seconds: float = 5.0,
        stale_seconds: float = 300.0,
        timeout: float = 2.0,
        token: str | None = None,
    ) -> None:
        self.consul_url = consul_url.rstrip("/") if consul_url else None
        self.cache_seconds = cache_seconds
        self.stale_seconds = stale_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"X-Consul-Token": token} if token else {}
        # service -> (when Consul last answered, its answer)
        self._cache: dict[str, tuple[float, list[str]]] = {}
        # service -> when the last failed lookup happened: Consul is not asked again sooner
        # than cache_seconds after a failure, so an outage does not cost a timeout per call.
        self._failed: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[list[str]]] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout, headers=self._headers)
        return self._session

    async def resolve_all(self, service: str, fallback: Sequence[str] = ()) -> list[str]:
        """Base URLs of every healthy instance; the fallback when Consul is off or has none."""
        if self.consul_url is None:
            if not _strip(fallback):
                raise DiscoveryError(f"no URL configured for {service!r} and no CONSUL_URL")
            return _strip(fallback)
        now = time.monotonic()
        cached = self._cache.get(service)
        if cached and now - cached[0] < self.cache_seconds:
            urls = cached[1]
        elif now - self._failed.get(service, -1e9) < self.cache_seconds:
            urls = self._stale(service, now)
        else:
            urls = await self._lookup_once(service)
        if urls:
            return urls
        if _strip(fallback):
            return _strip(fallback)
        raise DiscoveryError(f"no healthy instance of {service!r} in Consul at {self.consul_url}")

    def _stale(self, service: str, now: float) -> list[str]:
        cached = self._cache.get(service)
        if cached and now - cached[0] < self.stale_seconds:
            return cached[1]
        return []

    async def _lookup_once(self, service: str) -> list[str]:
        """One Consul request per service at a time; concurrent callers share its answer. The
        request runs in a task the Discovery owns, so a caller that is cancelled does not
        cancel it for the others."""
        task = self._inflight.get(service)
        if task is None:
            task = asyncio.create_task(self._lookup(service), name=f"consul-lookup-{service}")
            self._inflight[service] = task
            task.add_done_callback(lambda _t: self._inflight.pop(service, None))
        return await asyncio.shield(task)

    async def _lookup(self, service: str) -> list[str]:
        try:
            urls = await self._consul_lookup(service)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning(
                "consul lookup of %s failed, using the last answer or the fallback: %r",
                service,
                exc,
            )
            self._failed[service] = time.monotonic()
            return self._stale(service, time.monotonic())
        self._cache[service] = (time.monotonic(), urls)
        self._failed.pop(service, None)
        return urls

    async def resolve(self, service: str, fallback: str | None = None) -> str:
        """One base URL, round-robin over healthy instances."""
        urls = await self.resolve_all(service, (fallback,) if fallback else ())
        counter = self._rr.setdefault(service, itertools.count())
        return urls[next(counter) % len(urls)]

    async def _consul_lookup(self, service: str) -> list[str]:
        url = f"{self.consul_url}/v1/health/service/{service}"
        async with self._client().get(url, params={"passing": "true"}) as resp:
            resp.raise_for_status()
            entries: Any = await resp.json(content_type=None)
        if not isinstance(entries, list):
            raise ValueError(
                f"unexpected answer from consul for {service!r}: {type(entries).__name__}"
            )
        urls = []
        for entry in entries:
            svc = entry.get("Service") or {}
            address = svc.get("Address") or (entry.get("Node") or {}).get("Address")
            port = svc.get("Port")
            if address and port:
                host = f"[{address}]" if ":" in address else address
                urls.append(f"http://{host}:{port}")
        return sorted(urls)


def registration_context(
    service: ServiceName | str,
    instance_id: str,
    address: str,
    port: int,
    consul_url: str | None,
    *,
    check_interval: str = "10s",
    check_timeout: str = "5s",
    deregister_after: str = "1m",
    tags: Sequence[str] | None = None,
    check_path: str | None = None,
    meta: dict[str, str] | None = None,
    refresh_seconds: float = 30.0,
    retry_base: float = 0.5,
    retry_cap: float = 15.0,
    token: str | None = None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that registers this process in Consul and deregisters it at shutdown.

    Without ``consul_url`` it does nothing. Registration runs in a task the context owns: a
    Consul that does not answer at start is retried with capped, jittered backoff (the service
    works meanwhile; the env fallback still applies), and every ``refresh_seconds`` the agent
    is asked whether it still knows the service, which is registered again if not. The task is
    supervised (:func:`shared.service.spawn`): one that dies fails the process.

    ``service`` is an entry of :mod:`shared.service_names` (its name, tags and check path are
    registered) or, for tests, a bare name; ``tags`` and ``check_path`` override the entry's."""
    if isinstance(service, ServiceName):
        name = service.name
        tags = service.tags if tags is None else tags
        check_path = service.check_path if check_path is None else check_path
    else:
        name = service
    check_path = check_path or "/health"

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if not consul_url:
            yield
            return
        base = consul_url.rstrip("/")
        service_id = f"{name}-{instance_id}"
        body = {
            "ID": service_id,
            "Name": name,
            "Address": address,
            "Port": port,
            "Tags": list(tags or ()),
            "Meta": dict(meta or {}),
            "Check": {
                "HTTP": f"http://{address}:{port}{check_path}",
                "Interval": check_interval,
                "Timeout": check_timeout,
                "DeregisterCriticalServiceAfter": deregister_after,
            },
        }
        headers = {"X-Consul-Token": token} if token else {}
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3), headers=headers)

        async def register() -> None:
            async with session.put(f"{base}/v1/agent/service/register", json=body) as resp:
                if resp.status >= 400:
                    raise aiohttp.ClientResponseError(
                        resp.request_info,
                        resp.history,
                        status=resp.status,
                        message=(await resp.text())[:200],
                    )

        async def known() -> bool:
            async with session.get(f"{base}/v1/agent/service/{service_id}") as resp:
                if resp.status == 404:
                    return False
                resp.raise_for_status()
                return True

        async def keep_registered() -> None:
            attempt = 0
            registered = ever_registered = False
            while True:
                try:
                    if not registered or not await known():
                        await register()
                        # Once at INFO; again (Consul forgot it, or came back) only at DEBUG:
                        # a dev agent that drops it every refresh must not flood the logs.
                        (log.info if not ever_registered else log.debug)(
                            "registered %s in consul at %s", service_id, base
                        )
                        registered = ever_registered = True
                    attempt = 0
                    await asyncio.sleep(refresh_seconds)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    delay = backoff(attempt, retry_base, retry_cap)
                    (log.warning if attempt == 0 else log.debug)(
                        "consul registration of %s failed (retrying in %.1fs): %r",
                        service_id,
                        delay,
                        exc,
                    )
                    attempt += 1
                    registered = False
                    await asyncio.sleep(delay)

        task = spawn(app, REGISTRATION_TASK, keep_registered())
        deregistered = False

        async def deregister() -> None:
            nonlocal deregistered
            if deregistered:
                return
            deregistered = True
            # Stopped first, or it would register the service again.
            await cancel_and_wait([task])
            try:
                async with session.put(f"{base}/v1/agent/service/deregister/{service_id}") as resp:
                    if resp.status == 404:
                        log.info("%s was not registered in consul", service_id)
                    else:
                        resp.raise_for_status()
                        log.info("deregistered %s from consul", service_id)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("consul deregistration of %s failed: %r", service_id, exc)

        app[DEREGISTER] = deregister
        try:
            yield
        finally:
            try:
                await deregister()
            finally:
                await session.close()

    return ctx


def traffic_cop_resolver(
    discovery: Discovery, configured_url: str, trust_consul: bool
) -> Callable[[], Awaitable[str]]:
    """Where a caller sends Traffic Cop calls, which carry the service key and session tokens.

    Pinned to ``TRAFFIC_COP_URL`` unless ``TRAFFIC_COP_FROM_CONSUL`` says Consul is trusted:
    a Consul without ACLs (the compose stack's dev agent) lets any neighbour register a
    ``traffic-cop`` of its own and receive both. Without a configured URL, Consul it is."""

    async def resolve() -> str:
        if configured_url and not trust_consul:
            return configured_url
        return await discovery.resolve(TRAFFIC_COP_SERVICE.name, configured_url or None)

    return resolve
