"""shared/backoff.py, THE retry delay, and every retry loop that uses it, at attempt counts a
long outage reaches (``base * 2.0**attempt`` overflows a float past attempt 1023)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.eviction_worker.reporter import TrafficCopReporter
from services.eviction_worker.settings import EvictionSettings
from services.eviction_worker.worker import Evictor
from services.gateway.settings import GatewaySettings
from services.post_office_api.settings import ApiSettings
from shared.backoff import MAX_EXPONENT, backoff
from shared.discovery import registration_context


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _parameters(func: Any) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(func).parameters.items()}


def _retry_paths() -> dict[str, tuple[float, float]]:
    """(base, cap) of every retry loop, as its defaults configure it."""
    gateway, api, worker = (
        _defaults(GatewaySettings),
        _defaults(ApiSettings),
        _defaults(EvictionSettings),
    )
    discovery = _parameters(registration_context)
    reporter = _parameters(TrafficCopReporter.__init__)
    interval = worker["interval_seconds"]
    return {
        "gateway pub/sub": (
            gateway["pubsub_backoff_base_seconds"],
            gateway["pubsub_backoff_cap_seconds"],
        ),
        "gateway publisher": (
            gateway["breaker_backoff_base_seconds"],
            gateway["breaker_backoff_cap_seconds"],
        ),
        "api pub/sub": (api["pubsub_backoff_base_seconds"], api["pubsub_backoff_cap_seconds"]),
        "consul registration": (discovery["retry_base"], discovery["retry_cap"]),
        "eviction loop": (interval, max(interval, worker["error_backoff_cap_seconds"])),
        "eviction loop (run's default cap)": (
            interval,
            max(interval, _parameters(Evictor.run)["error_backoff_cap"]),
        ),
        "traffic cop reports": (reporter["backoff_base"], reporter["backoff_cap"]),
    }


def test_every_retry_path_at_attempt_ten_thousand() -> None:
    for path, (base, cap) in _retry_paths().items():
        for attempt in (1023, 1024, 1075, 10_000, 10**9):
            delay = backoff(attempt, base, cap)
            assert cap / 2 <= delay <= cap, (path, attempt, delay)


def test_the_first_retries_grow_from_base() -> None:
    assert 0.05 <= backoff(0, 0.1, 100.0) <= 0.1
    assert 0.4 <= backoff(3, 0.1, 100.0) <= 0.8
    assert backoff(-5, 0.1, 100.0) <= 0.1  # a negative attempt is the first retry
    # Past MAX_EXPONENT the attempt count changes nothing, even far below the cap.
    ceiling = 1e-12 * 2.0**MAX_EXPONENT
    for attempt in (MAX_EXPONENT, MAX_EXPONENT + 1, 10_000):
        assert ceiling / 2 <= backoff(attempt, 1e-12, 1e9) <= ceiling


@given(
    attempt=st.integers(min_value=0, max_value=10**12),
    base=st.floats(min_value=1e-6, max_value=60.0),
    cap=st.floats(min_value=1e-6, max_value=3600.0),
)
def test_backoff_never_raises_and_never_exceeds_its_ceiling(
    attempt: int, base: float, cap: float
) -> None:
    ceiling = min(cap, base * 2.0 ** min(attempt, MAX_EXPONENT))
    delay = backoff(attempt, base, cap)
    assert ceiling / 2 <= delay <= ceiling <= cap


def test_the_client_s_copy_agrees_with_shared_backoff() -> None:
    # post_office_client is installed on its own and cannot import shared/: its copy must
    # compute the same delays.
    import random

    from post_office_client._backoff import backoff as client_backoff

    for attempt in (0, 1, 5, 29, 30, 31, 1023, 10_000):
        for base, cap in ((0.05, 5.0), (0.5, 30.0), (1e-3, 1e9)):
            random.seed(attempt)
            server = backoff(attempt, base, cap)
            random.seed(attempt)
            assert client_backoff(attempt, base, cap) == server
