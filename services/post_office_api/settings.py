"""Settings of the Post Office API, read from ``POST_OFFICE_*`` environment variables."""

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

__all__ = [
    "DESCRIPTION",
    "MAX_BODY_LIMIT",
    "PREFIX",
    "REALMS",
    "ApiSettings",
    "parse_realm_keys",
]

PREFIX = "POST_OFFICE_"
DESCRIPTION = (
    "Post Office API: the /v1 HTTP API realms and agents use to publish to agent channels, "
    "subscribe to them (Server-Sent Events) and deliver to connections, users and channels."
)

#: The realms of SPEC "Post Office HTTP API"; capabilities per realm are in auth.py.
REALMS: tuple[str, ...] = ("smart_city", "experience", "business_enablement")
#: Largest MAX_BODY_BYTES: an agent message (body plus envelope) must stay well below
#: SSE_MAX_EVENT_BYTES and post_office_client's event limit (4 MiB).
MAX_BODY_LIMIT = 1024 * 1024
#: Room for the agent-message envelope around a published body.
_ENVELOPE_ROOM = 4096


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
class ApiSettings(
    HttpLimitSettings,
    TrafficCopCallerSettings,
    ChannelSettings,
    AgentStreamSettings,
    TaskHookSettings,
):
    PREFIX = PREFIX
    INSTANCE_NAME = "post-office-api"

    port: int = port_setting(8200, minimum=0)
    instance_id: str = instance_id_setting("post-office-api-<hostname>-<port>")
    redis_max_connections: int = setting(64, "Redis connection pool size", minimum=1)
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
    traffic_cop_url: str = setting(
        "http://127.0.0.1:8300",
        "Traffic Cop base URL (Consul wins when CONSUL_URL is set), told about stale "
        "connections the API removes; empty: not told (its bookkeeping expires with the session)",
        common=True,
    )
    traffic_cop_pending_limit: int = setting(
        1000,
        "stale-connection reports waiting for Traffic Cop; past it a report is dropped "
        "(logged and counted)",
        minimum=1,
    )
    otel_exporter_otlp_endpoint: str = setting(
        "", "OpenTelemetry collector (OTLP/HTTP) base URL; empty: no span export", common=True
    )
    max_body_bytes: int = setting(
        65536, "largest request body; larger ones get 413", minimum=64, maximum=MAX_BODY_LIMIT
    )
    group_max_in_flight: int = setting(
        16,
        "unacked messages one group consumer (an SSE stream of .../groups/{group}/events) holds "
        "at most; it is sent more as it acks (the max_in_flight query parameter may lower it)",
        minimum=1,
        maximum=10000,
    )
    group_block_seconds: float = setting(
        2.0,
        "longest one read of a group consumer waits in Redis for a new message (XREADGROUP "
        "BLOCK); also how soon messages the worker handed to it, acks made elsewhere and a "
        "client that left are noticed while the channel is quiet",
        minimum=0.01,
        maximum=60.0,
    )
    group_poll_seconds: float = setting(
        0.05,
        "pause before a group consumer at its in-flight limit looks for acks again",
        minimum=0.001,
    )
    group_max_consumers: int = setting(
        256,
        "group consumer streams one process serves at once (each holds a Redis connection "
        "while it waits); past it 503",
        minimum=1,
    )
    group_max_ack_ids: int = setting(
        1000, "stream ids one ack request (or re-queue request) may name", minimum=1
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
    sse_max_event_bytes: int = setting(
        2 * 1024 * 1024,
        "largest agent message an SSE stream forwards; larger ones on the channel (published "
        "to Redis by something else than this API) are dropped and counted; at least "
        "MAX_BODY_BYTES + 4096, at most post_office_client's limit",
        minimum=1024,
        maximum=4 * 1024 * 1024,
    )
    sse_disconnect_check_seconds: float = setting(
        0.1,
        "how often open SSE streams are checked for a client that has gone (it then leaves "
        "the channel at once, so publishing queues for the next agent)",
        minimum=0.01,
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
    pubsub_backoff_base_seconds: float = setting(
        0.05, "first pause before re-connecting the pub/sub listener to Redis", minimum=0.001
    )
    pubsub_backoff_cap_seconds: float = setting(
        5.0, "cap of the pub/sub listener's jittered exponential backoff", minimum=0.001
    )

    def validate(self) -> None:
        super().validate()
        keys = parse_realm_keys(self.realm_keys)
        if not keys:
            raise SettingsError(f"{PREFIX}REALM_KEYS: at least one KEY:REALM pair is required")
        self.refuse_development_keys(f"{PREFIX}REALM_KEYS", keys)
        if self.traffic_cop_url:  # no reports, no key used
            self.refuse_development_keys("TRAFFIC_COP_SERVICE_KEY", (self.traffic_cop_service_key,))
        if self.traffic_cop_url and not self.traffic_cop_url.startswith(("http://", "https://")):
            raise SettingsError(
                f"{PREFIX}TRAFFIC_COP_URL={self.traffic_cop_url!r}: must start with http(s)://"
            )
        if self.sse_max_event_bytes < self.max_body_bytes + _ENVELOPE_ROOM:
            raise SettingsError(
                f"{PREFIX}SSE_MAX_EVENT_BYTES={self.sse_max_event_bytes}: must be at least "
                f"{PREFIX}MAX_BODY_BYTES + {_ENVELOPE_ROOM}, or published messages could not "
                "reach agents"
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
        if self.pubsub_backoff_base_seconds > self.pubsub_backoff_cap_seconds:
            raise SettingsError(
                f"{PREFIX}PUBSUB_BACKOFF_BASE_SECONDS is larger than "
                f"{PREFIX}PUBSUB_BACKOFF_CAP_SECONDS"
            )

    def refuse_unsafe_production(self) -> None:
        super().refuse_unsafe_production()
        self.refuse_plain_public_url("PUBLIC_WS_URL", self.public_ws_url)
