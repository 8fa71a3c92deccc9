"""Traffic Cop settings: environment variables ``TRAFFIC_COP_*`` (``--help`` lists them)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from shared.settings import SettingsError, masked_repr, setting

__all__ = ["DESCRIPTION", "PREFIX", "Settings"]

PREFIX = "TRAFFIC_COP_"
DESCRIPTION = "Traffic Cop: Post Office's session service (python -m services.traffic_cop_stub)."

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DEV_KEY_PREFIX = "dev-"


@dataclass(frozen=True, repr=False)
class Settings:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8300, "port to listen on", minimum=1, maximum=65535)
    instance_id: str = setting(
        "", "this instance's id in logs and Consul; empty: traffic-cop-<hostname>-<port>"
    )
    service_key: str = setting(
        "dev-traffic_cop",
        "bearer key every caller must present; keys starting with 'dev-' are refused in production",
        secret=True,
    )
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding the sessions", common=True)
    redis_max_connections: int = setting(64, "Redis connection pool size", minimum=1)
    default_ttl_seconds: int = setting(
        3600, "session lifetime when POST /v1/sessions gives no ttl_seconds", minimum=1
    )
    max_ttl_seconds: int = setting(86400, "longest ttl_seconds a session may ask for", minimum=1)
    max_body_bytes: int = setting(
        16384, "largest request body accepted; larger ones get 413", minimum=256
    )
    shutdown_timeout: float = setting(
        10.0, "seconds SIGTERM waits for in-flight requests before exiting", minimum=0
    )
    consul_url: str = setting(
        "", "Consul agent to register with; empty: no registration", common=True
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL", common=True)
    environment: str = setting(
        "development",
        "development or production (production refuses development keys)",
        common=True,
        choices=("development", "production"),
    )

    __repr__ = masked_repr

    def validate(self) -> None:
        """Cross-field checks; raise :class:`SettingsError` naming the variable."""
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise SettingsError(
                f"{PREFIX}DEFAULT_TTL_SECONDS={self.default_ttl_seconds!r}: must not exceed "
                f"{PREFIX}MAX_TTL_SECONDS={self.max_ttl_seconds!r}"
            )
        if self.log_level.upper() not in _LOG_LEVELS:
            raise SettingsError(
                f"{PREFIX}LOG_LEVEL={self.log_level!r}: must be one of {', '.join(_LOG_LEVELS)}"
            )
        if not self.service_key:
            raise SettingsError(f"{PREFIX}SERVICE_KEY is empty: every caller must present a key")
        if self.environment == "production" and self.service_key.startswith(_DEV_KEY_PREFIX):
            # The value is a secret: name the variable, never show the key.
            raise SettingsError(
                f"{PREFIX}SERVICE_KEY: a development key ('{_DEV_KEY_PREFIX}...') is refused when "
                "ENVIRONMENT=production; set a real random key"
            )

    @property
    def instance(self) -> str:
        return self.instance_id or f"traffic-cop-{socket.gethostname()}-{self.port}"
