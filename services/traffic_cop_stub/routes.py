"""Traffic Cop's routes (the operational ones, /health /ready /metrics, come from base_app)."""

from __future__ import annotations

from aiohttp import web

from services.traffic_cop_stub import handlers

__all__ = ["setup_routes"]


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sessions", handlers.create_session)
    app.router.add_post("/v1/sessions/validate", handlers.validate_session)
    app.router.add_delete("/v1/sessions/{session_token}", handlers.revoke_session)
    app.router.add_post("/v1/connections", handlers.register_connection)
    app.router.add_delete("/v1/connections/{connection_id}", handlers.unregister_connection)
