"""Every ``web.AppKey`` of the eviction worker (no string app keys)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.eviction_worker.reporter import TrafficCopReporter
from services.eviction_worker.settings import EvictionSettings
from services.eviction_worker.worker import Evictor

__all__ = ["EVICTOR", "REPORTER", "SETTINGS", "STOP"]

SETTINGS = web.AppKey("settings", EvictionSettings)
#: Set on shutdown: the pass loop takes no more work once it is set.
STOP = web.AppKey("stop", asyncio.Event)
EVICTOR = web.AppKey("evictor", Evictor)
REPORTER = web.AppKey("traffic_cop_reporter", TrafficCopReporter)
