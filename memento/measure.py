"""Measurement helpers every benchmark shares (the one percentile definition).

>>> percentile([5, 1, 4, 2, 3], 50), percentile(list(range(1, 101)), 99)
(3, 99)
"""

from __future__ import annotations

import math
from typing import Iterable

__all__ = ["percentile"]


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by the nearest-rank method: always one of the values
    measured (a p99 is a latency some request had, not an interpolation between two).
    ValueError when there is none."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile: no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
