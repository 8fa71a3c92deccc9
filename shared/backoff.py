"""The one retry delay every loop in the suite uses: capped, jittered, exponential.

Equal jitter (half the delay fixed, half random) rather than full jitter: a retry loop of a
server process must neither hammer a dependency that just came back (the fixed half) nor move
in lock-step with its peers (the random half). The exponent is capped before it is raised, so
the formula holds at any attempt count: ``base * 2.0**attempt`` overflows a float past about
a thousand attempts, which is a few hours of outage with sub-second bases.
"""

from __future__ import annotations

import random

__all__ = ["MAX_EXPONENT", "backoff"]

#: 2**30 times any sane base is past any sane cap: attempts beyond it change nothing.
MAX_EXPONENT = 30


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    The delay lies in ``[ceiling / 2, ceiling]`` with ``ceiling = min(cap, base * 2**attempt)``;
    it never exceeds ``cap`` and never raises, whatever ``attempt`` is.
    """
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), MAX_EXPONENT))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
