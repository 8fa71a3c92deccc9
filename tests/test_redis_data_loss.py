"""Redis restarted without its data (kill -9, no persistence): no socket stays open and
unreachable. Sessions are gone with the data, and a session cannot be trusted again (a
revocation written since the last persistence point is lost with it), so every socket is
closed 4401 "session lost" and its client signs in again — within seconds, because a restarted
Redis drops the gateway's pub/sub connection and every resubscription re-checks the sessions.

Counts: sockets open before / closed 4401 "session lost" / left open; messages sent before the
loss, acked, and answered after it."""

from __future__ import annotations

import signal

import aiohttp

from tests.gateway_util import (
    RedisServer,
    chat,
    close_of,
    recv,
    start_gateway,
    start_traffic_cop,
    ws_url,
)
from tests.helpers import create_session


async def test_an_empty_restart_closes_every_socket_4401_none_left_open(
    private_redis: RedisServer,
):
    traffic_cop = start_traffic_cop(private_redis.url)
    gw = start_gateway(private_redis.url, traffic_cop.url)
    clients = 10
    try:
        tokens = [create_session(traffic_cop.url, f"loss{i}") for i in range(clients)]
        async with aiohttp.ClientSession() as http:
            sockets = [await http.ws_connect(ws_url(gw, t)) for t in tokens]
            for ws in sockets:
                await recv(ws)
            sent = acked = 0
            for i, ws in enumerate(sockets):
                await ws.send_str(chat("before", id=i))
                sent += 1
                acked += (await recv(ws))["type"] == "ack"
            assert (sent, acked) == (clients, clients)
            private_redis.stop(signal.SIGKILL)
            private_redis.start()  # same port, empty
            closes = [await close_of(ws, 20) for ws in sockets]
            lost = closes.count((4401, "session lost"))
            left_open = sum(not ws.closed for ws in sockets)
            print(f"open={clients} closed_4401_session_lost={lost} left_open={left_open}")
            assert (lost, left_open) == (clients, 0)
            # The client signs in again: a new session on the restarted Redis works end to end.
            token = create_session(traffic_cop.url, "loss-again")
            async with http.ws_connect(ws_url(gw, token)) as ws:
                await recv(ws)
                await ws.send_str(chat("after", id="again"))
                assert (await recv(ws))["type"] == "ack"
    finally:
        gw.stop()
        traffic_cop.stop()


async def test_a_lost_record_whose_session_survived_is_written_again_from_memory(
    private_redis: RedisServer,
):
    # A data set that lost the epoch and the connection's record but kept the session (a
    # failover to a replica that missed some writes): the gateway re-asserts the record, so the
    # socket stays open and reachable instead of answering 410.
    from shared import redis_names as names
    from tests.gateway_util import redis_client
    from tests.helpers import wait_for

    traffic_cop = start_traffic_cop(private_redis.url)
    gw = start_gateway(private_redis.url, traffic_cop.url, GATEWAY_REDIS_EPOCH_CHECK_SECONDS="0.2")
    try:
        token = create_session(traffic_cop.url, "survivor")
        async with (
            redis_client(private_redis.url) as redis,
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url(gw, token)) as ws,
        ):
            cid = (await recv(ws))["connection_id"]
            await wait_for(lambda: redis.exists(names.EPOCH), 5, what="the epoch written")
            await redis.delete(names.connection(cid), names.EPOCH)
            await wait_for(lambda: redis.exists(names.connection(cid)), 10, what="re-asserted")
            assert await redis.hget(names.connection(cid), "user_id") == b"survivor"
            assert await redis.sismember(names.user_connections("survivor"), cid)
            receivers = await redis.publish(names.connection_messages(cid), '{"type": "hi"}')
            assert (receivers, await recv(ws)) == (1, {"type": "hi"})
            assert not ws.closed
            assert "re-registered" in gw.log()
    finally:
        gw.stop()
        traffic_cop.stop()
