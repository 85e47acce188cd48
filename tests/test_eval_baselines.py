"""``memento eval`` baselines: ``recent``, ``itemknn`` and ``vw`` (evaluation/baselines.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cli.main import main
from evaluation.baselines import ItemKNNPolicy, RecentHistory, RecentPolicy, VWPolicy
from evaluation.logs import load_interactions
from evaluation.policies import POLICY_NAMES, Request
from evaluation.runner import EvalConfig, make_policy, run_policy
from memento.schemas import Transition
from evaluation.simulator import WorldConfig
from support.common import write_csv

SMALL_WORLD = WorldConfig(n_items=60, n_users=20)
BASELINES = ("recent", "itemknn", "vw")


def _item_request(user="u"):
    """A request whose retrieved cases no item policy looks at."""
    return Request(user, 0.0, np.ones(2, np.float32), ["c0"], np.array([1.0]), np.zeros((1, 5), np.float32),
                   ["case-item"], [])


def _observe(policy, actions):
    for user, item, reward in actions:
        policy.observe(user, item, reward)


# --- recent ------------------------------------------------------------------------------------

def test_recent_returns_the_users_items_newest_first_then_popular_then_catalogue():
    policy = RecentPolicy(["a", "b", "c", "d", "e", "z"])
    _observe(policy, [("u", "a", 1.0), ("u", "b", 1.0), ("v", "c", 3.0), ("u", "a", 1.0), ("v", "d", 1.0)])
    choice = policy.choose(_item_request("u"), np.random.default_rng(0), list_size=4)
    # u: a (again, so newest), b; then the most rewarded items not already listed: c (3), d (1)
    assert choice.items == ["a", "b", "c", "d"]
    assert choice.case_index is None and choice.propensity == 1.0 and choice.distribution == {"a": 1.0}
    # a user with no history gets popularity: c (3), a (2), b (1), d (1; seen after b)
    assert policy.choose(_item_request("new"), np.random.default_rng(0), list_size=4).items == ["c", "a", "b", "d"]
    # longer than anything seen: random catalogue items fill the list, without repeats
    items = policy.choose(_item_request("u"), np.random.default_rng(0), list_size=6).items
    assert items[:4] == ["a", "b", "c", "d"] and set(items[4:]) == {"e", "z"}


def test_recent_history_is_distinct_and_bounded():
    history = RecentHistory(3)
    for item in ["a", "b", "a", "c", "d"]:
        history.add("u", item)
    assert history.newest_first("u") == ["d", "c", "a"]   # b, the oldest, was forgotten
    assert history.newest_first("nobody") == []
    with pytest.raises(ValueError):
        RecentHistory(0)


# --- itemknn -----------------------------------------------------------------------------------

def test_itemknn_ranks_co_occurring_items_above_a_popular_stranger():
    policy = ItemKNNPolicy(["a", "b", "c", "x", "y"])
    # a and b share two users' histories, a and c one; x is far more rewarded but never next to a
    _observe(policy, [("u1", "a", 1.0), ("u1", "b", 1.0), ("u2", "b", 1.0), ("u2", "a", 1.0),
                      ("u3", "a", 1.0), ("u3", "c", 1.0), ("w", "c", 1.0),
                      ("v", "x", 5.0), ("v", "y", 1.0), ("w", "x", 5.0), ("t", "a", 1.0)])
    choice = policy.choose(_item_request("t"), np.random.default_rng(0), list_size=4)
    # t's history is {a}: sim(a, a) = 1 (nothing excluded: users re-buy) > sim(a, b) = 2/sqrt(4·2)
    # > sim(a, c) = 1/sqrt(4·2) > sim(a, x) = 0; popularity fills after the neighbours: x (10)
    assert choice.items == ["a", "b", "c", "x"]
    assert choice.case_index is None and choice.distribution == {"a": 1.0}


def test_itemknn_similarity_is_cosine_normalised_and_repeats_count_once():
    policy = ItemKNNPolicy(["a", "b", "c"], history=5)
    _observe(policy, [("u1", "a", 1.0), ("u1", "b", 1.0), ("u1", "b", 1.0), ("u1", "a", 1.0),
                      ("u2", "b", 1.0), ("u3", "b", 1.0), ("u3", "c", 1.0)])
    # occurrences: a 1, b 3, c 1; co-occurrences: a–b 1 (the repeats count nothing), b–c 1
    assert policy.occurrences == {"a": 1, "b": 3, "c": 1}
    assert policy.similarity("a", "b") == pytest.approx(1 / math.sqrt(3))
    assert policy.similarity("b", "a") == policy.similarity("a", "b")
    assert policy.similarity("a", "c") == 0.0 and policy.similarity("b", "b") == 1.0
    # u1 = {a, b}: a scores sim(a, a) + sim(b, a), b likewise, c scores sim(b, c)
    assert policy.scores("u1") == pytest.approx({"a": 1 + 1 / math.sqrt(3), "b": 1 + 1 / math.sqrt(3),
                                                 "c": 1 / math.sqrt(3)})


def test_itemknn_window_forgets_the_oldest_items():
    policy = ItemKNNPolicy(["a", "b", "c", "d"], history=2)
    _observe(policy, [("u", "a", 1.0), ("u", "b", 1.0), ("u", "c", 1.0), ("u", "d", 1.0)])
    # when d entered, the window held b and c: a had been forgotten
    assert policy.similarity("a", "d") == 0.0
    assert policy.similarity("b", "d") > 0 and policy.similarity("c", "d") > 0 and policy.similarity("a", "c") > 0
    # u's window is {c, d}; every item occurred once, so each co-occurring pair has similarity 1
    assert policy.scores("u") == pytest.approx({"a": 1.0, "b": 2.0, "c": 2.0, "d": 2.0})


# --- vw ------------------------------------------------------------------------------------------

D = 2
STATE = np.array([1.0, 0.0], np.float32)
GOOD = np.array([1, 0, 1, 0, 1.0], np.float32)   # case state, item vector, outcome
BAD = np.array([0, 1, 0, 1, 1.0], np.float32)


def _case_request(good_first: bool) -> Request:
    rows, ids, items = ([GOOD, BAD], ["good", "bad"], ["i_good", "i_bad"]) if good_first else \
        ([BAD, GOOD], ["bad", "good"], ["i_bad", "i_good"])
    return Request("u", 0.0, STATE, ids, np.array([0.9, 0.8]), np.stack(rows), items, ["extra"])


def _transition(request: Request, index: int, reward: float, propensity: float, n: int) -> Transition:
    return Transition(transition_id=f"r{n}", user_id=request.user_id, state=request.state.tolist(),
                      case_id=request.case_ids[index], case_features=request.features[index].tolist(),
                      item_id=request.case_items[index], propensity=propensity, reward=reward,
                      next_state=request.state.tolist(), done=True, policy_version=0, ts=request.ts)


def _train_vw(policy: VWPolicy, rounds: int, rng: np.random.Generator) -> None:
    for n in range(rounds):
        request = _case_request(good_first=n % 4 == 0)   # mostly the less similar candidate
        choice = policy.choose(request, rng)
        reward = 1.0 if request.case_ids[choice.case_index] == "good" else 0.0
        policy.learn([_transition(request, choice.case_index, reward, choice.propensity, n)])


def test_vw_learns_to_pick_the_candidate_that_pays():
    policy = VWPolicy(seed=0)
    rng = np.random.default_rng(0)
    before = policy.choose(_case_request(True), rng)
    assert before.distribution["i_good"] < 0.9
    _train_vw(policy, 60, rng)
    assert policy.stats()["updates"] == 60 and policy.stats()["open_decisions"] == 1  # `before` never closed
    for good_first in (True, False):
        choice = policy.choose(_case_request(good_first), rng)
        assert choice.distribution["i_good"] > 0.9
    # it picks it: sampled choices land on the good case about as often as its probability says
    picks = [policy.choose(_case_request(True), rng).case_index for _ in range(300)]
    assert np.mean(np.array(picks) == 0) > 0.9


def test_vw_propensity_is_the_pmf_of_the_sampled_case_and_the_distribution_sums_to_one():
    policy = VWPolicy(seed=0)
    rng = np.random.default_rng(1)
    _train_vw(policy, 30, rng)
    counts, propensity = {}, {}
    for _ in range(400):
        choice = policy.choose(_case_request(True), rng)
        request = _case_request(True)
        assert choice.items[0] == request.case_items[choice.case_index]
        assert choice.propensity == pytest.approx(choice.distribution[choice.items[0]])
        assert sum(choice.distribution.values()) == pytest.approx(1.0)
        counts[choice.case_index] = counts.get(choice.case_index, 0) + 1
        propensity[choice.case_index] = choice.propensity
    # the propensity is the probability with which the case was actually drawn
    for index, p in propensity.items():
        assert counts[index] / 400 == pytest.approx(p, abs=0.05)
    assert len(counts) == 2   # exploration reached the other case too


def test_vw_sums_the_pmf_of_cases_that_share_an_item_and_ranks_the_rest():
    policy = VWPolicy(seed=0)
    request = Request("u", 0.0, STATE, ["c0", "c1", "c2"], np.array([0.9, 0.8, 0.7]),
                      np.stack([GOOD, BAD, BAD]), ["x", "y", "x"], ["z", "x"])
    choice = policy.choose(request, np.random.default_rng(0), list_size=5)
    assert set(choice.distribution) == {"x", "y"}
    assert sum(choice.distribution.values()) == pytest.approx(1.0)
    assert choice.distribution["x"] == pytest.approx(2 * choice.distribution["y"])   # untrained: uniform
    assert sorted(choice.items) == ["x", "y", "z"]


def test_vw_keeps_decisions_only_until_learned_and_rebuilds_evicted_ones():
    policy = VWPolicy(seed=0, max_open=2)
    rng = np.random.default_rng(0)
    requests = [Request("u", float(n), STATE, ["good", "bad"], np.array([0.9, 0.8]), np.stack([GOOD, BAD]),
                        ["i_good", "i_bad"], []) for n in range(3)]
    choices = [policy.choose(r, rng) for r in requests]
    assert policy.stats()["open_decisions"] == 2   # the oldest was dropped
    policy.learn([_transition(r, c.case_index, 1.0, c.propensity, n)
                  for n, (r, c) in enumerate(zip(requests, choices))])
    assert policy.stats() == {"updates": 3.0, "rebuilt_examples": 1.0, "open_decisions": 0.0}


def test_vw_matches_decisions_that_share_user_time_and_case_oldest_first():
    policy = VWPolicy(seed=0)
    rng = np.random.default_rng(0)
    # the same user twice in one (minute-granular) timestamp, one candidate each time
    requests = [Request("u", 60.0, STATE, ["c"], np.array([0.9]), row[None], ["i"], []) for row in (GOOD, BAD)]
    choices = [policy.choose(r, rng) for r in requests]
    for n, (r, c) in enumerate(zip(requests, choices)):
        # only the first decision (the GOOD row) pays: learned on the wrong rows, BAD would win
        policy.learn([_transition(r, c.case_index, 1.0 - n, c.propensity, n)])
        assert policy.stats()["open_decisions"] == 1 - n
    assert policy.stats()["rebuilt_examples"] == 0
    both = Request("u", 120.0, STATE, ["bad", "good"], np.array([0.9, 0.8]), np.stack([BAD, GOOD]),
                   ["i_bad", "i_good"], [])
    assert policy.choose(both, rng).distribution["i_good"] > 0.9


def test_vw_refuses_arguments_without_cb_explore_adf():
    with pytest.raises(ValueError, match="--cb_explore_adf"):
        VWPolicy("--cb_explore 4")


# --- registration, end to end --------------------------------------------------------------------

def test_baselines_are_registered():
    config = EvalConfig(vw_args="--cb_explore_adf --softmax --lambda 10")
    for name in BASELINES:
        assert name in POLICY_NAMES
        assert make_policy(name, config, bank=None, catalogue=["a"], seed=0).name == name
    assert make_policy("vw", config, None, ["a"], 0).args == "--cb_explore_adf --softmax --lambda 10"


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_runs_on_the_simulator(name):
    config = EvalConfig(events=150, world=SMALL_WORLD, warmup_moments=1, window_s=120.0, allowed_lateness_s=0.0)
    result = run_policy(config, name, seed=0)
    m = result.metrics
    assert m["requests"] == 150 and len(result.cumulative_reward) == 150
    assert 0.0 < m["share_of_oracle"] <= 1.0
    if name == "vw":
        # every decision's window closed and was learned from its kept example; nothing left over
        assert m["updates"] == 150 and m["rebuilt_examples"] == 0 and m["open_decisions"] == 0


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_runs_on_a_log(tmp_path, name):
    # Twelve users, each alternating between their own two items (24 items: more than a list
    # holds, so popularity alone cannot list every user's next item), one event every 700 s.
    rows = [[f"u{i % 12}", f"item{i % 12}{'ab'[(i // 12) % 2]}", 1000 + 700 * i, "click"] for i in range(96)]
    data = load_interactions(write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "action"], rows))
    m = run_policy(EvalConfig(source="interactions", events=0, warmup_events=24), name, 0, data).metrics
    assert m["requests"] == 72
    if name in ("recent", "itemknn"):
        # the next item is always one of the user's two items, which co-occur: in the list, but
        # not first for recent (the newest is the other one)
        assert m["hit@10"] == 1.0
    if name == "recent":
        assert m["hit@1"] == 0.0
    if name == "vw":
        assert m["updates"] == 72 and m["rebuilt_examples"] == 0 and m["open_decisions"] == 0


def test_cli_passes_vw_args_and_refuses_bad_ones(capsys):
    assert main(["eval", "--policies", "vw", "--events", "40", "--warmup-moments", "1", "--no-progress",
                 "--vw-args=--cb_explore 4"]) == 2
    assert "--cb_explore_adf" in capsys.readouterr().err
    assert main(["eval", "--policies", "recent,itemknn,vw", "--events", "40", "--warmup-moments", "1",
                 "--no-progress", "--vw-args=--cb_explore_adf --epsilon 0.2"]) == 0
    printed = capsys.readouterr().out
    assert "itemknn" in printed and "vw" in printed
