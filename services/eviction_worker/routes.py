"""Routes of the eviction worker. ``/health``, ``/ready`` and ``/metrics`` come from
:func:`shared.service.base_app`."""

from __future__ import annotations

from aiohttp import web

from services.eviction_worker import handlers

__all__ = ["setup_routes"]


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/status", handlers.status)
