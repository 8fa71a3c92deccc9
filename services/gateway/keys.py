"""Every ``web.AppKey`` of the gateway (no string app keys)."""

from __future__ import annotations

from aiohttp import web

from services.gateway.origins import OriginPolicy
from services.gateway.process import Gateway
from services.gateway.settings import GatewaySettings

__all__ = ["GATEWAY", "ORIGINS", "SETTINGS"]

SETTINGS = web.AppKey("settings", GatewaySettings)
GATEWAY = web.AppKey("gateway", Gateway)
ORIGINS = web.AppKey("origin_policy", OriginPolicy)
