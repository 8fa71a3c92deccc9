"""Gateway settings: environment variables ``GATEWAY_*`` (``--help`` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import (
    AgentStreamSettings,
    ChannelSettings,
    HttpLimitSettings,
    SettingsError,
    TaskHookSettings,
    TrafficCopCallerSettings,
    instance_id_setting,
    port_setting,
    setting,
)

__all__ = ["DESCRIPTION", "PREFIX", "GatewaySettings"]

PREFIX = "GATEWAY_"
DESCRIPTION = "Post Office gateway: the WebSocket ingress /ws (python -m services.gateway)."


@dataclass(frozen=True, repr=False)
class GatewaySettings(
    HttpLimitSettings,
    TrafficCopCallerSettings,
    ChannelSettings,
    AgentStreamSettings,
    TaskHookSettings,
):
    PREFIX = PREFIX
    INSTANCE_NAME = "gateway"

    port: int = port_setting(8100)
    instance_id: str = instance_id_setting("gateway-<hostname>-<port>", "Redis, logs and Consul")
    redis_max_connections: int = setting(
        64,
        "Redis connection pool size (pub/sub has its own); connects and disconnects use at most "
        "all but 8 of them at once, the rest stay for the publisher and housekeeping",
        minimum=12,
    )
    traffic_cop_max_connections: int = setting(
        32, "most concurrent calls to Traffic Cop (more wait for a free connection)", minimum=1
    )
    public_ws_url: str = setting(
        "", "public WebSocket URL (ws[s]://edge/ws); its origin is allowed too", common=True
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        "comma-separated browser origins allowed to open /ws ('*' allows any); empty: the "
        "gateway's own origin, PUBLIC_WS_URL's, and http(s)://localhost|127.0.0.1|[::1] on any "
        "port. "
        "A request without Origin (not a browser) is always let through to token validation",
        common=True,
    )
    max_frame_bytes: int = setting(
        65536, "largest client frame; a larger one closes the socket with 1009", minimum=256
    )
    rate_limit_per_second: float = setting(
        50.0,
        "client frames per second a connection may send on average (token bucket)",
        minimum=0.001,
    )
    rate_limit_burst: int = setting(
        100, "token bucket size: frames a connection may send at once", minimum=1
    )
    rate_limit_close_after: int = setting(
        20, "consecutive rate-limited frames after which the socket is closed with 4429", minimum=1
    )
    send_queue_frames: int = setting(
        1024,
        "frames waiting to be written to one socket; past it the socket is closed with 1013",
        minimum=1,
    )
    send_queue_bytes: int = setting(
        4 * 1024 * 1024,
        "bytes waiting to be written to one socket; past it the socket is closed with 1013",
        minimum=1024,
    )
    close_flush_seconds: float = setting(
        1.0,
        "on a close (but 1013 'too slow'), how long frames already queued for the socket (acks "
        "included) may take to be written before the Close frame",
        minimum=0,
    )
    max_connections: int = setting(
        10000,
        "open sockets this instance holds (validating included); past it a new socket is "
        "closed with 1013 'overloaded' before its token is checked",
        minimum=1,
    )
    max_connections_per_session: int = setting(
        16,
        "sockets one session may hold on this instance; past it a new one is closed with 4429",
        minimum=1,
    )
    invalid_token_cache_seconds: float = setting(
        5.0,
        "how long a token Traffic Cop refused is refused again without asking it (0: never)",
        minimum=0,
    )
    invalid_token_cache_size: int = setting(
        10000, "most refused tokens remembered (as sha256; the oldest are forgotten)", minimum=1
    )
    session_check_seconds: float = setting(
        30.0,
        "how often the sessions of held sockets are checked in Redis (one pipeline), besides "
        "after every pub/sub (re)subscription; a revoked or expired one is closed with 4401",
        minimum=0.05,
    )
    pong_rate_per_second: float = setting(
        1.0,
        "app pongs per second that cost nothing; past it (and its burst) a pong costs a "
        "message token like any frame",
        minimum=0.001,
    )
    pong_burst: int = setting(5, "app pongs a connection may send at once for free", minimum=1)
    unregister_retry_attempts: int = setting(
        5,
        "retries of a Traffic Cop connection unregister that failed (Traffic Cop down)",
        minimum=0,
    )
    unregister_retry_base_seconds: float = setting(
        1.0,
        "first wait before retrying an unregister; doubled each time, at most 60 s",
        minimum=0.01,
    )
    unregister_retry_pending: int = setting(
        10000,
        "most unregisters waiting for a retry (past it the oldest is given up: Traffic Cop's "
        "TTLs clean up)",
        minimum=1,
    )
    record_metadata_bytes: int = setting(
        4096,
        "largest session metadata (JSON) copied into the connection record; larger: stored as "
        '{"truncated": true}',
        minimum=2,
    )
    heartbeat_interval: float = setting(
        30.0,
        "seconds between app pings (and protocol pings); announced in the welcome frame",
        minimum=0.05,
    )
    max_idle_seconds: float = setting(
        300.0,
        "a connection silent this long is closed with 1008 'idle' and evicted",
        common=True,
        minimum=0.1,
    )
    liveness_flush_seconds: float = setting(
        5.0, "how often last-seen times are written to Redis (one pipeline per tick)", minimum=0.01
    )
    record_ttl_seconds: float = setting(
        0.0,
        "TTL of a connection record, refreshed by the liveness flush; 0: the larger of one day "
        "and 2 x MAX_IDLE_SECONDS. A last resort only: the eviction worker removes records and "
        "their index entries; a record that expires instead leaves its index entries behind",
        minimum=0,
    )
    instance_ttl_seconds: float = setting(
        30.0, "TTL of websocket:gateway:<instance>; refreshed every third of it", minimum=0.3
    )
    publish_batch: int = setting(256, "most messages published in one Redis round trip", minimum=1)
    publish_queue: int = setting(
        10000,
        "messages waiting for the publisher; past it clients get error 'unavailable'",
        minimum=1,
    )
    publish_timeout_seconds: float = setting(
        0.5,
        "longest a publish round trip may take before its messages are acked 'queued' and held "
        "by the breaker (a stalled Redis never holds acks longer; a batch whose outcome is "
        "unknown is re-sent with the same message ids)",
        minimum=0.01,
    )
    breaker_buffer: int = setting(
        10000,
        "messages held in memory while Redis is down (acked 'queued'); past it 'unavailable'",
        minimum=0,
    )
    breaker_backoff_base_seconds: float = setting(
        0.1, "first wait before probing Redis again", minimum=0.001
    )
    breaker_backoff_cap_seconds: float = setting(
        5.0, "longest wait between Redis probes", minimum=0.001
    )
    pubsub_backoff_base_seconds: float = setting(
        0.05, "first wait before reconnecting pub/sub", minimum=0.001
    )
    pubsub_backoff_cap_seconds: float = setting(
        5.0, "longest wait between pub/sub reconnects", minimum=0.001
    )
    compress: bool = setting(False, "permessage-deflate on sockets (costs CPU per frame)")
    startup_wait_seconds: float = setting(
        30.0, "how long start waits for Redis and Traffic Cop before exiting non-zero", minimum=0
    )
    close_timeout: float = setting(
        5.0, "seconds a close handshake may take before the transport is dropped", minimum=0.05
    )
    otel_exporter_otlp_endpoint: str = setting(
        "", "OTLP/HTTP endpoint for traces; empty: no export", common=True
    )

    def validate(self) -> None:
        super().validate()
        if self.breaker_backoff_base_seconds > self.breaker_backoff_cap_seconds:
            raise SettingsError(
                f"{PREFIX}BREAKER_BACKOFF_BASE_SECONDS must not exceed "
                f"{PREFIX}BREAKER_BACKOFF_CAP_SECONDS"
            )
        if self.pubsub_backoff_base_seconds > self.pubsub_backoff_cap_seconds:
            raise SettingsError(
                f"{PREFIX}PUBSUB_BACKOFF_BASE_SECONDS must not exceed "
                f"{PREFIX}PUBSUB_BACKOFF_CAP_SECONDS"
            )
        if 0 < self.record_ttl_seconds < 2 * self.liveness_flush_seconds:
            raise SettingsError(
                f"{PREFIX}RECORD_TTL_SECONDS={self.record_ttl_seconds!r}: must be at least twice "
                f"{PREFIX}LIVENESS_FLUSH_SECONDS, or records expire between two flushes"
            )
        self.refuse_development_keys("TRAFFIC_COP_SERVICE_KEY", (self.traffic_cop_service_key,))

    def refuse_unsafe_production(self) -> None:
        super().refuse_unsafe_production()
        self.refuse_plain_public_url("PUBLIC_WS_URL", self.public_ws_url)
        if self.production and (not self.allowed_origins or "*" in self.allowed_origins):
            # Unset means localhost on any port, which any local process can claim; '*' means
            # any page on the web may open sockets with its visitors' tokens.
            raise SettingsError(
                "ALLOWED_ORIGINS: ENVIRONMENT=production needs the browser origins allowed to "
                "open /ws listed (not unset, not '*')"
            )

    @property
    def record_ttl(self) -> float:
        # Long by default: the worker is what cleans up (records and indexes together); the TTL
        # only bounds what is left if no worker ever runs.
        return self.record_ttl_seconds or max(
            86400.0, 2 * self.max_idle_seconds, 4 * self.liveness_flush_seconds
        )
