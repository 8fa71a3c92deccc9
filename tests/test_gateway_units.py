"""The gateway's pure parts, without sockets: origin policy, token bucket, backoff, settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.gateway.connection import TokenBucket
from services.gateway.hub import backoff
from services.gateway.origins import OriginPolicy
from services.gateway.settings import PREFIX, Settings
from shared.settings import SettingsError, load
from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "gw:8100", True),  # not a browser
        ("http://gw:8100", "gw:8100", True),  # same origin
        ("https://gw", "gw:443", True),
        ("http://localhost:5173", "gw:8100", True),
        ("http://127.0.0.1:1", "gw:8100", True),
        ("http://[::1]:8080", "gw:8100", True),
        ("https://evil.example", "gw:8100", False),
        ("http://localhost.evil.example", "gw:8100", False),
        ("null", "gw:8100", False),
        ("file://", "gw:8100", False),
        ("garbage", "gw:8100", False),
    ],
)
def test_default_origin_policy(origin, host, allowed):
    assert OriginPolicy(()).allows(origin, host) is allowed


def test_configured_origins_replace_the_localhost_default():
    policy = OriginPolicy(("https://app.example.com",), public_ws_url="wss://edge.example.com/ws")
    assert policy.allows("https://app.example.com", "gw:8100")
    assert policy.allows("https://APP.example.com:443", "gw:8100")
    assert policy.allows("https://edge.example.com", "gw:8100")
    assert policy.allows("http://gw:8100", "gw:8100")  # same origin is always fine
    assert not policy.allows("http://localhost:3000", "gw:8100")
    assert not policy.allows("http://app.example.com", "gw:8100")  # scheme matters
    assert OriginPolicy(("*",)).allows("https://anything.example", "gw:8100")


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=10, burst=3)
    start = bucket.stamp
    assert [bucket.take(start) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(start + 0.1)  # one token back after 1/rate seconds
    assert not bucket.take(start + 0.1)


def test_backoff_is_capped_and_jittered():
    values = [backoff(n, 0.1, 2.0) for n in range(1, 40)]
    assert all(0 < v <= 2.0 for v in values)
    assert max(values) > 1.0  # reaches the cap region
    assert backoff(1, 0.1, 2.0) <= 0.2


def test_settings_validate_and_report_unknown_variables():
    assert load(Settings, PREFIX, {}).port == 8100
    with pytest.raises(SettingsError, match="GATEWAY_MAX_FRAME_BYTE"):
        load(Settings, PREFIX, {"GATEWAY_MAX_FRAME_BYTE": "1"})
    with pytest.raises(SettingsError, match="GATEWAY_RATE_LIMIT_BURST"):
        load(Settings, PREFIX, {"GATEWAY_RATE_LIMIT_BURST": "0"})
    with pytest.raises(SettingsError, match="RECORD_TTL"):
        load(
            Settings,
            PREFIX,
            {"GATEWAY_RECORD_TTL_SECONDS": "1", "GATEWAY_LIVENESS_FLUSH_SECONDS": "5"},
        )
    assert "'***'" in repr(load(Settings, PREFIX, {}))


def test_help_lists_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "services.gateway", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for field in Settings.__dataclass_fields__:
        assert PREFIX + field.upper() in out, field
