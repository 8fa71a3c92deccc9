"""The client's retry delay: the same capped, equal-jitter exponential as the server's
``shared/backoff.py`` (tests/test_backoff.py checks that the two agree). The client is a
distribution of its own, installed without the server's code, so it cannot import that one."""

from __future__ import annotations

import random

__all__ = ["backoff"]

_MAX_EXPONENT = 30


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds before retry number ``attempt`` (0 first): in ``[ceiling / 2, ceiling]`` with
    ``ceiling = min(cap, base * 2**attempt)``; never above ``cap``, never raises."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
