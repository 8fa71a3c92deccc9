"""A counting Redis subscriber in its own process: ``python -m bench.subscriber URL CHANNEL...``.

It stands for an agent: it prints ``ready`` once subscribed, counts every message, and on
SIGTERM prints one JSON line ``{"count", "first", "last"}`` (wall-clock seconds) and exits.
Running it as a separate process keeps its parsing off the load generator's event loop, so
"messages observed on the agent channel per second" measures Redis delivery, not our client.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

import orjson
import redis


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bench.subscriber REDIS_URL CHANNEL [CHANNEL...]", file=sys.stderr)
        return 2
    url, channels = argv[0], argv[1:]
    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    client = redis.Redis.from_url(url)
    # No ignore flag on the object: redis-py lets it override the per-call False below, which
    # would swallow the confirmations this waits for.
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    pubsub.subscribe(*channels)
    # Wait for every subscribe confirmation before saying ready, so no early message is missed.
    confirmed = 0
    while confirmed < len(channels):
        msg = pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
        if msg and msg["type"] == "subscribe":
            confirmed += 1
    print("ready", flush=True)
    count = 0
    first = last = 0.0
    while True:
        msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if msg is None:
            # Stop only once the socket is quiet, so messages already sent are still counted.
            if stop:
                break
            continue
        last = time.time()
        if not count:
            first = last
        count += 1
    pubsub.close()
    client.close()
    print(orjson.dumps({"count": count, "first": first, "last": last}).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
