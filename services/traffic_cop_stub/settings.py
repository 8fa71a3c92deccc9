"""Traffic Cop settings: environment variables ``TRAFFIC_COP_*`` (``--help`` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import (
    HttpLimitSettings,
    ServiceSettings,
    SettingsError,
    TaskHookSettings,
    instance_id_setting,
    port_setting,
    setting,
)

__all__ = ["DESCRIPTION", "PREFIX", "TrafficCopSettings"]

PREFIX = "TRAFFIC_COP_"
DESCRIPTION = "Traffic Cop: Post Office's session service (python -m services.traffic_cop_stub)."


@dataclass(frozen=True, repr=False)
class TrafficCopSettings(HttpLimitSettings, ServiceSettings, TaskHookSettings):
    PREFIX = PREFIX
    INSTANCE_NAME = "traffic-cop"

    port: int = port_setting(8300)
    instance_id: str = instance_id_setting("traffic-cop-<hostname>-<port>")
    service_key: str = setting(
        "dev-traffic_cop",
        "bearer key every caller must present; ENVIRONMENT=production refuses keys starting with "
        "'dev-' (any case) or shorter than 32 characters",
        secret=True,
    )
    redis_max_connections: int = setting(64, "Redis connection pool size", minimum=1)
    default_ttl_seconds: int = setting(
        3600, "session lifetime when POST /v1/sessions gives no ttl_seconds", minimum=1
    )
    max_ttl_seconds: int = setting(86400, "longest ttl_seconds a session may ask for", minimum=1)
    max_body_bytes: int = setting(
        16384, "largest request body accepted; larger ones get 413", minimum=256
    )

    def validate(self) -> None:
        super().validate()
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise SettingsError(
                f"{PREFIX}DEFAULT_TTL_SECONDS={self.default_ttl_seconds!r}: must not exceed "
                f"{PREFIX}MAX_TTL_SECONDS={self.max_ttl_seconds!r}"
            )
        if not self.service_key:
            raise SettingsError(f"{PREFIX}SERVICE_KEY is empty: every caller must present a key")
        self.refuse_development_keys(f"{PREFIX}SERVICE_KEY", (self.service_key,))
