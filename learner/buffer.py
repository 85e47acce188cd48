"""The replay buffer: a storage, a sampler and a writer behind one small interface.

>>> buffer = ReplayBuffer.create(capacity=8, state_dim=2, top_k=2, seed=0)
>>> buffer.add(ReplayTransition.empty("t1", state_dim=2, top_k=2, reward=1.0))
True
>>> buffer.add(ReplayTransition.empty("t1", state_dim=2, top_k=2))   # duplicate id
False
>>> batch = buffer.sample(4)
>>> len(batch), float(batch.reward.sum())
(4, 4.0)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from learner.sampler import PrioritizedSampler, Sampler, UniformSampler
from learner.storage import ArrayStorage, ReplayBatch, ReplayTransition, Storage
from learner.writer import RingWriter, Writer

__all__ = ["ReplayBuffer", "ReplayTransition", "ReplayBatch"]


class ReplayBuffer:
    """Transitions in, mini-batches out.

    Parameters
    ----------
    storage
        Holds the rows (:class:`~learner.storage.ArrayStorage`).
    sampler
        Picks the rows of a batch (:class:`~learner.sampler.UniformSampler` or
        :class:`~learner.sampler.PrioritizedSampler`).
    writer
        Picks the row of a new transition and rejects duplicates (:class:`~learner.writer.RingWriter`).
    """

    def __init__(self, storage: Storage, sampler: Sampler, writer: Writer):
        self.storage, self.sampler, self.writer = storage, sampler, writer

    @classmethod
    def create(cls, capacity: int, state_dim: int, top_k: int, *, prioritized: bool = False,
               priority_alpha: float = 0.6, priority_beta: float = 0.4,
               seed: int | None = None) -> "ReplayBuffer":
        """An :class:`ArrayStorage` ring with a uniform or prioritized sampler."""
        sampler = (PrioritizedSampler(capacity, priority_alpha, priority_beta, seed=seed) if prioritized
                   else UniformSampler(seed=seed))
        return cls(ArrayStorage(capacity, state_dim, top_k), sampler, RingWriter(capacity))

    def __len__(self) -> int:
        return len(self.storage)

    @property
    def duplicates(self) -> int:
        return getattr(self.writer, "duplicates", 0)

    def add(self, transition: ReplayTransition) -> bool:
        """Store ``transition``; False when its id was already written (nothing changes)."""
        row = self.writer.write(self.storage, transition)
        if row is None:
            return False
        self.sampler.mark_added(np.array([row]))
        return True

    def sample(self, batch_size: int) -> ReplayBatch:
        indices, weights = self.sampler.sample(len(self.storage), batch_size)
        return ReplayBatch(indices=indices, weights=weights, **self.storage.get(indices))

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.sampler.update_priorities(indices, td_errors)

    def save(self, path: str | Path) -> None:
        """Write the three parts' state under directory ``path``, replacing it atomically."""
        path = Path(path)
        staging = path.with_name(path.name + ".saving")
        shutil.rmtree(staging, ignore_errors=True)
        for part in (self.storage, self.sampler, self.writer):
            part.save(staging)
        previous = path.with_name(path.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            path.rename(previous)
        staging.rename(path)
        shutil.rmtree(previous, ignore_errors=True)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote; ``FileNotFoundError`` if nothing was saved there."""
        path = Path(path)
        if not path.is_dir():
            previous = path.with_name(path.name + ".previous")
            if previous.is_dir():  # a crash between the two renames of save()
                path = previous
            else:
                raise FileNotFoundError(f"no saved replay buffer at {path}")
        for part in (self.storage, self.sampler, self.writer):
            part.load(path)
