"""shared/raw_pipeline against a real redis-server: the bytes redis-py would send, replies in
order, error replies in their command's place, and a connection never reused half-read."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from shared import raw_pipeline


def test_pack_is_what_redis_py_sends() -> None:
    client = Redis()
    commands = [("SET", "k", b"v\r\n\x00", 7), ("EVALSHA", "a" * 40, 1, "k", 1.5), ("PING",)]
    conn = client.connection_pool.make_connection()
    expected = b"".join(conn.pack_commands([list(c) for c in commands]))
    assert raw_pipeline.pack(commands) == expected
    with pytest.raises(TypeError):
        raw_pipeline.pack([("SET", "k", True)])


async def test_replies_come_in_order_with_errors_in_place(redis: Redis) -> None:
    out = await raw_pipeline.execute(
        redis,
        [
            ("SET", "rp:a", "1"),
            ("EVALSHA", "0" * 40, 0),
            ("INCR", "rp:a"),
            ("LPUSH", "rp:a", "x"),  # WRONGTYPE
            ("GET", "rp:a"),
        ],
    )
    assert out[0] is True or out[0] == b"OK"
    assert isinstance(out[1], NoScriptError)
    assert out[2] == 2
    assert isinstance(out[3], ResponseError)
    assert out[4] == b"2"
    assert await raw_pipeline.execute(redis, []) == []


async def test_a_cancelled_read_never_leaves_replies_for_the_next_caller(redis: Redis) -> None:
    # A command that blocks on the server, cancelled mid-read: the connection is dropped, so
    # the next batch on the pool reads its own replies, not the cancelled one's.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            raw_pipeline.execute(redis, [("BLPOP", "rp:empty", "0.3"), ("SET", "rp:b", "late")]),
            0.05,
        )
    for _ in range(20):
        assert await raw_pipeline.execute(redis, [("ECHO", "mine")]) == [b"mine"]
