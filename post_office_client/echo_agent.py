"""An example agent: answer every client message on one channel with an echo.

Runs from anywhere once the client is installed (``pip install ./post_office_client``)::

    python -m post_office_client.echo_agent --url http://127.0.0.1:8200 \\
        --realm-key dev-business_enablement --channel pillar:content

It listens on ``pillar:content`` by default: a channel the gateway accepts but that no demo
agent answers (the guide agent listens on ``guide``), so each message you send there from the
chat page gets exactly one answer, this one. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from post_office_client import AgentMessage, Gone, PostOfficeClient

DEFAULT_CHANNEL = "pillar:content"


def reply_to(msg: AgentMessage) -> dict[str, object]:
    """The answer to one client message: its text back, naming the message it answers."""
    return {
        "type": "response",
        "agent_type": "echo",
        "in_reply_to": msg.message_id,
        "message": f"echo: {msg.text}",
    }


async def serve(url: str, realm_key: str, channel: str, limit: int | None = None) -> int:
    """Answer messages on ``channel`` until cancelled, or until ``limit`` were answered.
    Returns how many were answered."""
    answered = 0
    async with PostOfficeClient(url, realm_key) as po, po.subscribe(channel) as messages:
        print(f"echo agent listening on {channel!r} at {url}", file=sys.stderr, flush=True)
        async for msg in messages:
            if not msg.connection_id:  # published by another agent, not by a socket
                continue
            with contextlib.suppress(Gone):  # the client left meanwhile
                await po.send_to_connection(msg.connection_id, reply_to(msg))
                answered += 1
            if limit is not None and answered >= limit:
                break
    return answered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m post_office_client.echo_agent")
    parser.add_argument(
        "--url",
        default=os.environ.get("POST_OFFICE_URL", "http://127.0.0.1:8200"),
        help="the Post Office API (env POST_OFFICE_URL; default %(default)s)",
    )
    parser.add_argument(
        "--realm-key",
        default=os.environ.get("POST_OFFICE_REALM_KEY", "dev-business_enablement"),
        help="a realm key allowed to subscribe and answer connections "
        "(env POST_OFFICE_REALM_KEY; default: the development business_enablement key)",
    )
    parser.add_argument("--channel", default=DEFAULT_CHANNEL, help="default %(default)s")
    parser.add_argument("--limit", type=int, default=None, help="stop after N answers")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.url, args.realm_key, args.channel, args.limit))


if __name__ == "__main__":
    main()
