"""Settings of the Post Office API, read from ``POST_OFFICE_*`` environment variables."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from shared.protocol import DEFAULT_CHANNELS
from shared.settings import SettingsError, masked_repr, setting

__all__ = ["DESCRIPTION", "DEV_KEY_PREFIX", "PREFIX", "REALMS", "ApiSettings", "parse_realm_keys"]

PREFIX = "POST_OFFICE_"
DESCRIPTION = (
    "Post Office API: the /v1 HTTP API realms and agents use to publish to agent channels, "
    "subscribe to them (Server-Sent Events) and deliver to connections, users and channels."
)

#: The realms of SPEC "Post Office HTTP API"; capabilities per realm are in auth.py.
REALMS: tuple[str, ...] = ("smart_city", "experience", "business_enablement")
#: Development keys start with this; production refuses them.
DEV_KEY_PREFIX = "dev-"


def parse_realm_keys(entries: tuple[str, ...]) -> dict[str, str]:
    """``("key:realm", ...)`` to ``{key: realm}``; raises :class:`SettingsError` on any defect.

    Values are never echoed in errors: they are secrets.
    """
    keys: dict[str, str] = {}
    for position, entry in enumerate(entries, 1):
        key, sep, realm = entry.rpartition(":")
        key, realm = key.strip(), realm.strip()
        if not sep or not key:
            raise SettingsError(
                f"{PREFIX}REALM_KEYS entry {position}: expected KEY:REALM (comma-separated)"
            )
        if realm not in REALMS:
            raise SettingsError(
                f"{PREFIX}REALM_KEYS entry {position}: unknown realm {realm!r}; "
                f"use one of {', '.join(REALMS)}"
            )
        if key in keys:
            raise SettingsError(f"{PREFIX}REALM_KEYS entry {position}: the key is listed twice")
        keys[key] = realm
    return keys


@dataclass(frozen=True, repr=False)
class ApiSettings:
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = setting(8200, "port to listen on", minimum=0, maximum=65535)
    advertise_host: str = setting(
        "", "address registered in Consul (default: HOST, or the hostname when HOST is 0.0.0.0)"
    )
    instance_id: str = setting(
        "", "this instance's id in logs and Consul (default: post-office-api-<hostname>-<port>)"
    )
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL", common=True)
    redis_max_connections: int = setting(64, "Redis connection pool size", minimum=1)
    consul_url: str = setting(
        "", "Consul agent URL; empty: no registration, env fallback", common=True
    )
    realm_keys: tuple[str, ...] = setting(
        (
            "dev-smart_city:smart_city",
            "dev-experience:experience",
            "dev-business_enablement:business_enablement",
        ),
        "realm keys, comma-separated KEY:REALM pairs; realms: smart_city, experience, "
        "business_enablement. ENVIRONMENT=production refuses keys starting with dev-",
        secret=True,
        common=True,
    )
    public_ws_url: str = setting(
        "",
        "public WebSocket URL handed out by GET /v1/websocket-endpoint (ws:// or wss://, e.g. "
        "the edge proxy's wss://example.com/ws); empty: a gateway found by discovery",
        common=True,
    )
    gateway_urls: tuple[str, ...] = setting(
        ("http://127.0.0.1:8100",),
        "gateway base URLs (comma-separated http://host:port) used when Consul has none",
        common=True,
    )
    otel_exporter_otlp_endpoint: str = setting(
        "", "OpenTelemetry collector (OTLP/HTTP) base URL; empty: no span export", common=True
    )
    channels: tuple[str, ...] = setting(DEFAULT_CHANNELS, "agent channels (comma-separated)")
    max_body_bytes: int = setting(
        65536, "largest request body; larger ones get 413", minimum=64, maximum=16 * 1024 * 1024
    )
    queue_max_length: int = setting(
        10000,
        "bound of an agent channel's queue (messages held while no agent listens); when it is "
        "full, publishing answers 503",
        minimum=1,
    )
    rate_limit_per_second: float = setting(
        1000.0,
        "requests a second each realm may make to this process (token bucket); past it 429 "
        "rate_limited with Retry-After; 0 disables the limit",
        minimum=0,
    )
    rate_limit_burst: int = setting(
        2000, "requests a realm may make in a burst above the steady rate", minimum=1
    )
    sse_keepalive_seconds: float = setting(
        15.0, "keep-alive comment interval on Server-Sent Events streams", minimum=0.01
    )
    sse_queue_size: int = setting(
        1000,
        "events held for one SSE subscriber that reads too slowly; past it the subscriber is "
        "dropped with a final `event: error` (code too_slow)",
        minimum=1,
    )
    sse_send_timeout_seconds: float = setting(
        30.0, "an SSE write stalled this long aborts that stream", minimum=0.01
    )
    sse_max_subscribers: int = setting(
        10000, "SSE streams one process serves at once; past it 503", minimum=1
    )
    sse_retry_ms: int = setting(
        1000,
        "reconnection delay (ms) an SSE stream advises its client (the `retry:` field)",
        minimum=0,
    )
    sse_subscribe_timeout_seconds: float = setting(
        5.0,
        "how long opening a stream waits for Redis to confirm the subscription (else 503)",
        minimum=0.01,
    )
    pubsub_backoff_min_seconds: float = setting(
        0.05, "first pause before re-connecting the pub/sub listener to Redis", minimum=0.001
    )
    pubsub_backoff_max_seconds: float = setting(
        5.0, "cap of the pub/sub listener's jittered exponential backoff", minimum=0.001
    )
    shutdown_timeout: float = setting(
        10.0, "on SIGTERM, how long in-flight requests may take to finish", minimum=0.0
    )
    log_level: str = setting("INFO", "log level: DEBUG, INFO, WARNING or ERROR", common=True)
    environment: str = setting(
        "development",
        "development or production (production refuses dev- realm keys)",
        common=True,
        choices=("development", "production"),
    )

    __repr__ = masked_repr

    @property
    def instance(self) -> str:
        return self.instance_id or f"post-office-api-{socket.gethostname()}-{self.port}"

    @property
    def advertised_host(self) -> str:
        """The address Consul hands to callers (never 0.0.0.0)."""
        if self.advertise_host:
            return self.advertise_host
        return socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host

    def validate(self) -> None:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(
                f"{PREFIX}LOG_LEVEL={self.log_level!r}: must be one of DEBUG, INFO, WARNING, ERROR"
            )
        if not self.channels:
            raise SettingsError(f"{PREFIX}CHANNELS: at least one channel is required")
        keys = parse_realm_keys(self.realm_keys)
        if not keys:
            raise SettingsError(f"{PREFIX}REALM_KEYS: at least one KEY:REALM pair is required")
        if self.environment == "production" and any(k.startswith(DEV_KEY_PREFIX) for k in keys):
            raise SettingsError(
                f"{PREFIX}REALM_KEYS: ENVIRONMENT=production refuses development keys "
                f"(starting with {DEV_KEY_PREFIX!r}); set real keys"
            )
        if self.public_ws_url and not self.public_ws_url.startswith(("ws://", "wss://")):
            raise SettingsError(
                f"{PREFIX}PUBLIC_WS_URL={self.public_ws_url!r}: must start with ws:// or wss://"
            )
        for url in self.gateway_urls:
            if not url.startswith(("http://", "https://")):
                raise SettingsError(
                    f"{PREFIX}GATEWAY_URLS: {url!r} must start with http:// or https://"
                )
        if self.pubsub_backoff_min_seconds > self.pubsub_backoff_max_seconds:
            raise SettingsError(
                f"{PREFIX}PUBSUB_BACKOFF_MIN_SECONDS is larger than "
                f"{PREFIX}PUBSUB_BACKOFF_MAX_SECONDS"
            )
