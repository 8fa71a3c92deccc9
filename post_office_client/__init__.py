"""Post Office agent client: the HTTP API as typed async calls (docs/agent-client.md)."""

from post_office_client.client import PostOfficeClient, Subscription
from post_office_client.consumer import GroupConsumer, GroupMessage
from post_office_client.errors import (
    BadRequest,
    Forbidden,
    Gone,
    NotFound,
    PostOfficeError,
    RateLimited,
    StreamError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from post_office_client.models import (
    AgentMessage,
    BroadcastResult,
    PublishResult,
    UserDelivery,
    WebSocketEndpoint,
)

__all__ = [
    "AgentMessage",
    "BadRequest",
    "BroadcastResult",
    "Forbidden",
    "Gone",
    "GroupConsumer",
    "GroupMessage",
    "NotFound",
    "PostOfficeClient",
    "PostOfficeError",
    "PublishResult",
    "RateLimited",
    "StreamError",
    "Subscription",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "UserDelivery",
    "WebSocketEndpoint",
]
