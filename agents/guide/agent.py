"""The guide agent's logic: what it answers (pure) and its consume-and-answer loop.

The answer is an echo with a little sense: ``help`` lists the channels, ``time`` gives the
time (UTC), anything else is echoed. Each answer goes to the sending connection as
``{"type": "response", "agent_type": "guide", "in_reply_to": <message_id>, "message": ...}``.
Messages without a connection (published through the API by another agent) get no answer.

Replicas share the consumer group ``group`` of the channel's stream (docs/agent-client.md):
each message goes to one of them, and each answer acks its message in the same call. An answer
that fails is not acked, so the message comes again (to this replica or another, after the
API's ACK_TIMEOUT_SECONDS) and ends in the dead letters after MAX_DELIVERIES. Delivery is at
least once: a message this replica already answered is acked again, not answered twice (the
last ``dedupe_size`` message ids are remembered).

Messages are answered concurrently, at most ``max_in_flight`` at once, so one slow API call
does not stall the stream; past that bound the loop waits for a free slot. Only a refused
realm key (401/403) stops the agent.

A delivery the API refused for now (429 with ``Retry-After``, 503) or that did not reach it is
retried by the client until its ``retry_deadline`` (``GUIDE_AGENT_DELIVERY_DEADLINE_SECONDS``);
past it, or on an answer no retry can fix, the answer is given up for now with an ERROR line
naming the message id (``answer to <id> dropped: ...``), counted in ``dropped``. The message
stays unacked, so it comes again after ACK_TIMEOUT_SECONDS (to the dead letters after
MAX_DELIVERIES): nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from post_office_client import (
    AgentMessage,
    Forbidden,
    Gone,
    GroupConsumer,
    GroupMessage,
    PostOfficeClient,
    PostOfficeError,
    Unauthorized,
)
from shared.protocol import is_valid_traceparent

__all__ = ["DEFAULT_MAX_ANSWER_CHARS", "GuideAgent", "answer", "response_frame"]

log = logging.getLogger(__name__)

#: An echo longer than this is cut (with an ellipsis), so that the reply stays well under the
#: API's MAX_BODY_BYTES (64 KiB by default) even when every character takes 4 bytes in UTF-8.
DEFAULT_MAX_ANSWER_CHARS = 4000


def answer(
    text: str,
    channels: Sequence[str],
    now: datetime | None = None,
    max_chars: int = DEFAULT_MAX_ANSWER_CHARS,
) -> str:
    """The guide's reply to ``text`` (at most ``max_chars`` characters)."""
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
    reply = f"You said: {text}"
    if len(reply) > max_chars:
        reply = reply[: max(0, max_chars - 1)] + "…"
    return reply


def response_frame(
    msg: AgentMessage, channels: Sequence[str], max_chars: int = DEFAULT_MAX_ANSWER_CHARS
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "response",
        "agent_type": "guide",
        "in_reply_to": msg.message_id,
        "message": answer(msg.text or "", channels, max_chars=max_chars),
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
        group: str = "guide",
        consumer: str = "guide-1",
        backoff_min: float,
        backoff_max: float,
        idle_timeout: float,
        max_in_flight: int = 32,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        dedupe_size: int = 10_000,
    ) -> None:
        self.client = client
        self.channel = channel
        self.channels = tuple(channels)
        self.group = group
        self.consumer = consumer
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.idle_timeout = idle_timeout
        self.max_in_flight = max_in_flight
        self.max_answer_chars = max_answer_chars
        self.dedupe_size = dedupe_size
        self.answered = 0
        self.duplicates = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.dropped = 0

    async def run(self) -> None:
        """Answer until cancelled. Raises only what retrying cannot fix (a refused key)."""
        messages = GroupConsumer(
            self.client,
            self.channel,
            group=self.group,
            consumer=self.consumer,
            backoff_min=self.backoff_min,
            backoff_max=self.backoff_max,
            idle_timeout=self.idle_timeout,
        )
        slots = asyncio.Semaphore(self.max_in_flight)

        async def answer_one(msg: GroupMessage) -> None:
            try:
                await self.handle(msg)
            finally:
                slots.release()

        try:
            # A task group: a refused key in any answer ends the loop and the other answers.
            async with asyncio.TaskGroup() as answers, messages:
                log.info("consuming %s as %s/%s", self.channel, self.group, self.consumer)
                async for msg in messages:
                    await slots.acquire()
                    answers.create_task(answer_one(msg))
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None

    async def handle(self, msg: GroupMessage) -> None:
        try:
            if msg.message_id in self._seen or not msg.connection_id:
                if msg.message_id in self._seen:
                    self.duplicates += 1
                    log.info("message %s again (already answered): acked", msg.message_id)
                await msg.ack()
                return
            frame = response_frame(msg.message, self.channels, self.max_answer_chars)
            # W3C: an invalid traceparent is dropped (the API starts a new trace).
            traceparent = msg.message.traceparent
            try:
                await msg.reply(
                    frame, traceparent=traceparent if is_valid_traceparent(traceparent) else None
                )
            except Gone:
                log.info(
                    "connection left before the answer to %s",
                    msg.message_id,
                    extra={"connection_id": msg.connection_id},
                )
        except (Unauthorized, Forbidden):
            raise
        except PostOfficeError as exc:
            # The client retried what was safe until its deadline. Not acked: the message comes
            # again (here or to another replica), and it is never lost silently.
            self.dropped += 1
            log.error(
                "answer to %s dropped: %s",
                msg.message_id,
                exc,
                extra={"connection_id": msg.connection_id},
            )
            return
        except Exception:
            # A bug or an unexpected answer must not end the agent; not acked: it comes again.
            self.dropped += 1
            log.exception("answer to %s dropped", msg.message_id)
            return
        self._remember(msg.message_id)
        if msg.connection_id:
            self.answered += 1

    def _remember(self, message_id: str) -> None:
        self._seen[message_id] = None
        while len(self._seen) > self.dedupe_size:
            self._seen.popitem(last=False)
