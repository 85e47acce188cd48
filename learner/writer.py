"""Replay writers: where a new transition goes, and whether it goes in at all.

:class:`RingWriter` overwrites the oldest row once the storage is full and rejects a transition
whose id it has already written, so that a message redelivered by Kafka (at-least-once
consumers, restarts, rebalances) is never trained on twice. It remembers the ids still stored
plus the last ``remember_evicted`` ids that were overwritten.

>>> from learner.storage import ArrayStorage, ReplayTransition
>>> storage, writer = ArrayStorage(2, state_dim=2, top_k=1), RingWriter(2)
>>> [writer.write(storage, ReplayTransition.empty(i, state_dim=2, top_k=1)) for i in ("a", "b", "a", "c")]
[0, 1, None, 0]
>>> writer.duplicates, storage.transition_id(0)
(1, 'c')
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from pathlib import Path

import numpy as np

from learner._state import load_state, save_state
from learner.storage import ReplayTransition, Storage

__all__ = ["Writer", "RingWriter"]


class Writer(abc.ABC):
    """Decides the storage row of each new transition. Subclasses implement :meth:`_next_row`."""

    name = "writer"

    def write(self, storage: Storage, transition: ReplayTransition) -> int | None:
        """Store ``transition``; returns its row, or None if it was rejected as a duplicate."""
        if not transition.transition_id:
            raise ValueError("a replay transition needs a non-empty transition_id")
        row = self._next_row(storage, transition)
        if row is not None:
            storage.set(row, transition)
        return row

    @abc.abstractmethod
    def _next_row(self, storage: Storage, transition: ReplayTransition) -> int | None: ...

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None: ...

    @abc.abstractmethod
    def load(self, directory: str | Path) -> None: ...


class RingWriter(Writer):
    """Round-robin writer with duplicate rejection.

    Parameters
    ----------
    capacity
        Number of rows of the storage it writes to.
    remember_evicted
        How many overwritten transition ids are still recognised as duplicates (default: capacity).
    """

    def __init__(self, capacity: int, remember_evicted: int | None = None):
        self.capacity = capacity
        self.remember_evicted = capacity if remember_evicted is None else remember_evicted
        self.cursor = 0            # next row to write
        self.written = 0           # transitions accepted so far
        self.duplicates = 0        # transitions rejected as duplicates
        self._row_of: dict[str, int] = {}
        self._evicted: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, transition_id: str) -> bool:
        return transition_id in self._row_of or transition_id in self._evicted

    def _next_row(self, storage: Storage, transition: ReplayTransition) -> int | None:
        tid = transition.transition_id
        if tid in self:
            self.duplicates += 1
            return None
        row = self.cursor
        old = storage.transition_id(row) if row < len(storage) else None
        if old is not None and self._row_of.get(old) == row:
            del self._row_of[old]
            if self.remember_evicted > 0:
                self._evicted[old] = None
                while len(self._evicted) > self.remember_evicted:
                    self._evicted.popitem(last=False)
        self._row_of[tid] = row
        self.cursor = (row + 1) % self.capacity
        self.written += 1
        return row

    def save(self, directory: str | Path) -> None:
        ids = list(self._row_of)
        arrays = {"stored_ids": np.array(ids, dtype=np.str_),
                  "stored_rows": np.array([self._row_of[i] for i in ids], dtype=np.int64),
                  "evicted_ids": np.array(list(self._evicted), dtype=np.str_)}
        save_state(directory, self.name, arrays, {
            "capacity": self.capacity, "remember_evicted": self.remember_evicted,
            "cursor": self.cursor, "written": self.written, "duplicates": self.duplicates})

    def load(self, directory: str | Path) -> None:
        arrays, meta = load_state(directory, self.name)
        if meta["capacity"] != self.capacity:
            raise ValueError(f"saved writer has capacity {meta['capacity']}, this one {self.capacity}")
        self.cursor, self.written, self.duplicates = meta["cursor"], meta["written"], meta["duplicates"]
        self._row_of = {str(i): int(r) for i, r in zip(arrays["stored_ids"], arrays["stored_rows"])}
        self._evicted = OrderedDict((str(i), None) for i in arrays["evicted_ids"])
