"""The one training loop: replay buffer plus pacing, shared by the learner process and ``memento eval``.

Both the Kafka learner (:class:`learner.service.LearnerService`) and the offline evaluation
(:class:`evaluation.policies.SoftQPolicy`, ``GreedyQPolicy``) train the same way:

1. :meth:`TrainingLoop.add` puts new replay rows in the buffer (a repeated transition id is
   ignored). Once the buffer holds ``learning_starts`` rows, each new row buys
   ``updates_per_transition`` gradient updates of *credit*; credit beyond
   ``max_update_backlog`` is dropped and counted in :attr:`TrainingLoop.dropped`.
2. :meth:`TrainingLoop.step` spends the credit (at most ``max_updates`` per call): sample a
   batch, call ``update(batch)``, which returns the per-row absolute TD errors, or None when the
   update was skipped as non-finite; feed the errors back as priorities (prioritized replay).
3. After every ``publish_every`` successful updates, ``publish()`` is called; it returns
   whether a version went out (a refused one is retried after the next update). With a
   ``clock`` (the learner process: :func:`time.monotonic`), two publications are also at least
   ``publish_min_interval_s`` apart. Without one (the evaluation, which has no wall clock), a
   version goes out exactly every ``publish_every`` successful updates.
4. With a ``drift`` detector (:class:`learner.drift.RewardDrift`), the reward of every new row
   goes to it; the owner publishes ``drift.apply(...)`` of its μ (see
   :meth:`learner.trainer.SoftQLearner.policy_params`). A detected drop makes a publication due
   after the next successful update (not ``publish_every`` updates later), so that the boosted
   μ reaches serving at once.

The pacing options are the fields of :class:`learner.service.LearnerServiceConfig` (any object
with those attributes will do).

>>> from types import SimpleNamespace
>>> from learner.storage import ReplayTransition
>>> pacing = SimpleNamespace(buffer_capacity=64, prioritized=False, priority_alpha=0.6,
...                          priority_beta=0.4, learning_starts=4, updates_per_transition=0.5,
...                          max_update_backlog=100, publish_every=3, publish_min_interval_s=2.0)
>>> loop = TrainingLoop(replay_buffer(pacing, state_dim=2, top_k=2, seed=0), pacing)
>>> rows = [ReplayTransition.empty(f"t{i}", state_dim=2, top_k=2) for i in range(10)]
>>> loop.add(rows[:3]), loop.owed              # below learning_starts: no credit yet
(3, 0)
>>> loop.add(rows[2:]), loop.owed              # t2 again is a duplicate; 7 new rows buy 3.5 updates
(7, 3)
>>> published = []
>>> loop.step(lambda batch: np.zeros(len(batch)), lambda: published.append(1) or True,
...           batch_size=4)
3
>>> loop.updates, len(published), loop.owed, loop.credit
(3, 1, 0, 0.5)
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from learner.buffer import ReplayBuffer
from learner.storage import ReplayBatch, ReplayTransition

if TYPE_CHECKING:  # learner.service imports this module
    from learner.drift import RewardDrift
    from learner.service import LearnerServiceConfig

__all__ = ["TrainingLoop", "replay_buffer"]


def replay_buffer(pacing: LearnerServiceConfig, state_dim: int, top_k: int, seed: int) -> ReplayBuffer:
    """An empty replay buffer as ``pacing`` describes it (capacity, uniform or prioritized)."""
    return ReplayBuffer.create(pacing.buffer_capacity, state_dim, top_k,
                               prioritized=pacing.prioritized, priority_alpha=pacing.priority_alpha,
                               priority_beta=pacing.priority_beta, seed=seed)


class TrainingLoop:
    """A replay buffer and the pacing of the updates it feeds.

    Parameters
    ----------
    buffer
        The replay buffer (:func:`replay_buffer`); may be replaced (e.g. by a restored one).
    pacing
        ``learning_starts``, ``updates_per_transition``, ``max_update_backlog``,
        ``publish_every``, ``publish_min_interval_s`` and ``prioritized``.
    clock
        Seconds, for ``publish_min_interval_s`` (the learner process passes
        :func:`time.monotonic`); None publishes by update count only.
    drift
        Gets the reward of every new row (:class:`learner.drift.RewardDrift`); None: no detector.

    Attributes
    ----------
    credit
        Updates owed, fractional (``updates_per_transition`` may be below 1).
    updates, skipped, dropped
        Successful updates, updates skipped as non-finite, updates dropped beyond the backlog cap.
    published
        Versions published by :meth:`step` (see :meth:`mark_published`).
    since_publish
        Successful updates since the last publication.
    """

    def __init__(self, buffer: ReplayBuffer, pacing: LearnerServiceConfig, *,
                 clock: Callable[[], float] | None = None, drift: RewardDrift | None = None):
        self.buffer = buffer
        self.pacing = pacing
        self.clock = clock
        self.drift = drift
        self.credit = 0.0
        self.updates = 0
        self.skipped = 0
        self.dropped = 0
        self.published = 0
        self.since_publish = 0
        self.drift_pending = False     # a drop was detected since the last publication
        self._last_publish_time = -math.inf

    @property
    def owed(self) -> int:
        """Whole updates the credit pays for now."""
        return int(self.credit)

    def add(self, rows: Iterable[ReplayTransition], on_new: Callable[[int], object] | None = None) -> int:
        """Store ``rows`` (a known transition id is ignored) and accrue the credit they buy;
        returns how many were new. Each new row's reward goes to the drift detector, and its
        position in ``rows`` to ``on_new`` (the learner counts its reward for its prior)."""
        added = 0
        for i, row in enumerate(rows):
            if self.buffer.add(row):
                added += 1
                if on_new is not None:
                    on_new(i)
                if self.drift is not None and self.drift.update(float(row.reward)):
                    self.drift_pending = True
        if len(self.buffer) >= self.pacing.learning_starts:
            owed = self.credit + added * self.pacing.updates_per_transition
            self.credit = min(owed, float(self.pacing.max_update_backlog))
            self.dropped += int(owed - self.credit)
        return added

    @property
    def publish_due(self) -> bool:
        """``publish_every`` successful updates since the last version, or one after a detected
        reward drop (and, with a clock, ``publish_min_interval_s`` seconds)."""
        due = self.since_publish >= self.pacing.publish_every or (self.drift_pending and self.since_publish > 0)
        return due and (
            self.clock is None
            or self.clock() - self._last_publish_time >= self.pacing.publish_min_interval_s)

    def mark_published(self) -> None:
        """Record a publication made outside :meth:`step` (the learner's start-up version)."""
        self.since_publish = 0
        self.drift_pending = False
        if self.clock is not None:
            self._last_publish_time = self.clock()

    def step(self, update: Callable[[ReplayBatch], np.ndarray | None], publish: Callable[[], object], *,
             batch_size: int, max_updates: int | None = None,
             stop: threading.Event | None = None) -> int:
        """Spend the credit: sample, update, reprioritise, publish when due.

        Parameters
        ----------
        update
            One gradient step on a batch; returns the absolute TD error of each row, or None
            when the step was skipped (non-finite).
        publish
            Makes the trained network the one that serves; returns something true when a
            version went out (False or None: refused, retried after the next update).
        batch_size
            Rows per sampled batch.
        max_updates
            Most updates in this call (the rest of the credit waits); None spends it all.
        stop
            Ends the call early once set.

        Returns the number of updates run (skipped ones included).
        """
        done = 0
        while self.credit >= 1.0 and (max_updates is None or done < max_updates) \
                and not (stop is not None and stop.is_set()):
            self.credit -= 1.0
            batch = self.buffer.sample(batch_size)
            td_errors = update(batch)
            done += 1
            if td_errors is None:
                self.skipped += 1
            else:
                self.updates += 1
                self.since_publish += 1
                if self.pacing.prioritized:
                    self.buffer.update_priorities(batch.indices, td_errors)
            if self.publish_due and publish():
                self.published += 1
                self.mark_published()
        return done
