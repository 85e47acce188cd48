"""Is the worker's consumer keeping up, and is it stuck? Lags per input partition, and the two
stall signals (its own ticks stop coming back; unread input is not read), as pure functions of
what the consumer reports, so that each is tested without a broker (:class:`streams.app.TransitionWorker`
feeds them and acts on them)."""

from __future__ import annotations

from typing import Iterable

__all__ = ["consumer_lags", "EXIT_CANNOT_DELIVER", "consumer_stalled", "StallWatch"]


def consumer_lags(assignment: Iterable[tuple[str, int]], highwater, committed, read) -> dict:
    """Lag per assigned partition: ``{(topic, partition): (committed_lag, read_lag)}``.

    Parameters
    ----------
    assignment
        ``(topic, partition)`` pairs (Faust ``TP`` tuples qualify).
    highwater, committed, read
        Functions of a pair: the partition's high watermark (offset of the next message to be
        written), the committed offset (the next to read after a restart), the offset of the last
        message processed; None when unknown. A partition whose high watermark is unknown (no
        fetch answered yet) is left out; one with nothing committed or read counts from 0.

    >>> consumer_lags([("a", 0), ("a", 1)], {("a", 0): 10, ("a", 1): None}.get, {("a", 0): 4}.get,
    ...               {("a", 0): 7}.get)
    {('a', 0): (6, 2)}
    """
    lags = {}
    for tp in assignment:
        hw = highwater(tp)
        if hw is None:
            continue
        done = read(tp)
        lags[tuple(tp)] = (max(0, hw - (committed(tp) or 0)), max(0, hw - (0 if done is None else done + 1)))
    return lags


# Exit status of a worker that stopped because it could not process or deliver: the orchestrator
# restarts it, and it reads again everything it had not committed (EX_SOFTWARE).
EXIT_CANNOT_DELIVER = 70


def consumer_stalled(tick_seen_at: float | None, tick_delivered_at: float | None, stall_timeout_s: float) -> bool:
    """Whether the worker's consumer is stuck: the broker accepted a tick sent more than
    ``stall_timeout_s`` after the last tick the worker handled (times on one monotonic clock).
    Never before the first tick was handled (start-up recovery may take long) nor when the
    broker accepts nothing (a broker that is down is waited for, not a reason to restart);
    ``stall_timeout_s`` 0 turns the check off.

    >>> consumer_stalled(100.0, 150.0, 60.0), consumer_stalled(100.0, 161.0, 60.0)
    (False, True)
    >>> consumer_stalled(None, 500.0, 60.0), consumer_stalled(100.0, None, 60.0), consumer_stalled(100.0, 500.0, 0)
    (False, False, False)
    """
    if not stall_timeout_s or tick_seen_at is None or tick_delivered_at is None:
        return False
    return tick_delivered_at - tick_seen_at > stall_timeout_s


class StallWatch:
    """Which input partitions have held unread records for ``stall_timeout_s`` while their read
    position did not move (0 = never any).

    >>> watch = StallWatch(10.0)
    >>> watch.update(0.0, {("a", 0): (5, 100), ("a", 1): (0, 7)})
    []
    >>> watch.update(8.0, {("a", 0): (5, 100)}), watch.update(11.0, {("a", 0): (5, 100)})
    ([], [('a', 0)])
    >>> watch.update(12.0, {("a", 0): (4, 101)}), watch.update(21.0, {("a", 0): (4, 101)})   # it moved
    ([], [])
    """

    def __init__(self, stall_timeout_s: float):
        self.stall_timeout_s = stall_timeout_s
        self._since: dict[tuple[str, int], tuple[float, int | None]] = {}

    def update(self, now: float, lags: dict[tuple[str, int], tuple[int, int | None]]) -> list[tuple[str, int]]:
        """``lags``: partition → (read lag, read position) now; returns the stuck partitions."""
        stuck = []
        for key in list(self._since):
            if key not in lags or lags[key][0] <= 0:
                del self._since[key]
        for key, (read_lag, position) in lags.items():
            if read_lag <= 0:
                continue
            since, seen = self._since.get(key, (now, position))
            if seen != position:
                since, seen = now, position
            self._since[key] = (since, seen)
            if self.stall_timeout_s and now - since > self.stall_timeout_s:
                stuck.append(key)
        return stuck
