"""The minimal raw-Redis agent: ``python -m bench.responder REDIS_URL {po|sio}``.

It reads the ``guide`` agent channel (``websocket:guide``) with one subscription and answers
every message it gets, in pipelined batches of ``PUBLISH`` (:mod:`bench.resp`): whatever
arrived in one read of the socket is answered in one write. It parses each agent message
(``{"connection_id", "message_id"?, "message": <client envelope>}``, the shape the gateway, the
floor and the socketio peer all publish) and answers

* ``po``: on ``websocket:connection:<id>:messages``, the frame a gateway forwards unchanged to
  the socket, ``{"type": "response", "agent_type": "bench", "in_reply_to", "id", "message"}``
  (``id`` echoes the client's, so the load client can match the reply to its message);
* ``sio``: the same frame as a python-socketio ``emit`` of event ``reply`` to room ``<sid>``,
  in the JSON AsyncRedisManager publishes on its ``socketio`` channel, which every socketio
  server reads.

It prints ``ready`` once subscribed and, on SIGTERM, one JSON line of counts and exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import orjson
import uvloop

from bench.resp import BatchedPublisher, Resp, subscribe
from shared import redis_names as names

#: python-socketio's default Redis channel (AsyncRedisManager(channel="socketio")).
SOCKETIO_CHANNEL = "socketio"
AGENT_CHANNEL = "guide"


def reply_frame(agent_message: bytes) -> tuple[str, bytes]:
    """The connection (or sid) and the frame that answers one agent message."""
    msg = orjson.loads(agent_message)
    envelope = msg["message"]
    payload = envelope.get("payload") or {}
    frame = {
        "type": "response",
        "agent_type": "bench",
        "in_reply_to": msg.get("message_id"),
        "id": envelope.get("id"),
        "message": payload.get("message"),
    }
    return str(msg["connection_id"]), orjson.dumps(frame)


def socketio_emit(sid: str, frame: bytes) -> bytes:
    """What ``AsyncRedisManager.emit("reply", frame, to=sid)`` publishes (python-socketio 5.x)."""
    return orjson.dumps(
        {
            "method": "emit",
            "event": "reply",
            "data": [orjson.Fragment(frame)],
            "binary": False,
            "namespace": "/",
            "room": sid,
            "skip_sid": None,
            "callback": None,
            "host_id": "bench-responder",
        }
    )


async def run(url: str, mode: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    publisher = BatchedPublisher(await Resp.open(url))
    received = bad = 0

    async def read() -> None:
        nonlocal received, bad
        async for batch in subscribe(url, [names.agent_channel(AGENT_CHANNEL)]):
            if not batch:
                print("ready", flush=True)
                continue
            for _channel, data in batch:
                received += 1
                try:
                    target, frame = reply_frame(data)
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    bad += 1
                    continue
                if mode == "sio":
                    publisher.put(SOCKETIO_CHANNEL, socketio_emit(target, frame))
                else:
                    publisher.put(names.connection_messages(target), frame)

    tasks = [asyncio.create_task(read()), asyncio.create_task(publisher.run())]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, stopper]:
        task.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    failed = [t for t in tasks if t in done]
    counts = {
        "received": received,
        "bad": bad,
        "answered": publisher.published,
        "receivers": publisher.receivers,
        "batches": publisher.batches,
        "died": [repr(t.exception()) for t in failed if not t.cancelled()],
    }
    print(orjson.dumps(counts).decode(), flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("po", "sio"):
        print("usage: python -m bench.responder REDIS_URL {po|sio}", file=sys.stderr)
        return 2
    return uvloop.run(run(argv[0], argv[1]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
