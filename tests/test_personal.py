"""The user's own memory: their newest cases join the candidates, and the recency prior ranks
their recent items first (memento.personal, serving and the evaluation alike)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from memento.config import DEFAULT_ALTERNATIVE_PRIORS, Settings
from memento.encoder import HistoryEntry, ItemEncoder
from memento.personal import UserMemory, recent_vectors, user_memory, with_population
from memento.priors import RetrievalPrior, parse_priors
from memento.qnet import QNetwork
from memento.schemas import Action, Case, encode, organic_case_id
from memento.softq import own_recency
from memory_store import CaseBank
from serving.policy import PolicyOptions, RetrievalPolicy

D = 8
ITEMS = ItemEncoder(D)


def _unit(v) -> list[float]:
    v = np.asarray(v, np.float32)
    return (v / np.linalg.norm(v)).tolist()


def _bank() -> tuple[CaseBank, np.ndarray]:
    """Ten cases of other users near the query, and the user's own case farther from it (cosine 0.6)."""
    rng = np.random.default_rng(0)
    query = np.asarray(_unit(rng.normal(size=D)), np.float32)
    bank = CaseBank(None, dim=D)
    near = [Case(f"c{i}", _unit(query + 0.1 * rng.normal(size=D)), f"i{i}", ITEMS.encode(f"i{i}").tolist(), 1.0, 0.0)
            for i in range(10)]
    side = rng.normal(size=D)
    side = np.asarray(_unit(side - (side @ query) * query), np.float32)   # orthogonal to the query
    own = Case(organic_case_id("e1"), _unit(0.6 * query + 0.8 * side), "mine", ITEMS.encode("mine").tolist(), 1.0, 0.0)
    bank.add(near + [own])
    return bank, query


def test_user_memory_keeps_the_newest_case_of_each_distinct_item_newest_first():
    history = [HistoryEntry("a", "click", 1.0, "e1"), HistoryEntry("b", "click", 2.0, "e2"),
               HistoryEntry("a", "cart", 3.0, "e3"), HistoryEntry("c", "click", 3.0, "e4")]
    memory = user_memory(history, limit=8)
    # a tie in time keeps the later entry as the newer one
    assert memory == UserMemory(("c", "a", "b"), ("act:e4", "act:e3", "act:e2"))
    assert user_memory(history, limit=1) == UserMemory(("c",), ("act:e4",))
    assert user_memory(history, limit=0) == UserMemory()


def test_own_recency_weighs_by_the_rank_of_the_item_among_the_recent_ones():
    cases = np.zeros((1, 3, 2 * D + 1), np.float32)
    for k, item in enumerate(["x", "b", "a"]):
        cases[0, k, D:2 * D] = ITEMS.encode(item)
    vecs, mask = recent_vectors([UserMemory(("a", "b"))], ITEMS)
    assert own_recency(cases, vecs, mask).tolist() == [[0.0, 0.5, 1.0]]
    assert own_recency(cases, vecs, np.zeros_like(mask)).tolist() == [[0.0, 0.0, 0.0]]


def test_the_users_own_case_joins_the_nearest_and_the_recency_prior_chooses_it():
    bank, query = _bank()
    memory = user_memory([HistoryEntry("mine", "click", 1.0, "e1")], limit=16)
    options = PolicyOptions(top_k=4, min_prob=0.0, priors=(RetrievalPrior.parse("1000:0:1000").entry(1.0),))
    policy = RetrievalPolicy(QNetwork(D, 8), 1, bank, options)
    rng = np.random.default_rng(0)

    alone = policy.recommend_many(query[None], rng)[0]
    assert organic_case_id("e1") not in alone.case_ids and len(alone.case_ids) == 4

    decision = policy.recommend_many(query[None], rng, [memory], recent_vectors([memory], ITEMS))[0]
    assert decision.case_ids[:4] == alone.case_ids and decision.case_ids[4] == organic_case_id("e1")
    assert decision.case_id == organic_case_id("e1") and decision.propensity > 0.99
    # the same candidates without the recent items: nearness alone, the own case is the farthest
    plain = policy.recommend_many(query[None], rng, [memory])[0]
    assert plain.case_ids == decision.case_ids and plain.probs[4] < 1e-6

    # no own cases when serving is told so, and a memory naming cases the bank lacks adds nothing
    off = RetrievalPolicy(QNetwork(D, 8), 1, bank, PolicyOptions(top_k=4, own_cases=0))
    assert off.recommend_many(query[None], rng, [memory])[0].case_ids == alone.case_ids
    ghost = UserMemory(("x",), ("act:nope",))
    assert policy.recommend_many(query[None], rng, [ghost])[0].case_ids == alone.case_ids


def test_serving_feeds_the_users_history_from_the_actions_topic_into_the_candidates(tmp_path):
    from serving.app import ServingConfig, ServingService
    from serving.followers import ActionFollower

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=D, top_k=4)
    service = ServingService(settings, ServingConfig(options=PolicyOptions(top_k=4, min_prob=0.0)))
    bank, query = _bank()
    service.bank = bank
    options = PolicyOptions(top_k=4, min_prob=0.0, priors=(RetrievalPrior.parse("1000:0:1000").entry(1.0),))
    service.policy = RetrievalPolicy(QNetwork(D, 8), 1, bank, options)
    follower = ActionFollower(settings, service.histories, service.metrics)
    action = Action(event_id="e1", user_id="u", item_id="mine", action="click", ts=1.0)
    follower._handle([SimpleNamespace(topic=follower.topic, partition=0, offset=0, value=encode(action))])

    history = service.histories.get("u")
    assert history == [HistoryEntry("mine", "click", 1.0, "e1")]
    [decision] = service._decide_batch([(query, user_memory(history, service.options.own_cases))])
    assert decision.case_id == organic_case_id("e1")
    [stranger] = service._decide_batch([(query, user_memory([], service.options.own_cases))])
    assert organic_case_id("e1") not in stranger.case_ids


def test_a_user_with_little_history_backs_off_to_what_users_act_on_most(tmp_path):
    """Serving completes a short memory with the items users acted on most (their organic
    cases join the candidates); under the own-items prior a stranger gets the most acted-on
    item, a user with history their own item first and the most popular ones after it."""
    from serving.app import ServingConfig, ServingService

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=D, top_k=4)
    service = ServingService(settings, ServingConfig(options=PolicyOptions(top_k=4, min_prob=0.0)))
    bank, query = _bank()
    rng = np.random.default_rng(1)
    acted = ["hit"] * 3 + ["second"] * 2 + ["third"]      # other users' own actions, far from the query
    bank.add([Case(organic_case_id(f"o{i}"), _unit(rng.normal(size=D)), item, ITEMS.encode(item).tolist(), 1.0,
                   10.0 + i, source="action") for i, item in enumerate(acted)])
    service.bank = bank
    options = PolicyOptions(top_k=4, min_prob=0.0, priors=(RetrievalPrior.parse("1000:0:1000").entry(1.0),))
    service.policy = RetrievalPolicy(QNetwork(D, 8), 1, bank, options)
    items = lambda d: list(dict.fromkeys(bank.item_of(d.case_ids[i]) for i in d.ranked()))

    [stranger] = service._decide_batch([(np.zeros(D, np.float32), user_memory([], service.options.own_cases))])
    assert items(stranger)[:3] == ["hit", "second", "third"]
    [known] = service._decide_batch([(query, user_memory([HistoryEntry("mine", "click", 1.0, "e1")],
                                                         service.options.own_cases))])
    assert items(known)[:3] == ["mine", "hit", "second"] and "third" in items(known)
    # a full memory is left as it is, and the population is not asked for
    full = UserMemory(tuple(f"x{i}" for i in range(3)))
    assert with_population([full], lambda n: pytest.fail("asked"), 3) == [full]


def test_the_default_priors_include_the_recency_one_and_old_mix_entries_still_read():
    assert any(p.recency for p in parse_priors(DEFAULT_ALTERNATIVE_PRIORS))
    from memento.priors import check_prior_mix
    assert check_prior_mix([[0, 20, 0.5], [1000, 0, 0.5]]) == ((0.0, 20.0, 0.5), (1000.0, 0.0, 0.5))
    with pytest.raises(ValueError, match="each entry"):
        check_prior_mix([[1, 2, 3, 4, 0.5]])


def test_memento_eval_gives_every_case_policy_the_users_own_cases(tmp_path):
    """A user's early item is far from their later state: only the own-cases source retrieves it."""
    from evaluation.logs import load_interactions
    from evaluation.runner import EvalConfig, run_policy
    import evaluation.runner as runner

    rows = ["user_id,item_id,action,timestamp"]
    rows += [f"u{i % 7},x{i % 11},click,{100 + i}" for i in range(120)]
    rows += ["me,mine,click,1000", "me,x1,click,1001", "me,x2,click,1002", "me,mine,click,1003"]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    data = load_interactions(path)
    seen: dict[int, list[str]] = {}
    original = runner._Stream.request

    def spy(self, user_id, ts, state):
        request = original(self, user_id, ts, state)
        if user_id == "me":
            seen[int(ts)] = list(request.case_ids)
        return request

    runner._Stream.request = spy
    try:
        for own_cases, expect in ((16, True), (0, False)):
            seen.clear()
            run_policy(EvalConfig(source="interactions", top_k=2, warmup_events=10, own_cases=own_cases),
                       "cosine", 0, data=data)
            own = {organic_case_id(e.event_id) for e in data.events if e.user_id == "me" and e.ts < 1003}
            assert own <= set(seen[1003]) if expect else len(seen[1003]) == 2
            assert len(seen[1003]) == len(set(seen[1003]))
    finally:
        runner._Stream.request = original
