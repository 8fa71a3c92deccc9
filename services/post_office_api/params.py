"""JSON errors and the path parameters every handler module checks the same way."""

from __future__ import annotations

from typing import NoReturn

from aiohttp import web

from services.post_office_api.keys import SETTINGS
from shared.http import json_error_exception
from shared.protocol import ErrorCode

__all__ = ["UNKNOWN_CHANNEL_STATUS", "channel_param", "fail"]

#: Unknown channels are 404 (the channel is part of the resource path).
UNKNOWN_CHANNEL_STATUS = 404


def fail(
    status: int, code: ErrorCode | str, message: str, headers: dict[str, str] | None = None
) -> NoReturn:
    """Raise the JSON error; the skeleton's error middleware lets JSON errors through as is."""
    raise json_error_exception(status, code, message, headers)


def channel_param(request: web.Request) -> str:
    """The ``{channel}`` of the path, 404 ``unknown_channel`` unless it is configured."""
    channel = request.match_info["channel"]
    channels = request.app[SETTINGS].channels
    if channel not in channels:
        fail(
            UNKNOWN_CHANNEL_STATUS,
            ErrorCode.UNKNOWN_CHANNEL,
            f"unknown channel {channel[:64]!r}; channels: {', '.join(channels)}",
        )
    return channel
