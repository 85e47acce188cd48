"""The evaluation's fast paths give bit-for-bit the results of the code they stand in for."""

from __future__ import annotations

import numpy as np
import pytest

from memento.encoder import HistoryEntry, ItemEncoder, ItemMeta, StateEncoder
from evaluation.fastpath import BufferedCaseBank, ExactStateEncoder
from memento.schemas import Case
from evaluation.simulator import SyntheticWorld, WorldConfig
from memory_store import CaseBank
from streams.attribution import RewardAttribution
from memento.config import RewardWeights

ACTIONS = ["click", "collect", "cart", "purchase", "alipay-like", "rating:4"]


def _histories(rng, n):
    catalogue = {str(i): ItemMeta(str(i), category=f"{i % 5}-{i % 3}", brand=f"b{i % 7}", title=f"t{i % 11} x")
                 for i in range(40)}
    for _ in range(n):
        length = int(rng.integers(0, 60))
        # few distinct times, so that ties in ts (and their order) are exercised
        ts = np.sort(rng.integers(0, max(1, length // 2 + 1), length)).astype(float)
        yield catalogue, [HistoryEntry(str(int(rng.integers(0, 50))), ACTIONS[int(rng.integers(0, len(ACTIONS)))],
                                       float(t)) for t in ts]


@pytest.mark.parametrize("decay,max_len", [(0.85, 30), (0.5, 7), (1.0, 100)])
def test_exact_state_encoder_matches_state_encoder_bit_for_bit(decay, max_len):
    rng = np.random.default_rng(7)
    for catalogue, history in _histories(rng, 300):
        items = ItemEncoder(16, catalogue)
        reference = StateEncoder(items, decay=decay, max_len=max_len)
        fast = ExactStateEncoder(items, decay=decay, max_len=max_len)
        until = float(rng.integers(0, 40)) if rng.random() < 0.7 else None
        want = reference.encode(history, until=until)
        got = fast.encode(history, until=until)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        rows = [[h.item_id, h.action, h.ts, f"e{k}"] for k, h in enumerate(history)]
        ts = float(rng.integers(0, 40))
        want = reference.encode([h for h in history if h.ts < ts])
        assert np.array_equal(fast.state_before(rows, ts), want)


def test_exact_state_encoder_in_the_attribution_gives_the_same_transitions():
    items = ItemEncoder(8)
    attrs = [RewardAttribution(enc(items), RewardWeights(), window_s=60, allowed_lateness_s=0)
             for enc in (StateEncoder, ExactStateEncoder)]
    out = []
    for attr in attrs:
        st = attr.new_state()
        rng = np.random.default_rng(3)
        for i in range(40):
            attr.add_action(st, f"e{i}", str(int(rng.integers(0, 9))), "click", float(i))
        rec = {"request_id": "r1", "user_id": "u", "item_id": "3", "case_id": "c", "propensity": 0.5,
               "policy_version": 1, "ts": 20.0, "state": [0.0] * 8, "case_features": [0.0] * 17}
        attr.add_recommendation(st, rec)
        out.append(attr.close_due(st, watermark=100.0, now=0.0))
    assert out[0] == out[1]


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
