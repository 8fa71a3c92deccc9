"""Every ``web.AppKey`` of Traffic Cop (no string app keys)."""

from __future__ import annotations

from aiohttp import web

from services.traffic_cop_stub.sessions import SessionStore
from services.traffic_cop_stub.settings import TrafficCopSettings

__all__ = ["SETTINGS", "STORE"]

SETTINGS = web.AppKey("settings", TrafficCopSettings)
STORE = web.AppKey("session_store", SessionStore)
