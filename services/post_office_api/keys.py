"""Every ``web.AppKey`` of the Post Office API (no string app keys)."""

from __future__ import annotations

from aiohttp import web

from services.post_office_api.auth import RealmKeys
from services.post_office_api.delivery import Deliveries
from services.post_office_api.endpoint import WebSocketEndpoints
from services.post_office_api.groups import GroupConsumers
from services.post_office_api.hub import ChannelHub
from services.post_office_api.ratelimit import RealmRateLimiter
from services.post_office_api.settings import ApiSettings
from shared.registry import Registry

__all__ = [
    "DELIVERIES",
    "ENDPOINTS",
    "GROUPS",
    "HUB",
    "OPENAPI",
    "RATE_LIMITER",
    "REALM",
    "REALM_KEYS",
    "REGISTRY",
    "SETTINGS",
]

SETTINGS = web.AppKey("settings", ApiSettings)
REALM_KEYS = web.AppKey("realm_keys", RealmKeys)
RATE_LIMITER = web.AppKey("rate_limiter", RealmRateLimiter)
REGISTRY = web.AppKey("registry", Registry)
DELIVERIES = web.AppKey("deliveries", Deliveries)
ENDPOINTS = web.AppKey("endpoints", WebSocketEndpoints)
HUB = web.AppKey("hub", ChannelHub)
GROUPS = web.AppKey("groups", GroupConsumers)
#: The OpenAPI document, serialised once at start.
OPENAPI = web.AppKey("openapi", bytes)
#: The realm a request authenticated as (set by the realm middleware).
REALM = web.RequestKey("realm", str)
