"""Replay buffer parts: storage, samplers, writer, and the save/restore round trip."""

from __future__ import annotations

import numpy as np
import pytest

from learner.buffer import ReplayBuffer
from learner.sampler import PrioritizedSampler, UniformSampler
from learner.storage import ArrayStorage, ReplayTransition
from learner.writer import RingWriter

D, K = 3, 2


def _transition(i: int, rng: np.random.Generator) -> ReplayTransition:
    f = 2 * D + 1
    return ReplayTransition(
        f"req-{i}", rng.normal(size=D).astype(np.float32), rng.normal(size=f).astype(np.float32),
        float(i), bool(i % 3 == 0), 0.25, rng.normal(size=D).astype(np.float32),
        rng.normal(size=(K, f)).astype(np.float32), rng.random(K) < 0.5,
        rng.normal(size=(K, f)).astype(np.float32), rng.random(K) < 0.5)


def test_ring_overwrites_oldest_and_rejects_duplicates():
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer.create(capacity=5, state_dim=D, top_k=K, seed=0)
    transitions = [_transition(i, rng) for i in range(8)]
    assert all(buffer.add(t) for t in transitions)
    assert len(buffer) == 5 and buffer.writer.cursor == 3
    ids = buffer.storage.transition_ids()
    assert ids == ["req-5", "req-6", "req-7", "req-3", "req-4"]
    # stored and recently evicted ids are both duplicates; nothing is overwritten by them
    assert not buffer.add(transitions[6]) and not buffer.add(transitions[0])
    assert buffer.duplicates == 2 and buffer.writer.cursor == 3
    assert buffer.storage.transition_ids() == ids
    row = buffer.storage.get(np.array([0]))
    np.testing.assert_array_equal(row["state"][0], transitions[5].state)
    assert row["reward"][0] == 5.0


def test_writer_forgets_evicted_ids_beyond_its_memory():
    storage, writer = ArrayStorage(2, D, K), RingWriter(2, remember_evicted=1)
    t = [ReplayTransition.empty(f"t{i}", state_dim=D, top_k=K) for i in range(4)]
    for x in t:
        writer.write(storage, x)
    assert "t1" in writer and "t0" not in writer     # t1 evicted last, t0 forgotten
    assert writer.write(storage, t[1]) is None and writer.write(storage, t[0]) == 0


def test_storage_rejects_wrong_shapes():
    storage = ArrayStorage(4, D, K)
    bad = ReplayTransition.empty("x", state_dim=D + 1, top_k=K)
    with pytest.raises(ValueError, match="field 'state' has shape"):
        storage.set(0, bad)


def test_prioritized_sampling_and_importance_weights():
    sampler = PrioritizedSampler(capacity=4, alpha=1.0, beta=1.0, eps=1e-6, seed=0)
    sampler.mark_added(np.arange(4))
    sampler.update_priorities(np.arange(4), np.array([1.0, 1.0, 2.0, 4.0]))
    indices, weights = sampler.sample(4, 20000)
    freq = np.bincount(indices, minlength=4) / len(indices)
    np.testing.assert_allclose(freq, [0.125, 0.125, 0.25, 0.5], atol=0.015)
    # w_i = (N·P(i))^-β / max_j w_j: rows with P=1/8 get weight 1, P=1/2 gets 1/4
    expected = {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.25}
    for i, w in zip(indices[:50], weights[:50]):
        assert w == pytest.approx(expected[int(i)], rel=1e-4)
    # a new row gets the largest priority seen so far
    sampler.mark_added(np.array([0]))
    assert sampler.probabilities(4)[0] == pytest.approx(4.0 / (4 + 1 + 2 + 4), rel=1e-4)


@pytest.mark.parametrize("prioritized", [False, True])
def test_save_restore_round_trip(tmp_path, prioritized):
    rng = np.random.default_rng(1)
    buffer = ReplayBuffer.create(capacity=6, state_dim=D, top_k=K, prioritized=prioritized, seed=7)
    for i in range(9):
        buffer.add(_transition(i, rng))
    buffer.add(_transition(7, rng))                                # a duplicate, counted
    batch = buffer.sample(4)
    buffer.update_priorities(batch.indices, rng.random(4) * 3)
    buffer.save(tmp_path / "replay")

    restored = ReplayBuffer.create(capacity=6, state_dim=D, top_k=K, prioritized=prioritized, seed=123)
    restored.load(tmp_path / "replay")
    assert len(restored) == len(buffer) == 6
    assert restored.writer.cursor == buffer.writer.cursor == 3
    assert restored.writer.written == 9 and restored.duplicates == 1
    assert restored.storage.transition_ids() == buffer.storage.transition_ids()
    rows = np.arange(6)
    for key, value in buffer.storage.get(rows).items():
        np.testing.assert_array_equal(restored.storage.get(rows)[key], value, err_msg=key)
    if prioritized:
        np.testing.assert_array_equal(restored.sampler.priorities, buffer.sampler.priorities)
        assert restored.sampler.max_priority == buffer.sampler.max_priority
    # same sampler RNG state: the next batches are identical
    a, b = buffer.sample(5), restored.sample(5)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)
    # duplicates are still recognised after the restore, evicted ones included
    assert not restored.add(_transition(8, rng)) and not restored.add(_transition(1, rng))
    assert restored.add(_transition(9, rng)) and restored.writer.cursor == 4


def test_load_refuses_mismatched_buffer_and_missing_state(tmp_path):
    buffer = ReplayBuffer.create(capacity=4, state_dim=D, top_k=K, prioritized=True)
    buffer.add(ReplayTransition.empty("a", state_dim=D, top_k=K))
    buffer.save(tmp_path / "replay")
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer.create(capacity=8, state_dim=D, top_k=K, prioritized=True).load(tmp_path / "replay")
    with pytest.raises(ValueError, match="PrioritizedSampler"):
        ReplayBuffer.create(capacity=4, state_dim=D, top_k=K).load(tmp_path / "replay")
    with pytest.raises(FileNotFoundError, match="no saved replay buffer"):
        buffer.load(tmp_path / "nothing")


def test_sampling_an_empty_buffer_is_an_error():
    with pytest.raises(ValueError, match="empty replay buffer"):
        UniformSampler(seed=0).sample(0, 4)
