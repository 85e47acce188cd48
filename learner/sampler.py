"""Replay samplers: which stored rows a mini-batch trains on.

:class:`UniformSampler` draws rows uniformly with replacement. :class:`PrioritizedSampler` is
proportional prioritized replay (Schaul et al., 2016): row i is drawn with probability
P(i) = p_i^α / Σ_j p_j^α where p_i = |δ_i| + ε is its last TD error, new rows get the largest
priority seen so far, and the bias is corrected with importance weights
w_i = (N·P(i))^(−β) / max_j w_j.

>>> import numpy as np
>>> sampler = PrioritizedSampler(capacity=4, alpha=1.0, beta=1.0, seed=0)
>>> sampler.mark_added(np.arange(4))
>>> sampler.update_priorities(np.array([0, 1, 2, 3]), np.array([0.0, 0.0, 0.0, 9.0]))
>>> indices, weights = sampler.sample(4, batch_size=1000)
>>> float(np.mean(indices == 3)) > 0.9
True
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from learner._state import load_state, save_state

__all__ = ["Sampler", "UniformSampler", "PrioritizedSampler"]


class Sampler(abc.ABC):
    """Chooses rows to train on. Subclasses implement :meth:`_draw`.

    Parameters
    ----------
    seed
        Seed of the sampler's own random generator (its state is saved and restored).
    """

    name = "sampler"

    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)

    def sample(self, size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``batch_size`` rows among the first ``size``; returns (indices, importance weights)."""
        if size <= 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return self._draw(size, batch_size)

    @abc.abstractmethod
    def _draw(self, size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]: ...

    def mark_added(self, indices: np.ndarray) -> None:
        """Rows that were just (over)written."""

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities (absolute TD errors) for rows that were trained on."""

    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _meta(self) -> dict:
        return {}

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        pass

    def save(self, directory: str | Path) -> None:
        meta = {"kind": type(self).__name__, "rng": self.rng.bit_generator.state, **self._meta()}
        save_state(directory, self.name, self._arrays(), meta)

    def load(self, directory: str | Path) -> None:
        arrays, meta = load_state(directory, self.name)
        if meta["kind"] != type(self).__name__:
            raise ValueError(f"saved sampler is a {meta['kind']}, this buffer uses a "
                             f"{type(self).__name__}")
        self.rng.bit_generator.state = meta["rng"]
        self._restore(arrays, meta)


class UniformSampler(Sampler):
    """Every stored row equally likely; importance weights are all one."""

    def _draw(self, size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rng.integers(0, size, batch_size), np.ones(batch_size, np.float32)


class PrioritizedSampler(Sampler):
    """Proportional prioritized replay.

    Parameters
    ----------
    capacity
        Number of rows of the storage it samples from.
    alpha
        Priority exponent α: 0 is uniform sampling, 1 is fully proportional.
    beta
        Importance-weight exponent β: 1 fully corrects the sampling bias, 0 does not correct it.
    eps
        Added to |δ| so that no row's probability is ever zero.
    seed
        Seed of the sampler's random generator.

    Sampling takes a cumulative sum over the stored rows, O(N) per batch; for the buffer sizes
    used here (≤ 1e5) that costs less than one network update.
    """

    def __init__(self, capacity: int, alpha: float = 0.6, beta: float = 0.4, eps: float = 1e-3,
                 seed: int | None = None):
        super().__init__(seed)
        if alpha < 0 or beta < 0 or eps <= 0:
            raise ValueError(f"prioritized sampler needs alpha >= 0, beta >= 0, eps > 0; got "
                             f"alpha={alpha}, beta={beta}, eps={eps}")
        self.capacity, self.alpha, self.beta, self.eps = capacity, alpha, beta, eps
        self.priorities = np.zeros(capacity, np.float64)  # p_i^α
        self.max_priority = 1.0                            # largest p_i seen (before ^α)

    def mark_added(self, indices: np.ndarray) -> None:
        self.priorities[np.asarray(indices)] = self.max_priority ** self.alpha

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        p = np.abs(np.asarray(priorities, np.float64)) + self.eps
        if not np.isfinite(p).all():
            raise ValueError("prioritized sampler: non-finite priority")
        self.priorities[np.asarray(indices)] = p ** self.alpha
        self.max_priority = max(self.max_priority, float(p.max(initial=0.0)))

    def probabilities(self, size: int) -> np.ndarray:
        """P(i) for the first ``size`` rows."""
        p = self.priorities[:size]
        return p / p.sum()

    def _draw(self, size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.priorities[:size]
        cumulative = np.cumsum(p)
        targets = self.rng.random(batch_size) * cumulative[-1]
        indices = np.minimum(np.searchsorted(cumulative, targets, side="right"), size - 1)
        probs = p / cumulative[-1]
        weights = (size * probs[indices]) ** (-self.beta)
        max_weight = (size * probs.min()) ** (-self.beta)
        return indices, (weights / max_weight).astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"priorities": self.priorities}

    def _meta(self) -> dict:
        return {"capacity": self.capacity, "alpha": self.alpha, "beta": self.beta, "eps": self.eps,
                "max_priority": self.max_priority}

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if meta["capacity"] != self.capacity:
            raise ValueError(f"saved sampler has capacity {meta['capacity']}, this one {self.capacity}")
        if meta["alpha"] != self.alpha:
            raise ValueError(f"saved priorities use alpha={meta['alpha']}, this sampler alpha={self.alpha}")
        self.priorities[:] = arrays["priorities"]
        self.max_priority = float(meta["max_priority"])
