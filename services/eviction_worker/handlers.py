"""HTTP handlers beyond the skeleton's /health, /ready and /metrics."""

from __future__ import annotations

from aiohttp import web

from services.eviction_worker.keys import EVICTOR, REPORTER, SETTINGS
from shared.http import json_response

__all__ = ["status"]


async def status(request: web.Request) -> web.Response:
    """``GET /status``: the last pass's summary, the last error and the Traffic Cop backlog,
    so an operator sees what the worker did without reading logs."""
    app = request.app
    settings = app[SETTINGS]
    evictor = app[EVICTOR]
    last = evictor.last_summary
    return json_response(
        {
            "instance": settings.instance,
            "max_idle_seconds": settings.max_idle_seconds,
            "interval_seconds": settings.interval_seconds,
            "last_pass": last.as_dict() if last is not None else None,
            "last_error": evictor.last_error,
            "traffic_cop": app[REPORTER].summary(),
        }
    )
