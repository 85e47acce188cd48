"""The one training loop (learner.loop.TrainingLoop) that the learner process and `memento eval`
share: credit, backlog cap, per-call cap, publication by update count and by clock."""

from __future__ import annotations

import threading

import numpy as np

from learner.loop import TrainingLoop, replay_buffer
from learner.service import LearnerServiceConfig
from learner.storage import ReplayTransition

D, K = 2, 2


def _rows(n: int, start: int = 0) -> list[ReplayTransition]:
    return [ReplayTransition.empty(f"t{i}", state_dim=D, top_k=K) for i in range(start, start + n)]


def _loop(clock=None, **pacing) -> TrainingLoop:
    options = LearnerServiceConfig(**{"learning_starts": 4, "buffer_capacity": 64, **pacing})
    return TrainingLoop(replay_buffer(options, D, K, seed=0), options, clock=clock)


class _Trainer:
    """An update function that fails on chosen calls, and a publish function that may refuse."""

    def __init__(self, skip=(), refuse=0):
        self.calls, self.skip, self.refuse, self.versions = 0, set(skip), refuse, []

    def update(self, batch):
        self.calls += 1
        return None if self.calls in self.skip else np.full(len(batch), 0.5)

    def publish(self):
        if self.refuse > 0:
            self.refuse -= 1
            return None
        self.versions.append(self.calls)
        return True


def test_credit_starts_at_learning_starts_and_caps_at_the_backlog():
    loop = _loop(updates_per_transition=2.0, max_update_backlog=10)
    assert loop.add(_rows(3)) == 3 and loop.credit == 0.0          # below learning_starts
    assert loop.add(_rows(3)) == 0                                 # the same ids: duplicates
    assert loop.add(_rows(2, start=3)) == 2 and loop.owed == 4
    assert loop.add(_rows(5, start=5)) == 5                        # 4 + 10 owed, capped at 10
    assert loop.owed == 10 and loop.dropped == 4


def test_step_spends_the_credit_at_most_max_updates_per_call_and_stops():
    loop = _loop(updates_per_transition=1.0)
    loop.add(_rows(10))
    t = _Trainer()
    assert loop.step(t.update, t.publish, batch_size=4, max_updates=3) == 3 and loop.owed == 7
    stop = threading.Event()
    stop.set()
    assert loop.step(t.update, t.publish, batch_size=4, stop=stop) == 0
    assert loop.step(t.update, t.publish, batch_size=4) == 7 and loop.owed == 0 and loop.updates == 10


def test_without_a_clock_a_version_goes_out_exactly_every_publish_every_successful_updates():
    loop = _loop(updates_per_transition=1.0, publish_every=3, publish_min_interval_s=1e9)
    loop.add(_rows(12))
    t = _Trainer(skip={2, 7})                       # skipped updates do not count toward a version
    loop.step(t.update, t.publish, batch_size=4)
    assert t.versions == [4, 8, 11] and loop.published == 3
    assert (loop.updates, loop.skipped) == (10, 2)


def test_a_refused_publication_is_retried_after_the_next_update():
    loop = _loop(updates_per_transition=1.0, publish_every=2)
    loop.add(_rows(8))
    t = _Trainer(refuse=2)
    loop.step(t.update, t.publish, batch_size=4)
    assert t.versions == [4, 6, 8]


def test_with_a_clock_versions_are_also_publish_min_interval_s_apart():
    now = [0.0]
    loop = _loop(clock=lambda: now[0], updates_per_transition=1.0, publish_every=2,
                 publish_min_interval_s=10.0)
    loop.add(_rows(12))
    t = _Trainer()

    def update(batch):
        now[0] += 3.0                               # each update takes 3 s
        return t.update(batch)

    loop.step(update, t.publish, batch_size=4)
    assert t.versions == [2, 6, 10]                 # at 6 s, 18 s, 30 s
    loop.mark_published()                           # e.g. the learner's start-up version
    assert loop.since_publish == 0 and not loop.publish_due


def test_prioritized_replay_gets_the_td_errors_of_the_sampled_rows():
    loop = _loop(updates_per_transition=1.0, prioritized=True)
    loop.add(_rows(8))
    seen = []
    loop.buffer.update_priorities = lambda indices, errors: seen.append((indices.copy(), errors))
    loop.step(lambda batch: np.arange(len(batch), dtype=np.float64), lambda: True, batch_size=4,
              max_updates=2)
    assert len(seen) == 2 and all(len(i) == 4 and e.tolist() == [0, 1, 2, 3] for i, e in seen)


def test_the_service_and_the_evaluation_train_in_this_loop():
    from learner.service import LearnerService
    from learner.trainer import SoftQConfig
    from memento.config import Settings
    from evaluation.policies import GreedyQPolicy, SoftQPolicy

    service = LearnerService(Settings(item_dim=4, top_k=2), SoftQConfig(top_k=2, hidden=8))
    assert isinstance(service.loop, TrainingLoop) and service.buffer is service.loop.buffer
    assert service.loop.clock is not None
    pacing = LearnerServiceConfig()
    for policy in (SoftQPolicy(None, 4, SoftQConfig(top_k=2, hidden=8), pacing),
                   GreedyQPolicy(None, 4, 2, pacing, network={"hidden": 8})):
        assert isinstance(policy.loop, TrainingLoop) and policy.loop.clock is None
