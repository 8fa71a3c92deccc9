"""Service discovery: Consul when ``CONSUL_URL`` is set, environment variables otherwise.

Registration uses Consul's agent HTTP API (``PUT /v1/agent/service/register`` with an HTTP
check on the service's ``/health``, ``PUT /v1/agent/service/deregister/<id>`` on shutdown);
lookup uses ``GET /v1/health/service/<name>?passing=true`` so only instances whose check
passes are returned. The calls are made with aiohttp against the documented HTTP API rather
than through a client library, so what the code sends is exactly what the docs describe and
what the tests exercise (no Consul binary is available on the development machines; the
compose stack runs the real one).

Exception tree::

    Exception
     └── DiscoveryError        no instance of the service could be found
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

__all__ = [
    "API_SERVICE",
    "EVICTION_SERVICE",
    "GATEWAY_SERVICE",
    "TRAFFIC_COP_SERVICE",
    "Discovery",
    "DiscoveryError",
    "registration_context",
]

log = logging.getLogger(__name__)

# Consul service names.
GATEWAY_SERVICE = "post-office-gateway"
API_SERVICE = "post-office-api"
TRAFFIC_COP_SERVICE = "traffic-cop"
EVICTION_SERVICE = "eviction-worker"


class DiscoveryError(Exception):
    """No instance of a service could be found (neither in Consul nor in the fallback)."""


class Discovery:
    """Resolve a service name to base URLs, with a short cache so lookups are not per request."""

    def __init__(self, consul_url: str | None, *, cache_seconds: float = 5.0, timeout: float = 2.0) -> None:
        self.consul_url = consul_url.rstrip("/") if consul_url else None
        self.cache_seconds = cache_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def resolve_all(self, service: str, fallback: Sequence[str] = ()) -> list[str]:
        """Base URLs of every healthy instance; the fallback when Consul is off or has none."""
        if self.consul_url is None:
            if not fallback:
                raise DiscoveryError(f"no URL configured for {service!r} and no CONSUL_URL")
            return [u.rstrip("/") for u in fallback]
        cached = self._cache.get(service)
        if cached and time.monotonic() - cached[0] < self.cache_seconds:
            return cached[1]
        try:
            urls = await self._consul_lookup(service)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("consul lookup of %s failed: %r", service, exc)
            urls = cached[1] if cached else []
        if not urls:
            if fallback:
                return [u.rstrip("/") for u in fallback]
            raise DiscoveryError(f"no healthy instance of {service!r} in Consul at {self.consul_url}")
        self._cache[service] = (time.monotonic(), urls)
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
            entries: list[dict[str, Any]] = await resp.json()
        urls = []
        for entry in entries:
            svc = entry.get("Service") or {}
            address = svc.get("Address") or (entry.get("Node") or {}).get("Address")
            port = svc.get("Port")
            if address and port:
                urls.append(f"http://{address}:{port}")
        return urls


def registration_context(
    service: str,
    instance_id: str,
    address: str,
    port: int,
    consul_url: str | None,
    *,
    check_interval: str = "10s",
    deregister_after: str = "1m",
    tags: Sequence[str] = (),
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that registers this process in Consul at start and deregisters it at
    shutdown. Without ``consul_url`` it does nothing. A Consul that does not answer at start is
    logged, not fatal: the service works without discovery, and the env fallback still applies."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if not consul_url:
            yield
            return
        base = consul_url.rstrip("/")
        service_id = f"{service}-{instance_id}"
        body = {
            "ID": service_id,
            "Name": service,
            "Address": address,
            "Port": port,
            "Tags": list(tags),
            "Check": {
                "HTTP": f"http://{address}:{port}/health",
                "Interval": check_interval,
                "DeregisterCriticalServiceAfter": deregister_after,
            },
        }
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                async with session.put(f"{base}/v1/agent/service/register", json=body) as resp:
                    resp.raise_for_status()
                log.info("registered %s in consul", service_id)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("consul registration of %s failed: %r", service_id, exc)
            try:
                yield
            finally:
                try:
                    async with session.put(f"{base}/v1/agent/service/deregister/{service_id}") as resp:
                        resp.raise_for_status()
                    log.info("deregistered %s from consul", service_id)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("consul deregistration of %s failed: %r", service_id, exc)

    return ctx
