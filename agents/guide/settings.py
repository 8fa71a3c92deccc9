"""Settings of the guide agent, read from ``GUIDE_AGENT_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from agents.guide.agent import DEFAULT_MAX_ANSWER_CHARS
from shared.settings import MIN_PRODUCTION_KEY_LENGTH, ChannelSettings, SettingsError, setting
from shared.streams import is_valid_consumer_name, is_valid_group_name

__all__ = ["DESCRIPTION", "MIN_PRODUCTION_KEY_LENGTH", "PREFIX", "GuideSettings"]

PREFIX = "GUIDE_AGENT_"
DESCRIPTION = (
    "Guide agent: subscribes to the guide channel through the Post Office API (Server-Sent "
    "Events) and answers each message to its connection (python -m agents.guide)."
)


@dataclass(frozen=True, repr=False)
class GuideSettings(ChannelSettings):
    """No host or port: the agent listens on nothing, it only calls the API."""

    PREFIX = PREFIX

    post_office_url: str = setting(
        "http://127.0.0.1:8200", "base URL of the Post Office API", common=True
    )
    realm_key: str = setting(
        "dev-smart_city",
        "realm key for the API (needs agent_channel_subscribe and connection_messaging); "
        "keys starting with dev- are refused when ENVIRONMENT=production",
        secret=True,
    )
    channel: str = setting("guide", "the agent channel to answer")
    group: str = setting(
        "guide", "consumer group the replicas share (each message goes to one of them)"
    )
    consumer: str = setting(
        "",
        "this replica's consumer name, the same across its restarts (what it held unacked "
        "comes back to it); empty: guide-<hostname>",
    )
    backoff_base_seconds: float = setting(
        0.1, "first pause before re-subscribing after the stream broke", minimum=0.001
    )
    backoff_cap_seconds: float = setting(
        5.0, "cap of the jittered exponential re-subscribe backoff", minimum=0.001
    )
    idle_timeout_seconds: float = setting(
        60.0,
        "a stream silent this long (no event, no keep-alive comment) counts as broken",
        minimum=0.1,
    )
    request_timeout_seconds: float = setting(
        10.0, "timeout of each delivery call to the API", minimum=0.1
    )
    delivery_deadline_seconds: float = setting(
        30.0,
        "how long an answer is retried when the API refuses it for now (429, honouring "
        "Retry-After; 503) or cannot be reached; past it the answer is dropped with an ERROR "
        "log line naming the message id. 0: no retry",
        minimum=0.0,
    )
    retry_base_seconds: float = setting(
        0.1,
        "first pause before retrying an answer (shared backoff, doubled each try)",
        minimum=0.001,
    )
    retry_cap_seconds: float = setting(
        5.0, "cap of the pause between answer retries (a longer Retry-After wins)", minimum=0.001
    )
    max_in_flight: int = setting(
        32,
        "answers being delivered at once; past it the agent reads no further message until "
        "one finishes",
        minimum=1,
        maximum=10000,
    )
    max_answer_chars: int = setting(
        DEFAULT_MAX_ANSWER_CHARS,
        "longest answer (an echo is cut with an ellipsis), so that a reply stays under the "
        "API's MAX_BODY_BYTES (4 bytes a character at worst, plus the frame)",
        minimum=16,
        maximum=200000,
    )

    def validate(self) -> None:
        super().validate()
        if not self.post_office_url.startswith(("http://", "https://")):
            raise SettingsError(
                f"{PREFIX}POST_OFFICE_URL={self.post_office_url!r}: must start with http(s)://"
            )
        if not is_valid_group_name(self.group):
            raise SettingsError(f"{PREFIX}GROUP={self.group!r}: expected [A-Za-z0-9_.-]{{1,64}}")
        if self.consumer and not is_valid_consumer_name(self.consumer):
            raise SettingsError(
                f"{PREFIX}CONSUMER={self.consumer!r}: expected [A-Za-z0-9_.:-]{{1,128}}"
            )
        if not self.realm_key:
            raise SettingsError(f"{PREFIX}REALM_KEY is empty")
        self.refuse_development_keys(f"{PREFIX}REALM_KEY", (self.realm_key,))
        if self.backoff_base_seconds > self.backoff_cap_seconds:
            raise SettingsError(
                f"{PREFIX}BACKOFF_BASE_SECONDS is larger than {PREFIX}BACKOFF_CAP_SECONDS"
            )
