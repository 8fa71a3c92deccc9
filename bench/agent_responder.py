"""The real agent path: ``python -m bench.agent_responder API_URL REALM_KEY [CONCURRENCY]``.

The same answers as :mod:`bench.responder`, but the way a Python agent gets and sends them:
``post_office_client``'s ``GroupConsumer`` on the ``guide`` stream (group ``bench``) over the
Post Office API's Server-Sent Events, answering each message with ``reply`` (one HTTP request
each that delivers and acks, at most CONCURRENCY in flight, default 64, as an agent that does
not wait for one answer before taking the next message would). So the API's cost (the group
stream, one delivery script and one XACK per answer) is in the round trip. It prints
``ready`` once the stream is open and, on SIGTERM, one JSON line of counts.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import orjson
import uvloop

from bench.responder import AGENT_CHANNEL
from post_office_client import GroupConsumer, GroupMessage, PostOfficeClient, PostOfficeError


async def run(api_url: str, key: str, concurrency: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counts = {"received": 0, "answered": 0, "failed": 0}
    first_error: list[str] = []
    slots = asyncio.Semaphore(concurrency)
    sends: set[asyncio.Task[None]] = set()

    async with PostOfficeClient(api_url, key) as po:

        async def answer(msg: GroupMessage) -> None:
            try:
                frame = {
                    "type": "response",
                    "agent_type": "bench",
                    "in_reply_to": msg.message_id,
                    "id": msg.message.message.get("id"),
                    "message": msg.message.text,
                }
                await msg.reply(frame)
                counts["answered"] += 1
            except PostOfficeError as exc:
                counts["failed"] += 1
                first_error[:] = first_error or [repr(exc)]
            finally:
                slots.release()

        async def consume() -> None:
            group = GroupConsumer(
                po, AGENT_CHANNEL, group="bench", consumer="bench-1"
            )  # in flight: the API's GROUP_MAX_IN_FLIGHT (roundtrip.py sets 64)
            async with group as messages:
                print("ready", flush=True)
                async for msg in messages:
                    counts["received"] += 1
                    if not msg.connection_id:
                        await msg.ack()
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(answer(msg))
                    sends.add(task)
                    task.add_done_callback(sends.discard)

        consumer = asyncio.create_task(consume())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([consumer, stopper], return_when=asyncio.FIRST_COMPLETED)
        consumer.cancel()
        stopper.cancel()
        await asyncio.gather(consumer, stopper, *sends, return_exceptions=True)
    died = consumer in done and not consumer.cancelled() and consumer.exception() is not None
    out = {**counts, "first_error": first_error[:1], "died": died and repr(consumer.exception())}
    print(orjson.dumps(out).decode(), flush=True)
    return 1 if died else 0


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(
            "usage: python -m bench.agent_responder API_URL REALM_KEY [CONCURRENCY]",
            file=sys.stderr,
        )
        return 2
    return uvloop.run(run(argv[0], argv[1], int(argv[2]) if len(argv) == 3 else 64))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
