"""A tiny command-line client for the gateway's ``/ws``.

    python -m scripts.ws_client 'ws://127.0.0.1:8100/ws?session_token=TOKEN'

Each line read from stdin is sent as ``{"channel": "guide", "intent": "chat", "payload":
{"message": <line>}, "id": "<n>"}`` (``--channel`` and ``--intent`` change the first two).
Every frame received is printed on stdout as one line, exactly as it arrived, so the output
pipes into ``jq``; diagnostics (connected, closed with code ...) go to stderr. The app-level
``{"type": "ping"}`` is answered with ``{"type": "pong"}``.

At the end of stdin the client waits until every message it sent has been answered (an ``ack``
and, for acked messages, a ``response`` whose ``in_reply_to`` names it, or an ``error``), or
until ``--linger`` seconds pass, then closes with 1000. It exits 0 after a normal close, 1 when
the connection could not be opened or the server closed it with any other code, 2 on bad usage.
The token may also be given with ``--token`` (sent as ``Authorization: Bearer``) instead of in
the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import stat
import sys
from typing import Any

import aiohttp
import orjson

__all__ = ["main"]

PONG = orjson.dumps({"type": "pong"}).decode()


class Conversation:
    """What was sent and what has been answered, to know when stdin's messages are all done."""

    def __init__(self, wait_for_response: bool) -> None:
        self.wait_for_response = wait_for_response
        self.unacked: set[str] = set()
        self.unanswered: set[str] = set()  # server message ids still waiting for a response
        self.changed = asyncio.Event()

    def sent(self, client_id: str) -> None:
        self.unacked.add(client_id)

    def received(self, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        client_id = frame.get("id")
        if kind == "ack" and client_id in self.unacked:
            self.unacked.discard(client_id)
            if self.wait_for_response and isinstance(frame.get("message_id"), str):
                self.unanswered.add(frame["message_id"])
        elif kind == "error" and client_id in self.unacked:
            self.unacked.discard(client_id)
        elif kind == "response":
            self.unanswered.discard(frame.get("in_reply_to"))
        self.changed.set()

    @property
    def done(self) -> bool:
        return not self.unacked and not self.unanswered


class StdinLines:
    """Lines of stdin in a queue (``None`` at its end), read without blocking the loop."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._transport: asyncio.BaseTransport | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode):
            # A file redirect cannot be watched by the event loop; it is finite, read it now.
            for line in sys.stdin.read().splitlines():
                self.queue.put_nowait(line)
            self.queue.put_nowait(None)
            return
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        self._task = asyncio.create_task(self._pump(reader), name="stdin")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            await self.queue.put(line.decode(errors="replace").rstrip("\r\n"))
        await self.queue.put(None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()


async def _receive(ws: aiohttp.ClientWebSocketResponse, conversation: Conversation) -> None:
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            print(msg.data, flush=True)
            try:
                frame = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(frame, dict) and frame.get("type") == "ping":
                await ws.send_str(PONG)
            conversation.received(frame)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            print(f"(binary frame, {len(msg.data)} bytes)", file=sys.stderr, flush=True)
        elif msg.type is aiohttp.WSMsgType.ERROR:
            print(f"connection error: {ws.exception()!r}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    conversation = Conversation(wait_for_response=not args.no_wait_response)
    timeout = aiohttp.ClientWSTimeout(ws_close=5.0)
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(
                args.url, headers=headers, timeout=timeout, autoping=True, max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as exc:
            print(f"refused: HTTP {exc.status} {exc.message}", file=sys.stderr)
            return 1
        except (aiohttp.ClientError, OSError) as exc:
            print(f"could not connect to {args.url}: {exc}", file=sys.stderr)
            return 1
        print(f"connected to {args.url.split('?', 1)[0]}", file=sys.stderr, flush=True)
        receiver = asyncio.create_task(_receive(ws, conversation), name="receive")
        stdin = StdinLines()
        await stdin.start()
        lines = stdin.queue
        sent = 0
        try:
            while not receiver.done():
                getter = asyncio.ensure_future(lines.get())
                await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                line = getter.result()
                if line is None:
                    break
                if not line.strip():
                    continue
                sent += 1
                envelope = {
                    "channel": args.channel,
                    "intent": args.intent,
                    "payload": {"message": line},
                    "id": str(sent),
                }
                conversation.sent(str(sent))
                await ws.send_str(orjson.dumps(envelope).decode())
            # stdin is done: wait for the answers, bounded by --linger.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + args.linger
            while not receiver.done() and not conversation.done:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                conversation.changed.clear()
                changed = asyncio.ensure_future(conversation.changed.wait())
                await asyncio.wait(
                    {changed, receiver}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                changed.cancel()
            if not ws.closed:
                await ws.close(code=aiohttp.WSCloseCode.OK)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
            await stdin.close()
        code = ws.close_code
        print(f"closed with code {code}", file=sys.stderr, flush=True)
        return 0 if code in (1000, None) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.ws_client",
        description="Send stdin lines to a Post Office gateway's /ws and print every frame.",
    )
    parser.add_argument("url", help="ws://HOST:PORT/ws?session_token=TOKEN")
    parser.add_argument("--token", help="session token sent as Authorization: Bearer")
    parser.add_argument("--channel", default="guide", help="channel of every message (guide)")
    parser.add_argument("--intent", default="chat", help="intent of every message (chat)")
    parser.add_argument(
        "--linger",
        type=float,
        default=10.0,
        help="after stdin ends, most seconds to wait for the answers (10)",
    )
    parser.add_argument(
        "--no-wait-response",
        action="store_true",
        help="after stdin ends, wait for acks only, not for the agent's responses",
    )
    args = parser.parse_args(argv)
    if not args.url.startswith(("ws://", "wss://")):
        parser.error("the URL must start with ws:// or wss://")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
