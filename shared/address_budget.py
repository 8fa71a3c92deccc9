"""A per-client-address budget for unauthenticated work: token buckets, a bounded table.

What costs a service work before it knows who is asking is limited per client address
(``UNAUTH_RATE_PER_SECOND`` tokens a second, bursts of ``UNAUTH_BURST``, at most
``UNAUTH_ADDRESSES`` addresses remembered):

* an *upgrade path* (the gateway's ``/ws``) takes a token before the handler runs, since the
  token in it is checked by Traffic Cop, a call each: a flood of upgrades with random tokens
  costs at most the budget in validations. The handler may give the token back once the
  session is valid (:func:`refund`), so that only refused tokens count;
* any other request is charged only when it is refused for the caller's own credentials: a
  401 with ``WWW-Authenticate`` (a missing or wrong realm or service key; not Traffic Cop's
  401 for a session token it was asked about, which has none). An address that spent its
  budget on wrong keys is answered 429 on every request but the operational ones
  (``/health``, ``/ready``, ``/metrics``) until the bucket refills. A request with good
  credentials costs nothing, however many run at once.

Past the budget: 429 JSON ``rate_limited`` with ``Retry-After`` (seconds until a token).

The client address is the peer's, unless the peer is one of ``TRUSTED_PROXIES``: then it is
the right-most ``X-Forwarded-For`` address that is no trusted proxy (what the proxy saw). An
IPv6 client is budgeted by its /64, which one host usually holds whole.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable

import prometheus_client
from aiohttp import hdrs, web

from shared.http import Handler, json_error
from shared.protocol import ErrorCode
from shared.ratelimit import KeyedBuckets
from shared.settings import HttpLimitSettings

__all__ = [
    "BUDGET",
    "OPERATIONAL_PATHS",
    "AddressBudget",
    "ClientAddress",
    "address_budget_middleware",
    "refund",
]

#: Never charged nor refused: probes and scrapers come from inside.
OPERATIONAL_PATHS = frozenset({"/health", "/ready", "/metrics"})

REFUSED = prometheus_client.Counter(
    "postoffice_unauthenticated_refused",
    "Requests answered 429 because their client address spent its unauthenticated budget",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    """Which address a request comes from, through trusted proxies."""

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(p, strict=False) for p in trusted_proxies
        )

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def of(self, request: web.BaseRequest) -> str:
        return self.resolve(request.remote or "", request.headers.getall(hdrs.X_FORWARDED_FOR, ()))

    def resolve(self, peer: str, forwarded_for: Iterable[str] = ()) -> str:
        """The budget key of a client seen at ``peer`` with these X-Forwarded-For headers."""
        if self.trusted and self._trusted(peer):
            forwarded = [part.strip() for header in forwarded_for for part in header.split(",")]
            for address in reversed(forwarded):
                if address and not self._trusted(address):
                    return _key(address)
        return _key(peer)


def _key(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address (a forwarded "unknown"): one bucket for all such
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AddressBudget:
    def __init__(
        self,
        rate: float,
        burst: int,
        capacity: int,
        trusted_proxies: Iterable[str] = (),
        upgrade_paths: Iterable[str] = (),
    ) -> None:
        self.buckets = KeyedBuckets(rate, burst, capacity)
        self.addresses = ClientAddress(trusted_proxies)
        self.upgrade_paths = frozenset(upgrade_paths)

    @classmethod
    def of(cls, settings: HttpLimitSettings, upgrade_paths: Iterable[str] = ()) -> AddressBudget:
        """From a service's ``UNAUTH_*`` and ``TRUSTED_PROXIES`` settings."""
        return cls(
            settings.unauth_rate_per_second,
            settings.unauth_burst,
            settings.unauth_addresses,
            settings.trusted_proxy_list,
            upgrade_paths,
        )


BUDGET = web.AppKey("address_budget", AddressBudget)
_CHARGED = web.RequestKey("address_budget_charged", str)


def _refused(wait: float) -> web.Response:
    REFUSED.inc()
    return json_error(
        429,
        ErrorCode.RATE_LIMITED,
        "too many unauthenticated requests from this address; retry later",
        {"Retry-After": str(max(1, math.ceil(wait)))},
    )


@web.middleware
async def address_budget_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Install with ``app[BUDGET]`` set, before any authentication middleware."""
    if request.path in OPERATIONAL_PATHS:
        return await handler(request)
    budget = request.app[BUDGET]
    address = budget.addresses.of(request)
    if request.path in budget.upgrade_paths:
        wait = budget.buckets.take(address)
        if wait:
            return _refused(wait)
        request[_CHARGED] = address
        return await handler(request)
    wait = budget.buckets.wait(address)
    if wait:
        return _refused(wait)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if _refuses_credentials(exc):
            budget.buckets.spend(address)
        raise
    if _refuses_credentials(response):
        budget.buckets.spend(address)
    return response


def _refuses_credentials(response: web.StreamResponse) -> bool:
    return response.status == 401 and hdrs.WWW_AUTHENTICATE in response.headers


def refund(request: web.Request) -> None:
    """An upgrade's credentials turned out valid: give its token back (once)."""
    address = request.get(_CHARGED)
    if address is not None:
        del request[_CHARGED]
        request.app[BUDGET].buckets.refund(address)
