"""Replay storage: a fixed-capacity ring of numpy arrays, one row per transition.

A row holds everything one soft-Q update needs, so that training never goes back to the case
bank: the state s, the chosen case's features, μ(c|s) as logged (the propensity), the reward,
the episode-end flag, the candidate cases of s and of s′ (features and validity mask) and the
transition id. The storage only stores: which row to overwrite is the writer's decision and
which rows to train on is the sampler's.

>>> import numpy as np
>>> storage = ArrayStorage(capacity=4, state_dim=2, top_k=3)
>>> t = ReplayTransition.empty("t1", state_dim=2, top_k=3, reward=1.0)
>>> storage.set(0, t)
>>> len(storage), storage.transition_id(0)
(1, 't1')
>>> storage.get(np.array([0]))["reward"]
array([1.], dtype=float32)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from learner._state import load_state, save_state
from memento.encoder import case_feature_dim

__all__ = ["ReplayTransition", "ReplayBatch", "Storage", "ArrayStorage"]


@dataclass(frozen=True)
class ReplayTransition:
    """One transition (s, c, μ(c|s), r, s′, done) with the candidate cases of s and s′.

    Parameters
    ----------
    transition_id
        Unique id (the recommendation's request id); the writer rejects repeats.
    state, next_state
        s and s′, ``[state_dim]``.
    case_features
        Features of the chosen case c, ``[2*state_dim+1]`` (memento.encoder.case_feature_vector).
    reward, done, propensity
        r, whether s′ ends the episode, and μ(c|s) as logged by serving.
    candidate_features, candidate_mask
        The top-K cases retrieved for s, ``[K, 2*state_dim+1]`` and ``[K]`` (True = real case).
        Used for the current policy's μ(c|s) (importance weights, entropy).
    next_candidate_features, next_candidate_mask
        The same for s′; the TD target's soft value is taken over them.
    """

    transition_id: str
    state: np.ndarray
    case_features: np.ndarray
    reward: float
    done: bool
    propensity: float
    next_state: np.ndarray
    candidate_features: np.ndarray
    candidate_mask: np.ndarray
    next_candidate_features: np.ndarray
    next_candidate_mask: np.ndarray

    @classmethod
    def empty(cls, transition_id: str, *, state_dim: int, top_k: int, reward: float = 0.0,
              done: bool = False, propensity: float = 1.0) -> "ReplayTransition":
        """A transition with zero states and no candidates (handy in tests and examples)."""
        f = case_feature_dim(state_dim)
        return cls(transition_id, np.zeros(state_dim, np.float32), np.zeros(f, np.float32),
                   reward, done, propensity, np.zeros(state_dim, np.float32),
                   np.zeros((top_k, f), np.float32), np.zeros(top_k, bool),
                   np.zeros((top_k, f), np.float32), np.zeros(top_k, bool))


@dataclass
class ReplayBatch:
    """A sampled mini-batch: arrays with a leading batch axis, the storage rows they came from
    and the sampler's importance weights (all ones for uniform sampling)."""

    indices: np.ndarray
    weights: np.ndarray
    state: np.ndarray
    case_features: np.ndarray
    reward: np.ndarray
    done: np.ndarray
    propensity: np.ndarray
    next_state: np.ndarray
    candidate_features: np.ndarray
    candidate_mask: np.ndarray
    next_candidate_features: np.ndarray
    next_candidate_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


class Storage(abc.ABC):
    """Where transitions live. Subclasses implement :meth:`_write_row` and :meth:`_read_rows`."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"storage capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def set(self, index: int, transition: ReplayTransition) -> None:
        """Store ``transition`` in row ``index`` (0 ≤ index < capacity)."""
        if not 0 <= index < self.capacity:
            raise IndexError(f"storage row {index} outside [0, {self.capacity})")
        self._write_row(index, transition)
        self._size = max(self._size, index + 1)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The stored fields of the given rows, each with a leading axis of ``len(indices)``."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._size):
            raise IndexError(f"storage rows must lie in [0, {self._size}), got "
                             f"{indices.min()}..{indices.max()}")
        return self._read_rows(indices)

    @abc.abstractmethod
    def _write_row(self, index: int, transition: ReplayTransition) -> None: ...

    @abc.abstractmethod
    def _read_rows(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def transition_id(self, index: int) -> str | None: ...

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None: ...

    @abc.abstractmethod
    def load(self, directory: str | Path) -> None: ...


class ArrayStorage(Storage):
    """Preallocated numpy arrays (float32 features, bool masks).

    Parameters
    ----------
    capacity
        Number of rows; memory is about ``capacity * (2*K + 1) * (2*state_dim + 1) * 4`` bytes.
    state_dim
        Dimension of states (and item vectors).
    top_k
        Number of candidate cases kept for s and for s′.
    """

    name = "storage"

    def __init__(self, capacity: int, state_dim: int, top_k: int):
        super().__init__(capacity)
        self.state_dim, self.top_k = state_dim, top_k
        f = case_feature_dim(state_dim)
        self._shapes = {
            "state": ((state_dim,), np.float32),
            "case_features": ((f,), np.float32),
            "reward": ((), np.float32),
            "done": ((), np.bool_),
            "propensity": ((), np.float32),
            "next_state": ((state_dim,), np.float32),
            "candidate_features": ((top_k, f), np.float32),
            "candidate_mask": ((top_k,), np.bool_),
            "next_candidate_features": ((top_k, f), np.float32),
            "next_candidate_mask": ((top_k,), np.bool_),
        }
        self._arrays = {k: np.zeros((capacity,) + shape, dtype) for k, (shape, dtype) in self._shapes.items()}
        self._ids: list[str | None] = [None] * capacity

    def _write_row(self, index: int, transition: ReplayTransition) -> None:
        for key, (shape, dtype) in self._shapes.items():
            value = np.asarray(getattr(transition, key), dtype=dtype)
            if value.shape != shape:
                raise ValueError(f"transition {transition.transition_id!r}: field {key!r} has shape "
                                 f"{value.shape}, storage expects {shape}")
            self._arrays[key][index] = value
        self._ids[index] = transition.transition_id

    def _read_rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {key: array[indices] for key, array in self._arrays.items()}

    def transition_id(self, index: int) -> str | None:
        return self._ids[index]

    def transition_ids(self) -> list[str | None]:
        """Row → transition id for the filled rows."""
        return list(self._ids[: self._size])

    def save(self, directory: str | Path) -> None:
        n = self._size
        arrays = {key: array[:n] for key, array in self._arrays.items()}
        arrays["transition_id"] = np.array([i or "" for i in self._ids[:n]], dtype=np.str_)
        save_state(directory, self.name, arrays, {"capacity": self.capacity, "size": n,
                                                  "state_dim": self.state_dim, "top_k": self.top_k})

    def load(self, directory: str | Path) -> None:
        arrays, meta = load_state(directory, self.name)
        for key in ("capacity", "state_dim", "top_k"):
            if meta[key] != getattr(self, key):
                raise ValueError(f"saved replay storage has {key}={meta[key]}, this storage has "
                                 f"{getattr(self, key)}")
        n = int(meta["size"])
        for key, array in self._arrays.items():
            array[:] = 0
            array[:n] = arrays[key]
        self._ids = [str(i) or None for i in arrays["transition_id"]] + [None] * (self.capacity - n)
        self._size = n
