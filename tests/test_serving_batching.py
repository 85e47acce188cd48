"""Micro-batching of recommend requests: batches form under concurrency, results and errors reach
the right caller, and a batched policy decides exactly as the one-state path does."""

import asyncio
import time

import numpy as np
import pytest
import torch

from memento.qnet import QNetwork
from memento.schemas import Case
from memory_store import CaseBank
from serving.batching import MicroBatcher
from serving.policy import PolicyOptions, RetrievalPolicy

DIM = 8


def test_concurrent_submits_form_batches_and_each_caller_gets_its_result():
    sizes: list[int] = []

    async def main():
        batcher = MicroBatcher(lambda items: [f"r{x}" for x in items], max_batch=10,
                               on_batch=lambda n, s: sizes.append(n))
        together = await asyncio.gather(*(batcher.submit(i) for i in range(25)))
        alone = await batcher.submit(99)
        return together, alone, batcher.waiting

    together, alone, waiting = asyncio.run(main())
    assert together == [f"r{i}" for i in range(25)] and alone == "r99" and waiting == 0
    assert sizes == [10, 10, 5, 1]


def test_errors_reach_only_their_callers_or_the_whole_batch():
    def process(items):
        if "boom" in items:
            raise RuntimeError("batch failed")
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async def main():
        batcher = MicroBatcher(process)
        one = await asyncio.gather(batcher.submit(1), batcher.submit(-2), batcher.submit(3),
                                   return_exceptions=True)
        two = await asyncio.gather(batcher.submit("boom"), batcher.submit(4), return_exceptions=True)
        three = await batcher.submit(5)  # the batcher keeps working after a failed batch
        return one, two, three

    one, two, three = asyncio.run(main())
    assert one[0] == 1 and one[2] == 3 and isinstance(one[1], ValueError) and str(one[1]) == "bad -2"
    assert all(isinstance(e, RuntimeError) and str(e) == "batch failed" for e in two)
    assert three == 5


def test_wrong_result_count_is_an_error_not_a_silent_misroute():
    async def main():
        batcher = MicroBatcher(lambda items: items[:1])
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in results)


def test_light_load_adds_no_wait():
    async def main():
        batcher = MicroBatcher(lambda items: items)
        started = time.perf_counter()
        for i in range(50):
            assert await batcher.submit(i) == i
        return (time.perf_counter() - started) / 50

    assert asyncio.run(main()) < 0.005


def _bank(n=60, items=12) -> CaseBank:
    rng = np.random.default_rng(0)
    bank = CaseBank(None, dim=DIM)
    states = rng.normal(size=(n, DIM)).astype(np.float32)
    states /= np.linalg.norm(states, axis=1, keepdims=True)
    vecs = rng.normal(size=(items, DIM)).astype(np.float32)
    bank.add([Case(f"c{i}", states[i].tolist(), f"item{i % items}", vecs[i % items].tolist(),
                   float(i % 4), float(i)) for i in range(n)])
    return bank


def test_batched_decisions_equal_single_state_decisions():
    bank = _bank()
    torch.manual_seed(0)
    policy = RetrievalPolicy(QNetwork(DIM, 16), 5, bank, PolicyOptions(top_k=6, alpha=0.3))
    states = np.random.default_rng(3).normal(size=(9, DIM)).astype(np.float32)
    batched = policy.recommend_many(states, np.random.default_rng(42))
    draws = np.random.default_rng(42).random(9)
    for b, state in enumerate(states):
        single = policy.recommend(state, np.random.default_rng(0))
        got = batched[b]
        assert got.case_ids == single.case_ids and got.policy_version == 5
        np.testing.assert_allclose(got.q, single.q, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.probs, single.probs, rtol=1e-6)
        np.testing.assert_allclose(got.features, single.features)
        # the batch draws one uniform per row, in row order, and inverts μ's CDF
        assert got.chosen == int(np.searchsorted(np.cumsum(got.probs), draws[b], side="right"))


def test_rows_without_candidates_are_none_and_short_rows_are_masked():
    bank = _bank(n=3)
    policy = RetrievalPolicy(QNetwork(DIM, 16), 1, bank, PolicyOptions(top_k=6, min_prob=0.05))
    out = policy.recommend_many(np.ones((2, DIM), np.float32), np.random.default_rng(0))
    assert [len(d.case_ids) for d in out] == [3, 3]
    assert all(d.probs.sum() == pytest.approx(1.0) and d.probs.min() >= 0.05 - 1e-9 for d in out)
    empty = RetrievalPolicy(QNetwork(DIM, 16), 1, CaseBank(None, dim=DIM), PolicyOptions(top_k=4))
    assert empty.recommend_many(np.ones((2, DIM), np.float32), np.random.default_rng(0)) == [None, None]
    with pytest.raises(ValueError, match=r"states must be \[B, D\]"):
        policy.recommend_many(np.ones(DIM, np.float32), np.random.default_rng(0))
