"""The per-address budget's pure parts: keyed buckets with a bounded table, and which address
a request comes from through trusted proxies."""

from __future__ import annotations

import pytest

from shared.address_budget import ClientAddress
from shared.ratelimit import KeyedBuckets


def test_buckets_refill_and_the_table_forgets_the_least_recently_seen():
    now = [0.0]
    buckets = KeyedBuckets(rate=1.0, burst=2, capacity=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 1.0]
    now[0] = 0.5
    assert buckets.wait("a") == pytest.approx(0.5)
    for key in ("b", "c", "d"):  # "a" is the least recently seen: forgotten
        buckets.take(key)
    assert len(buckets) == 3 and buckets.wait("a") == 0.0
    buckets.spend("b")
    buckets.spend("b")  # spending past empty keeps it empty
    assert buckets.wait("b") == pytest.approx(1.0)
    buckets.refund("b")
    assert buckets.wait("b") == 0.0


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "address"),
    [
        ((), "203.0.113.7", "198.51.100.1", "203.0.113.7"),  # no proxy trusted: the peer
        (("172.30.0.2",), "172.30.0.2", "198.51.100.1", "198.51.100.1"),
        # The client may prepend anything; the right-most untrusted address is what the
        # trusted proxy saw.
        (("172.30.0.2",), "172.30.0.2", "6.6.6.6, 198.51.100.1", "198.51.100.1"),
        (("10.0.0.0/8",), "10.0.0.5", "198.51.100.1, 10.0.0.9", "198.51.100.1"),
        (("172.30.0.2",), "172.30.0.3", "198.51.100.1", "172.30.0.3"),  # untrusted peer
        (("172.30.0.2",), "172.30.0.2", None, "172.30.0.2"),
        ((), "2001:db8:1:2:3:4:5:6", None, "2001:db8:1:2::/64"),  # one host's /64
        ((), "::ffff:198.51.100.1", None, "198.51.100.1"),
    ],
)
def test_client_address_through_trusted_proxies(trusted, peer, forwarded, address):
    headers = [forwarded] if forwarded else []
    assert ClientAddress(trusted).resolve(peer, headers) == address
