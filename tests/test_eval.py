"""``memento eval``: the loop, the policies, the protocol (no label leak) and the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from evaluation.logs import load_interactions
from evaluation.metrics import RunMetrics, ndcg_at
from evaluation.policies import LinUCBPolicy, Request, items_in_order
from evaluation.runner import EvalConfig, run_policy
from memento.schemas import Transition
from evaluation.simulator import WorldConfig
from support.common import write_csv

SMALL_WORLD = WorldConfig(n_items=60, n_users=20)
TMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tmall-sample"


def test_ndcg_and_hits_by_hand():
    assert ndcg_at(["a", "b", "c"], "c") == pytest.approx(0.5)
    assert ndcg_at(["a"] * 1 + ["x"] * 12, "z") == 0.0
    m = RunMetrics(catalogue_size=10)
    m.add(2.0, ["a", "b"], "a", expected=1.0, oracle=2.0, ceiling=1.5)
    m.add(0.0, ["c", "a"], "a", expected=0.0, oracle=2.0, ceiling=1.0)
    s = m.summary()
    assert (s["hit@1"], s["hit@10"], s["reward_mean"], s["coverage"]) == (0.5, 1.0, 1.0, 0.2)
    assert s["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(3)) / 2)
    assert s["share_of_oracle"] == pytest.approx(0.25)
    assert s["regret_total"] == pytest.approx(3.0)
    assert s["candidate_ceiling_share"] == pytest.approx(0.625)


def _request(items, extra=()):
    n = len(items)
    return Request("u", 0.0, np.ones(2, np.float32), [f"c{i}" for i in range(n)], np.linspace(1, 0, n),
                   np.zeros((n, 5), np.float32), list(items), list(extra))


def test_items_in_order_dedupes_and_fills_from_next_nearest_cases():
    req = _request(["a", "b", "a", "c"], extra=["b", "d", "e"])
    assert items_in_order(req, [2, 0, 3, 1], 4) == ["a", "c", "b", "d"]
    assert items_in_order(req, [3], 2) == ["c", "b"]


def test_linucb_learns_which_candidate_pays():
    d = 2
    good = np.array([1, 0, 1, 0, 1.0], np.float32)   # case state, item vec, outcome
    bad = np.array([0, 1, 0, 1, 1.0], np.float32)
    state = np.array([1.0, 0.0], np.float32)
    policy = LinUCBPolicy(d, alpha=0.1)
    req = Request("u", 0.0, state, ["bad", "good"], np.array([0.9, 0.8]), np.stack([bad, good]),
                  ["i_bad", "i_good"], [])
    transitions = [Transition(transition_id=f"t{i}", user_id="u", state=state.tolist(), case_id=cid,
                              case_features=f.tolist(), item_id=cid, propensity=1.0,
                              reward=1.0 if cid == "good" else 0.0, next_state=state.tolist(),
                              done=True, policy_version=0, ts=0.0)
                   for i, (cid, f) in enumerate([("good", good), ("bad", bad)] * 20)]
    policy.learn(transitions)
    choice = policy.choose(req, np.random.default_rng(0))
    assert choice.items[0] == "i_good" and choice.case_index == 1


def test_simulator_run_orders_random_below_cosine_and_reports_the_oracle():
    config = EvalConfig(events=400, world=SMALL_WORLD, warmup_moments=2)
    random_run = run_policy(config, "random", seed=3)
    cosine_run = run_policy(config, "cosine", seed=3)
    for run in (random_run, cosine_run):
        m = run.metrics
        assert m["requests"] == 400
        assert 0 < m["oracle_reward_mean"] and 0 <= m["share_of_oracle"] <= 1
        assert m["regret_total"] == pytest.approx(400 * (m["oracle_reward_mean"] - m["expected_reward_mean"]))
        assert len(run.cumulative_reward) == 400
    assert random_run.metrics["share_of_oracle"] < cosine_run.metrics["share_of_oracle"]
    # the same seed gives the same run
    again = run_policy(config, "cosine", seed=3)
    assert again.metrics["reward_total"] == cosine_run.metrics["reward_total"]


def test_learning_policies_train_and_publish_during_the_run():
    config = EvalConfig(events=300, world=SMALL_WORLD, window_s=120.0, allowed_lateness_s=0.0)
    import dataclasses
    config = dataclasses.replace(config, pacing=dataclasses.replace(config.pacing, publish_every=20,
                                                                       learning_starts=16))
    for name in ("softq", "greedy-q"):
        m = run_policy(config, name, seed=0).metrics
        assert m["updates"] > 200 and m["policy_versions"] >= 10 and m["skipped_updates"] == 0


def test_logged_item_is_never_forced_into_the_candidates(tmp_path):
    # Every request's logged item is new: no past case holds it, so no case policy can hit it.
    rows = [[f"u{i % 5}", f"item{i}", 1000 + 60 * i, "click"] for i in range(80)]
    data = load_interactions(write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "action"], rows))
    config = EvalConfig(source="interactions", events=0, warmup_events=10)
    for name in ("cosine", "softq", "linucb"):
        m = run_policy(config, name, seed=0, data=data).metrics
        assert m["requests"] == 70
        assert m["hit@10"] == 0.0 and m["reward_total"] == 0.0


def test_repeated_items_are_found_by_cosine_from_the_users_own_cases(tmp_path):
    # Each user keeps clicking their own item: the nearest case is their last action.
    rows = [[f"u{i % 4}", f"item{i % 4}", 1000 + 700 * i, "click"] for i in range(60)]
    data = load_interactions(write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "action"], rows))
    m = run_policy(EvalConfig(source="interactions", events=0, warmup_events=8), "cosine", 0, data).metrics
    assert m["hit@1"] == 1.0 and m["reward_mean"] == 1.0


def test_propensity_logs_get_off_policy_estimates(tmp_path):
    # Uniform logging over 5 items (propensity 0.2); only item "a" pays.
    rng = np.random.default_rng(0)
    items = ["a", "b", "c", "d", "e"]
    rows = []
    for i in range(1500):
        item = items[int(rng.integers(5))]
        rows.append([f"u{i}", item, 1000 + i, "click" if item == "a" else "view", 0.2])
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "action", "propensity"], rows)
    data = load_interactions(path, rewards={"click": 1.0, "view": 0.0})
    config = EvalConfig(source="interactions", events=0, warmup_events=50)
    random_run = run_policy(config, "random", 0, data)
    popular_run = run_policy(config, "popularity", 0, data)
    rnd, pop = random_run.off_policy, popular_run.off_policy
    assert set(rnd) == {"ips", "snips", "dr"}
    # random recommends "a" with probability 1/5: its value is 0.2; popularity always "a": 1.0
    for name in ("ips", "snips", "dr"):
        assert rnd[name]["ci_low"] <= 0.2 <= rnd[name]["ci_high"]
        assert pop[name]["ci_low"] <= 1.0 <= pop[name]["ci_high"]
        assert pop[name]["value"] > 0.8 and rnd[name]["value"] < 0.3, (name, pop[name], rnd[name])


def test_context_logs_without_users_run_as_one_step_episodes(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(200):
        x = rng.standard_normal(3)
        item = "left" if x[0] < 0 else "right"
        rows.append([f"{item}", 1000 + i, 4 if rng.random() < 0.8 else 2, *x.round(4)])
    path = write_csv(tmp_path / "bandit.csv", ["item_id", "timestamp", "rating", "ctx_a", "ctx_b", "ctx_c"], rows)
    data = load_interactions(path, rating_threshold=4, context_prefix="ctx_")
    assert not data.has_users and data.context_columns == ["ctx_a", "ctx_b", "ctx_c"]
    config = EvalConfig(source="interactions", events=0, warmup_events=40)
    cosine = run_policy(config, "cosine", 0, data).metrics
    rnd = run_policy(config, "random", 0, data).metrics
    assert cosine["requests"] == 160
    # nearest contexts share the item: cosine's first item is the logged one far more often
    assert cosine["hit@1"] > 0.7 and rnd["hit@1"] < 0.6, (cosine["hit@1"], rnd["hit@1"])


@pytest.mark.skipif(not TMALL.is_dir(), reason="shared Tmall sample not present")
def test_tmall_sample_runs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "tmall.json"
    code = main(["eval", "--source", "tmall", "--log", str(TMALL / "sam_tianchi_2014002_rec_tmall_log.csv"),
                 "--products", str(TMALL / "sam_tianchi_2014001_rec_tmall_product.csv"),
                 "--policies", "popularity,cosine", "--events", "300", "--no-progress", "--json", str(out)])
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["cosine"]["requests"] == 300 and "hit@10" in figures["popularity"]
    assert "3331 events" in figures["settings"]["data"]
    assert "cosine" in capsys.readouterr().out


def test_cli_writes_table_json_and_plot_with_seed_spread(tmp_path, capsys):
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    code = main(["eval", "--policies", "random,cosine,linucb", "--events", "120", "--seeds", "2",
                 "--warmup-moments", "1", "--no-progress", "--json", str(out), "--plot", str(png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "policy" in printed and "linucb" in printed and "%oracle" in printed
    figures = json.loads(out.read_text())
    assert set(figures) == {"random", "cosine", "linucb", "settings"}
    assert figures["settings"]["seeds"] == [0, 1]
    for policy in ("random", "cosine", "linucb"):
        assert figures[policy]["requests"] == 120 and "reward_mean_std" in figures[policy]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--policies", "cosine,magic"], "unknown policies ['magic']"),
    (["--source", "interactions"], "--source interactions needs --log"),
    (["--source", "tmall", "--log", "/nonexistent.csv"], "/nonexistent.csv"),
])
def test_bad_arguments_are_refused_with_a_message(argv, message, capsys):
    assert main(["eval", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


# -- dtypes: states are float32 everywhere ---------------------------------------------------------

def test_request_holds_float32_state_and_features_whatever_the_caller_passes():
    for dtype in (np.float64, np.float16, np.float32):
        req = Request("u", 0.0, np.ones(4, dtype), ["c"], np.array([1.0]), np.zeros((1, 9), dtype), ["7"])
        assert req.state.dtype == np.float32 and req.features.dtype == np.float32
        assert req.state.flags.c_contiguous and req.features.flags.c_contiguous


def test_greedy_q_chooses_from_a_float64_state():
    from learner.service import LearnerServiceConfig
    from evaluation.policies import GreedyQPolicy

    policy = GreedyQPolicy(None, 4, 2, LearnerServiceConfig(), network={"hidden": 8})
    req = Request("u", 0.0, np.full(4, 0.5), ["c0", "c1"], np.array([0.9, 0.1]),
                  np.zeros((2, 9)), ["7", "8"])   # float64 state and features
    assert policy.choose(req, np.random.default_rng(0)).items[0] in {"7", "8"}


def test_context_projection_is_float32():
    from evaluation.runner import _context_projection

    assert _context_projection(5, 8).dtype == np.float32


def test_float64_one_hot_context_log_runs_every_trained_policy(tmp_path):
    # The users' report: float64 one-hot context columns killed greedy-q with a dtype mismatch.
    rng = np.random.default_rng(5)
    rows = []
    for i in range(160):
        k = int(rng.integers(4))
        one_hot = np.eye(4, dtype=np.float64)[k]
        rows.append([f"i{k}", 1000 + i, "click" if rng.random() < 0.7 else "view", 0.25,
                     *[repr(float(x)) for x in one_hot]])
    path = write_csv(tmp_path / "onehot.csv",
                      ["item_id", "timestamp", "action", "propensity", "ctx_0", "ctx_1", "ctx_2", "ctx_3"], rows)
    data = load_interactions(path, rewards={"click": 1.0, "view": 0.0}, context_prefix="ctx_")
    import dataclasses
    config = EvalConfig(source="interactions", events=0, warmup_events=40, item_dim=8, top_k=4)
    config = dataclasses.replace(config, pacing=dataclasses.replace(config.pacing, learning_starts=8,
                                                                       publish_every=10))
    for name in ("greedy-q", "softq", "linucb"):
        result = run_policy(config, name, 0, data)
        assert result.metrics["requests"] == 120 and result.metrics["updates"] > 0
        assert set(result.off_policy) == {"ips", "snips", "dr"}


def test_categorical_context_logs_are_hashed_into_states_cosine_can_use(tmp_path):
    # The item follows a hashed categorical context value (as in public bandit logs) 90% of the
    # time; a numeric column is noise. Nearest contexts must share the category for cosine to hit.
    rng = np.random.default_rng(2)
    sites = ["81ce5f0a9e", "9f00e1c2b4", "0a1b2c3d4e", "d41d8cd98f"]
    rows = []
    for i in range(240):
        k = int(rng.integers(4))
        item = f"i{k}" if rng.random() < 0.9 else f"i{int(rng.integers(4))}"
        site = sites[k] if i % 17 else ""                # a few missing values
        rows.append([item, 1000 + i, 4, site, round(float(rng.standard_normal()) * 0.1, 4)])
    path = write_csv(tmp_path / "bandit.csv", ["item_id", "timestamp", "rating", "ctx_site", "ctx_x"], rows)
    data = load_interactions(path, rating_threshold=4, context_prefix="ctx_")
    assert data.categorical_columns == ["ctx_site"]
    config = EvalConfig(source="interactions", events=0, warmup_events=40)
    cosine = run_policy(config, "cosine", 0, data).metrics
    rnd = run_policy(config, "random", 0, data).metrics
    assert cosine["requests"] == 200
    assert cosine["hit@1"] > 0.7 and rnd["hit@1"] < 0.4, (cosine["hit@1"], rnd["hit@1"])
