"""The guide agent's logic: what it answers (pure) and its subscribe-and-answer loop.

The answer is an echo with a little sense: ``help`` lists the channels, ``time`` gives the
time (UTC), anything else is echoed. Each answer goes to the sending connection as
``{"type": "response", "agent_type": "guide", "in_reply_to": <message_id>, "message": ...}``.
Messages without a connection (published through the API by another agent) get no answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from post_office_client import (
    AgentMessage,
    Gone,
    PostOfficeClient,
    PostOfficeError,
    Unauthorized,
)

__all__ = ["GuideAgent", "answer", "response_frame"]

log = logging.getLogger(__name__)


def answer(text: str, channels: Sequence[str], now: datetime | None = None) -> str:
    """The guide's reply to ``text``."""
    word = text.strip().lower()
    if word in ("help", "?", "/help"):
        return (
            "I am the guide. Channels: " + ", ".join(channels) + ". "
            "Say 'time' for the time; anything else I echo."
        )
    if word in ("time", "/time"):
        moment = now or datetime.now(UTC)
        return "It is " + moment.isoformat(timespec="seconds").replace("+00:00", "Z") + "."
    if not word:
        return "Say something, or 'help'."
    return f"You said: {text}"


def response_frame(msg: AgentMessage, channels: Sequence[str]) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "response",
        "agent_type": "guide",
        "in_reply_to": msg.message_id,
        "message": answer(msg.text or "", channels),
    }
    payload = msg.message.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("conversation_id"), str):
        frame["conversation_id"] = payload["conversation_id"]
    return frame


class GuideAgent:
    def __init__(
        self,
        client: PostOfficeClient,
        channel: str,
        channels: Sequence[str],
        *,
        backoff_min: float,
        backoff_max: float,
        idle_timeout: float,
    ) -> None:
        self.client = client
        self.channel = channel
        self.channels = tuple(channels)
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.idle_timeout = idle_timeout
        self.answered = 0

    async def run(self) -> None:
        """Answer until cancelled. Raises only what retrying cannot fix (a refused key)."""
        subscription = self.client.subscribe(
            self.channel,
            backoff_min=self.backoff_min,
            backoff_max=self.backoff_max,
            idle_timeout=self.idle_timeout,
        )
        async with subscription:
            log.info("subscribed to %s", self.channel)
            async for msg in subscription:
                await self.handle(msg)

    async def handle(self, msg: AgentMessage) -> None:
        if not msg.connection_id:
            log.debug("message %s has no connection to answer", msg.message_id)
            return
        frame = response_frame(msg, self.channels)
        try:
            await self.client.send_to_connection(
                msg.connection_id, frame, traceparent=msg.traceparent or None
            )
        except Gone:
            log.info(
                "connection left before the answer to %s",
                msg.message_id,
                extra={"connection_id": msg.connection_id},
            )
            return
        except Unauthorized:
            raise
        except PostOfficeError as exc:
            # One lost answer must not stop the agent; the next message is answered again.
            log.warning(
                "answer to %s failed: %s",
                msg.message_id,
                exc,
                extra={"connection_id": msg.connection_id},
            )
            return
        self.answered += 1
