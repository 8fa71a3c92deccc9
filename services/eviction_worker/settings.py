"""Settings of the eviction worker, read from ``EVICTION_*`` environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from shared.settings import (
    ChannelSettings,
    HttpLimitSettings,
    SettingsError,
    TaskHookSettings,
    TrafficCopCallerSettings,
    instance_id_setting,
    port_setting,
    setting,
)

__all__ = ["PREFIX", "EvictionSettings"]

PREFIX = "EVICTION_"
DESCRIPTION = (
    "Post Office eviction worker: evicts idle connections, cleans up after dead gateways and "
    "reclaims unacked agent-stream messages. Serves /health, /ready, /metrics and /status only."
)


@dataclass(frozen=True, repr=False)
class EvictionSettings(
    HttpLimitSettings, TrafficCopCallerSettings, ChannelSettings, TaskHookSettings
):
    PREFIX = PREFIX
    INSTANCE_NAME = "eviction"

    port: int = port_setting(8400, "port of /health, /ready, /metrics and /status", minimum=0)
    instance_id: str = instance_id_setting("eviction-<hostname>-<pid>")
    traffic_cop_pending_limit: int = setting(
        100_000,
        "evicted connections waiting to be reported to Traffic Cop; past it the oldest report "
        "is dropped (counted and logged; the session's own TTL then cleans Traffic Cop's side)",
        minimum=1,
    )
    traffic_cop_retry_base_seconds: float = setting(
        0.1, "first pause before retrying reports while Traffic Cop is unavailable", minimum=0.001
    )
    traffic_cop_retry_cap_seconds: float = setting(
        5.0,
        "longest pause between report retries while Traffic Cop stays unavailable (doubling, "
        "jittered)",
        minimum=0.001,
    )
    max_idle_seconds: float = setting(
        300.0,
        "a connection with no frame or pong for this long is evicted",
        common=True,
        minimum=0.1,
    )
    interval_seconds: float = setting(5.0, "pause between two passes", minimum=0.01)
    batch_size: int = setting(
        1000, "stale ids read and evicted per round trip (one page of a pass)", minimum=1
    )
    pass_limit: int = setting(
        100_000,
        "most connections one pass looks at (stale ones, and each dead gateway's); the rest "
        "waits for the next pass",
        minimum=1,
    )
    concurrency: int = setting(
        4,
        "Redis connections one page's scripts are split over (pages of 128 ids or more; one "
        "page is in flight at a time), and Traffic Cop calls in flight",
        minimum=1,
        maximum=256,
    )
    ack_timeout_seconds: float = setting(
        30.0,
        "a stream message delivered to a consumer and not acked for this long is handed to "
        "another live consumer of its group; above the agents' longest handling time",
        common=True,
        minimum=0.01,
    )
    max_deliveries: int = setting(
        5,
        "deliveries of one stream message (the first and each hand-over) before it moves to "
        "the channel's dead letters",
        common=True,
        minimum=1,
    )
    consumer_live_seconds: float = setting(
        15.0,
        "a consumer that read from its group within this long is live and may be handed "
        "reclaimed messages; above the consumers' read interval (the API's GROUP_BLOCK_SECONDS)",
        minimum=0.01,
    )
    consumer_stale_seconds: float = setting(
        3600.0,
        "a consumer holding no message that has not read for this long is removed from its group",
        minimum=0.01,
    )
    reclaim_batch: int = setting(100, "stream entries reclaimed per round trip", minimum=1)
    reclaim_limit: int = setting(
        10_000, "most stream entries reclaimed per group per pass", minimum=1
    )
    recovery_grace_seconds: float = setting(
        15.0,
        "after Redis was unreachable, idle eviction and dead-gateway cleanup wait this long once "
        "it answers again, so gateways can write the last-seen times and liveness keys they "
        "could not write meanwhile (a gateway retries its key every second after a failure); "
        "at least twice the gateways' LIVENESS_FLUSH_SECONDS",
        minimum=0.0,
    )
    error_backoff_cap_seconds: float = setting(
        5.0, "longest pause between two passes while passes fail (Redis down)", minimum=0.01
    )
    run_once: bool = setting(
        False, "run one pass, print its JSON summary on stdout and exit 0 (tests, cron)"
    )

    def validate(self) -> None:
        super().validate()
        self.refuse_development_keys("TRAFFIC_COP_SERVICE_KEY", (self.traffic_cop_service_key,))
        if self.batch_size > self.pass_limit:
            raise SettingsError(
                f"{PREFIX}BATCH_SIZE={self.batch_size!r} is larger than "
                f"{PREFIX}PASS_LIMIT={self.pass_limit!r}"
            )
        if self.traffic_cop_retry_base_seconds > self.traffic_cop_retry_cap_seconds:
            raise SettingsError(
                f"{PREFIX}TRAFFIC_COP_RETRY_BASE_SECONDS={self.traffic_cop_retry_base_seconds!r} "
                f"is larger than {PREFIX}TRAFFIC_COP_RETRY_CAP_SECONDS="
                f"{self.traffic_cop_retry_cap_seconds!r}"
            )
        if self.reclaim_batch > self.reclaim_limit:
            raise SettingsError(
                f"{PREFIX}RECLAIM_BATCH={self.reclaim_batch!r} is larger than "
                f"{PREFIX}RECLAIM_LIMIT={self.reclaim_limit!r}"
            )

    @property
    def instance(self) -> str:
        # The pid, not the port: workers often listen on port 0 (any free port).
        return self.instance_id or f"{self.INSTANCE_NAME}-{socket.gethostname()}-{os.getpid()}"
