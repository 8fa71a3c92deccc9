"""The gateway's routes (the operational ones, /health /ready /metrics, come from base_app)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from services.gateway import handlers
from shared.service_names import GATEWAY_SERVICE

__all__ = ["STATIC_DIR", "setup_routes"]

STATIC_DIR = Path(__file__).parent / "static"


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/ws", handlers.websocket)
    app.router.add_get("/", handlers.index)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    app.router.add_get(GATEWAY_SERVICE.check_path, handlers.health_summary)
    app.router.add_get(f"{GATEWAY_SERVICE.check_path}/detailed", handlers.health_detailed)
    # The pre-/ws endpoints answer a JSON 404 saying where to go; any other path gets the
    # error middleware's JSON 404.
    app.router.add_route("*", "/api/ws/{tail:.*}", handlers.legacy)
