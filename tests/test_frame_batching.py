"""Frames queued together are written to the socket in one write (the gateway's own framing of
unmasked text frames, RFC 6455 5.2): every length encoding arrives intact and in order."""

from __future__ import annotations

import aiohttp
import orjson

from shared import redis_names as names
from tests.gateway_util import recv, redis_client, start_gateway, ws_url
from tests.helpers import ServiceProcess, create_session


async def test_a_burst_of_frames_of_every_length_encoding_arrives_intact_in_order(
    redis_url: str, traffic_cop: ServiceProcess
) -> None:
    gw = start_gateway(redis_url, traffic_cop.url)
    # 7-bit, 16-bit and 64-bit payload lengths, at and around each boundary, multi-byte text.
    sizes = [3, 125, 126, 127, 65535, 65536, 70000, 1, 200_000, 10]
    try:
        token = create_session(traffic_cop.url, "burst")
        async with (
            redis_client(redis_url) as redis,
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url(gw, token), max_msg_size=0) as ws,
        ):
            cid = (await recv(ws))["connection_id"]
            frames = []
            for i, size in enumerate(sizes):
                body = orjson.dumps({"n": i, "pad": ""}).decode()
                pad = "é" * ((size - len(body.encode())) // 2) if size > 40 else ""
                frames.append(orjson.dumps({"n": i, "pad": pad}).decode())
            for _ in range(3):  # bursts: one pipeline each, so the frames queue together
                async with redis.pipeline(transaction=False) as pipe:
                    for frame in frames:
                        pipe.publish(names.connection_messages(cid), frame)
                    assert await pipe.execute() == [1] * len(frames)
                got = [await ws.receive(timeout=10) for _ in frames]
                assert [m.type for m in got] == [aiohttp.WSMsgType.TEXT] * len(frames)
                assert [m.data for m in got] == frames
    finally:
        gw.stop()
