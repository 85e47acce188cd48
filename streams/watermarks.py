"""Event-time watermarks per partition, over several input topics, as a pure class.

Faust does not interleave topics in event time, so one input may be read ahead of the other; a
partition's watermark is the smallest, over the inputs, of the largest event time read from each,
so a window stays open until every input has passed its end. An input that delivered nothing for
``idle_timeout_s`` (wall time) is idle and does not hold the watermark back, unless the consumer
knows of unread messages in it (``caught_up`` says no): a backlog Faust has not fetched for a
while (one topic starved by the other) is not idleness. Watermarks never go back.

>>> wm = Watermarks(("action", "recommendation"), idle_timeout_s=5.0)
>>> wm.advance("action", 0, ts=100.0, now=0.0)
>>> wm.watermark(0, now=1.0, caught_up=lambda source: False) is None   # recommendations unheard
True
>>> wm.advance("recommendation", 0, ts=90.0, now=1.0)
>>> wm.watermark(0, now=2.0, caught_up=lambda source: True)
90.0
>>> wm.watermark(0, now=7.0, caught_up=lambda source: source == "action")   # an unread backlog holds it
90.0
>>> wm.watermark(0, now=7.0, caught_up=lambda source: True)   # both idle: the largest time counts
100.0
>>> wm.watermark(0, now=8.0, caught_up=lambda source: source == "action")   # and it never goes back
100.0
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["Watermarks", "unread_count"]


class Watermarks:
    """The watermark of each partition of ``inputs`` (input names, e.g. ``("action",
    "recommendation")``); times are event times, ``now`` a monotonic wall clock."""

    def __init__(self, inputs: Sequence[str], idle_timeout_s: float):
        self.inputs = tuple(inputs)
        self.idle_timeout_s = idle_timeout_s
        # partition → input → (largest event time read, wall time of the last read)
        self._latest: dict[int, dict[str, tuple[float, float]]] = {}
        self._marks: dict[int, float] = {}

    def advance(self, source: str, partition: int, ts: float, now: float) -> None:
        """A message of input ``source`` with event time ``ts`` was read from ``partition``."""
        latest = self._latest.setdefault(partition, {})
        previous = latest.get(source)
        latest[source] = (ts if previous is None else max(ts, previous[0]), now)

    def last(self, partition: int) -> float | None:
        """The partition's watermark as last computed (None before any)."""
        return self._marks.get(partition)

    def largest_event_time(self, partition: int) -> float | None:
        """The largest event time read from the partition, any input: no watermark can pass it."""
        latest = self._latest.get(partition)
        return max(ts for ts, _ in latest.values()) if latest else None

    def watermark(self, partition: int, now: float, caught_up: Callable[[str], bool]) -> float | None:
        """The partition's watermark now, or None while an input not heard from may still hold
        earlier events; ``caught_up(source)``: whether the consumer knows of no unread message
        of that input in this partition."""
        latest = self._latest.get(partition)
        if not latest:
            return None
        active = [ts for source, (ts, seen) in latest.items()
                  if now - seen < self.idle_timeout_s or not caught_up(source)]
        unheard = [source for source in self.inputs if source not in latest]
        if unheard and (active or not all(caught_up(source) for source in unheard)):
            return None
        wm = min(active) if active else max(ts for ts, _ in latest.values())
        wm = max(wm, self._marks.get(partition, float("-inf")))
        self._marks[partition] = wm
        return wm

    def forget(self, partition: int) -> None:
        """The partition went to another worker: nothing of it is known any more."""
        self._latest.pop(partition, None)
        self._marks.pop(partition, None)


def unread_count(highwater: int | None, next_offset: int | None, answered_ms: float | None,
                 handled_at: float | None) -> int | None:
    """Offsets past ``next_offset`` (the next message to handle) that the consumer's latest fetch
    answer says exist; None when unknown, or when that answer (``answered_ms``, wall ms) is not
    newer than the last message handled (``handled_at``, wall s): a stale high watermark says
    nothing.

    >>> unread_count(10, 7, answered_ms=5000.0, handled_at=4.0), unread_count(10, 7, 3000.0, 4.0)
    (3, None)
    >>> unread_count(10, 12, 5000.0, None), unread_count(None, 7, 5000.0, None)
    (0, None)
    """
    if highwater is None or next_offset is None or answered_ms is None:
        return None
    if handled_at is not None and answered_ms / 1000.0 <= handled_at:
        return None
    return max(0, highwater - next_offset)
