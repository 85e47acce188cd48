"""The evaluation's fast paths give bit-for-bit the results of the code they stand in for."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.fastpath import BufferedCaseBank
from memento.schemas import Case
from evaluation.simulator import SyntheticWorld, WorldConfig
from memory_store import CaseBank

def _case(i, rng, dim):
    state = rng.standard_normal(dim).astype(np.float32)
    if i % 5 == 0:  # repeated states: ties in the search scores
        state = np.ones(dim, np.float32)
    return Case(f"c{i % 97}" if i % 13 == 0 else f"c{i}", state.tolist(), f"item{i % 17}",
                rng.standard_normal(dim).astype(np.float32).tolist(), float(i % 3), float(i),
                "action" if i % 2 else "recommendation")


def test_buffered_bank_searches_like_a_bank_written_case_by_case():
    dim, rng = 4, np.random.default_rng(0)
    plain, buffered = CaseBank(None, dim=dim), BufferedCaseBank(CaseBank(None, dim=dim))
    try:
        for step in range(60):
            cases = [_case(step * 10 + j, rng, dim) for j in range(int(rng.integers(0, 6)))]
            for c in cases:  # the evaluation adds organic cases one at a time
                plain.add([c])
            if step % 2:
                buffered.add(cases)
            else:
                for c in cases:
                    buffered.add_case(c.case_id, np.asarray(c.state, np.float32), c.item_id,
                                      np.asarray(c.item_vec, np.float32), c.outcome, c.ts, c.source)
            queries = np.vstack([np.ones((1, dim), np.float32), rng.standard_normal((2, dim)).astype(np.float32)])
            want = plain.search_with_features(queries, 7)
            got = buffered.search_with_features(queries, 7)
            assert got[0] == want[0]
            for a, b in zip(got[1:], want[1:]):
                assert np.array_equal(a, b)
            for ids in got[0]:
                assert buffered.items_of(ids) == [plain.get(c).item_id for c in ids]
        assert len(buffered) == len(plain)
    finally:
        plain.close()
        buffered.close()


def test_world_response_model_cache_follows_the_taste():
    world = SyntheticWorld(WorldConfig(n_items=30, n_users=4), seed=1)
    fresh = SyntheticWorld(WorldConfig(n_items=30, n_users=4), seed=1)
    user = world.user_ids[1]
    first = world.expected_rewards(user)
    first[:] = -1.0  # a caller's copy: the cache is not touched
    assert world.expected_rewards(user)[0] != -1.0
    for item in world.item_ids[:5]:
        world.consume(user, item)
        fresh.consume(user, item)
        fresh._model_key = None  # no cache: recomputed from scratch
        assert np.array_equal(world.expected_rewards(user), fresh.expected_rewards(user))
        probs, want = world.action_probabilities(user), fresh.action_probabilities(user)
        assert all(np.array_equal(probs[k], want[k]) for k in want)
    world.tastes = world.initial_tastes.copy()  # replaced, not mutated
    fresh.reset_tastes()
    fresh._model_key = None
    assert np.array_equal(world.expected_rewards(user), fresh.expected_rewards(user))


def test_buffered_bank_hands_every_other_use_to_the_bank_after_a_flush():
    buffered = BufferedCaseBank(CaseBank(None, dim=2))
    buffered.add_case("c1", np.ones(2, np.float32), "i1", np.zeros(2, np.float32), 1.0, 0.0, "action")
    assert buffered.get("c1").item_id == "i1" and "c1" in buffered.bank
    with pytest.raises(AttributeError):
        buffered.no_such_method
    buffered.close()
