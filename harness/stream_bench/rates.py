"""The sustained rate of a consumer draining a backlog: the slope from 10% to 90% of it, which
leaves out the start-up and the tail."""

from __future__ import annotations

__all__ = ["sustained_span", "sustained_rate"]


def sustained_span(samples: list[tuple[float, float]], total: int) -> tuple[float, float]:
    """The wall times at which a consumer draining a backlog of ``total`` events had processed
    10% and 90% of them (interpolated between ``(wall time, events processed)`` samples).

    >>> sustained_span([(0, 0), (1, 0), (2, 100), (4, 500), (6, 900), (7, 1000)], 1000)
    (2.0, 6.0)
    """
    def time_at(count: float) -> float:
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if c1 >= count > c0:
                return t0 + (t1 - t0) * (count - c0) / (c1 - c0)
        raise ValueError(f"sustained_span: no sample reached {count} events (last: {samples[-1]})")

    return time_at(0.1 * total), time_at(0.9 * total)


def sustained_rate(samples: list[tuple[float, float]], total: int) -> float:
    """Events/s of a consumer draining a backlog of ``total`` events: the slope over
    :func:`sustained_span` (80% of the events), which leaves out the start-up and the tail.

    >>> sustained_rate([(0, 0), (1, 0), (2, 100), (4, 500), (6, 900), (7, 1000)], 1000)
    200.0
    """
    start, end = sustained_span(samples, total)
    return 0.8 * total / (end - start)
