"""One consumer of a consumer group: durable, competing delivery for agent replicas.
::

    async with PostOfficeClient(url, key) as po:
        async with GroupConsumer(po, "guide", group="guide", consumer="guide-1") as messages:
            async for msg in messages:
                if msg.connection_id:
                    await msg.reply({"type": "response", ...})  # reply and ack, one call
                else:
                    await msg.ack()

Replicas that share a ``group`` share the channel's messages: each message goes to one of
them. A message not acked within the API's ``ACK_TIMEOUT_SECONDS`` goes to another live
replica (``msg.deliveries`` then says how often it was handed out), so an agent must be ready
to see a message twice and dedupe by ``message_id``. ``consumer`` names this replica and must
stay the same across its restarts: what it held unacked is sent to it again when it comes back.

The stream reconnects by itself (capped, jittered backoff) and resumes with ``Last-Event-ID``,
so unacked messages sent after the last one read come again, and none before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from post_office_client.client import (
    DEFAULT_MAX_EVENT_BYTES,
    PostOfficeClient,
    Subscription,
    _segment,
)
from post_office_client.models import AgentMessage

__all__ = ["GroupConsumer", "GroupMessage"]


@dataclass(slots=True)
class GroupMessage:
    """An agent message delivered through a group, with what acking and replying need."""

    message: AgentMessage
    stream_id: str
    channel: str
    group: str
    deliveries: int
    client: PostOfficeClient = field(repr=False)
    acked: bool = False

    @property
    def message_id(self) -> str:
        return self.message.message_id

    @property
    def connection_id(self) -> str:
        return self.message.connection_id

    def ack_field(self) -> dict[str, Any]:
        return {"channel": self.channel, "group": self.group, "ids": [self.stream_id]}

    async def ack(self) -> int:
        """Ack this message (1 when it was still pending here, 0 when already acked)."""
        acked = await self.client.ack(self.channel, self.group, [self.stream_id])
        self.acked = True
        return acked

    async def reply(
        self,
        frame: dict[str, Any],
        *,
        connection_id: str | None = None,
        traceparent: str | None = None,
    ) -> int:
        """Send ``frame`` to the connection the message came from (or ``connection_id``) and
        ack the message in the same call; the gateways that received it. A connection that is
        gone raises :class:`~post_office_client.errors.Gone`, and the message is acked anyway."""
        target = connection_id or self.message.connection_id
        if not target:
            raise ValueError(f"message {self.message_id!r} has no connection to reply to")
        try:
            return await self.client.send_to_connection(
                target, frame, traceparent=traceparent, ack=self.ack_field()
            )
        finally:
            self.acked = True


class GroupConsumer(Subscription):
    """``GET /v1/channels/{channel}/groups/{group}/events?consumer=...`` as an async iterator
    of :class:`GroupMessage` (see the module docstring)."""

    def __init__(
        self,
        client: PostOfficeClient,
        channel: str,
        *,
        group: str,
        consumer: str,
        max_in_flight: int | None = None,
        reconnect: bool = True,
        backoff_min: float = 0.1,
        backoff_max: float = 10.0,
        idle_timeout: float = 60.0,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        super().__init__(
            client,
            channel,
            reconnect=reconnect,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            idle_timeout=idle_timeout,
            max_event_bytes=max_event_bytes,
        )
        self.group = group
        self.consumer = consumer
        self.max_in_flight = max_in_flight

    def _path(self) -> str:
        return f"/v1/channels/{_segment(self.channel)}/groups/{_segment(self.group)}/events"

    def _params(self) -> dict[str, str] | None:
        params = {"consumer": self.consumer}
        if self.max_in_flight is not None:
            params["max_in_flight"] = str(self.max_in_flight)
        return params

    def __aiter__(self) -> GroupConsumer:
        return self

    async def __aenter__(self) -> GroupConsumer:
        await self.open()
        return self

    async def __anext__(self) -> GroupMessage:  # type: ignore[override]
        msg = await super().__anext__()
        raw = msg.raw
        deliveries = raw.get("deliveries")
        return GroupMessage(
            message=msg,
            stream_id=str(raw.get("stream_id") or self.last_event_id or ""),
            channel=self.channel,
            group=self.group,
            deliveries=deliveries if isinstance(deliveries, int) else 1,
            client=self.client,
        )
