"""Which cases a full shard drops to make room: the oldest, or those of lowest utility.

A policy sees the live slots of a shard with their insertion sequence numbers, outcomes and hit
counts (how often the case was retrieved) and picks ``count`` of them.

>>> import numpy as np
>>> slots = np.array([0, 1, 2]); seq = np.array([5, 3, 9]); outcome = np.array([1.0, 0.0, 0.0])
>>> hits = np.array([0, 0, 10])
>>> OldestFirst().select(slots, seq, outcome, hits, 1).tolist()
[1]
>>> LowestUtility(hit_weight=0.5).select(slots, seq, outcome, hits, 1).tolist()
[1]
"""

from __future__ import annotations

import abc

import numpy as np

__all__ = ["EvictionPolicy", "OldestFirst", "LowestUtility", "make_eviction_policy"]


class EvictionPolicy(abc.ABC):
    """Chooses the slots to evict from a full shard."""

    name = ""

    def select(self, slots: np.ndarray, seq: np.ndarray, outcome: np.ndarray, hits: np.ndarray,
               count: int) -> np.ndarray:
        """Return ``count`` entries of ``slots`` to evict (arrays are aligned with ``slots``)."""
        if count <= 0:
            return np.empty(0, np.int64)
        if count >= len(slots):
            return np.asarray(slots, np.int64)
        key = self._key(np.asarray(seq, np.float64), np.asarray(outcome, np.float64),
                        np.asarray(hits, np.float64))
        # Ties broken by age: key first, then insertion sequence.
        order = np.lexsort((seq, key)) if len(slots) <= 4 * count else None
        if order is None:
            part = np.argpartition(key, count)[: count * 2 if count * 2 < len(key) else len(key)]
            order = part[np.lexsort((seq[part], key[part]))]
        return np.asarray(slots, np.int64)[order[:count]]

    @abc.abstractmethod
    def _key(self, seq: np.ndarray, outcome: np.ndarray, hits: np.ndarray) -> np.ndarray:
        """Lower key = evicted first."""


class OldestFirst(EvictionPolicy):
    """Evict in insertion order (first in, first out)."""

    name = "oldest"

    def _key(self, seq, outcome, hits):
        return seq


class LowestUtility(EvictionPolicy):
    """Evict the cases of lowest ``outcome + hit_weight * log1p(hits)``; ties go oldest first.

    Parameters
    ----------
    hit_weight
        Weight of the log hit count (how often retrieval returned the case) against its outcome.
    """

    name = "utility"

    def __init__(self, hit_weight: float = 0.5) -> None:
        self.hit_weight = hit_weight

    def _key(self, seq, outcome, hits):
        return outcome + self.hit_weight * np.log1p(hits)


def make_eviction_policy(name: str, hit_weight: float = 0.5) -> EvictionPolicy:
    if name == "oldest":
        return OldestFirst()
    if name == "utility":
        return LowestUtility(hit_weight)
    raise ValueError(f"unknown eviction policy {name!r}; expected 'oldest' or 'utility'")
