"""The open group-consumer streams of one API process (consumers.py serves them)."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from services.post_office_api import metrics
from shared.streams import Streams

__all__ = ["GROUPS_CLIENT_NAME", "GroupConsumers", "GroupsFull"]

GROUPS_CLIENT_NAME = "post-office-api-groups"


class GroupsFull(Exception):
    """The process serves GROUP_MAX_CONSUMERS group streams already."""


class GroupConsumers:
    """The group streams of one process: a Redis client for their blocking reads, and the
    open streams by consumer, so a second stream of one consumer name replaces the first."""

    def __init__(self, redis: Redis, blocking: Redis, max_consumers: int) -> None:
        self.streams = Streams(redis)
        self.blocking = Streams(blocking)
        self.max_consumers = max_consumers
        self.open: dict[tuple[str, str, str], asyncio.Event] = {}
        self.closing = asyncio.Event()

    def enter(self, key: tuple[str, str, str]) -> asyncio.Event:
        old = self.open.get(key)
        if old is not None:
            old.set()  # the older stream of this consumer ends at its next step
        elif len(self.open) >= self.max_consumers:
            raise GroupsFull(f"this process serves {self.max_consumers} group consumers already")
        stop = asyncio.Event()
        self.open[key] = stop
        metrics.GROUP_CONSUMERS.set(len(self.open))
        return stop

    def leave(self, key: tuple[str, str, str], stop: asyncio.Event) -> None:
        if self.open.get(key) is stop:
            del self.open[key]
        metrics.GROUP_CONSUMERS.set(len(self.open))

    def close_all(self) -> None:
        self.closing.set()
        for stop in self.open.values():
            stop.set()
