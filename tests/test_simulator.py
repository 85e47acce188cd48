"""The synthetic world: determinism, the exactness of its expected reward and oracle, drift,
and its files in the Tmall format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memento.config import RewardWeights
from memento.encoder import ItemEncoder, load_products
from evaluation.simulator import SyntheticWorld, WorldConfig, reference_policy_rewards
from evaluation.tmall import load_tmall_log

SMALL = WorldConfig(n_items=60, n_users=20)


def test_same_seed_same_world_and_behaviour():
    a, b = SyntheticWorld(SMALL, seed=7), SyntheticWorld(SMALL, seed=7)
    assert a.meta == b.meta
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    np.testing.assert_array_equal(a.tastes, b.tastes)
    ra, rb = np.random.default_rng(3), np.random.default_rng(3)
    for user in a.user_ids[:10]:
        assert a.browse(user, ra) == b.browse(user, rb)
        assert a.respond(user, a.oracle_item(user), ra) == b.respond(user, b.oracle_item(user), rb)
    np.testing.assert_array_equal(a.tastes, b.tastes)
    other = SyntheticWorld(SMALL, seed=8)
    assert not np.allclose(other.item_vectors, a.item_vectors)


@pytest.mark.parametrize("which", ["oracle", "median", "worst"])
def test_expected_reward_matches_monte_carlo(which):
    world = SyntheticWorld(SMALL, seed=1)
    user = world.user_ids[2]
    rewards = world.expected_rewards(user)
    item = {"oracle": int(np.argmax(rewards)), "worst": int(np.argmin(rewards)),
            "median": int(np.argsort(rewards)[len(rewards) // 2])}[which]
    rng = np.random.default_rng(11)
    n = 20_000
    draws = np.array([world.reward_of(world.respond(user, item, rng, drift=False)) for _ in range(n)])
    stderr = max(draws.std(), 1e-3) / math.sqrt(n)
    assert abs(draws.mean() - rewards[item]) < 4 * stderr + 1e-3, (draws.mean(), rewards[item])


def test_expected_reward_is_exact_for_a_single_weight():
    # Reward 1 for a purchase only: E = P(click) * P(cart|click) * P(purchase|cart).
    world = SyntheticWorld(WorldConfig(n_items=30, n_users=3,
                                       rewards=RewardWeights(click=0, collect=0, cart=0, purchase=1)), seed=2)
    p = world.action_probabilities(world.user_ids[0])
    np.testing.assert_allclose(world.expected_rewards(world.user_ids[0]),
                               p["click"] * p["cart"] * p["purchase"], rtol=1e-12)


def test_oracle_is_the_best_item():
    world = SyntheticWorld(SMALL, seed=4)
    for user in world.user_ids:
        best = world.oracle_reward(user)
        assert all(world.expected_reward(user, item) <= best + 1e-12 for item in world.item_ids)
        assert world.expected_reward(user, world.oracle_item(user)) == pytest.approx(best)


def test_drift_moves_taste_toward_consumed_item():
    world = SyntheticWorld(SMALL, seed=5)
    user, item = world.user_ids[0], world.item_ids[int(np.argmin(world.item_vectors @ world.tastes[0]))]
    v = world.item_vectors[world.item_index(item)]
    before = float(world.tastes[0] @ v)
    for _ in range(5):
        world.consume(user, item)
    assert float(world.tastes[0] @ v) > before + 0.05
    assert np.linalg.norm(world.tastes[0]) == pytest.approx(1.0)
    assert np.allclose(world.tastes[1:], world.initial_tastes[1:])  # other users untouched
    world.reset_tastes()
    np.testing.assert_array_equal(world.tastes, world.initial_tastes)


def test_respond_drifts_only_on_click_and_no_drift_world_is_static():
    world = SyntheticWorld(SMALL, seed=6)
    rng = np.random.default_rng(0)
    user = world.user_ids[0]
    for item in world.item_ids[:30]:
        before = world.tastes[0].copy()
        actions = world.respond(user, item, rng)
        assert (not np.allclose(before, world.tastes[0])) == bool(actions)
    static = SyntheticWorld(WorldConfig(n_items=60, n_users=20, drift_eta=0.0), seed=6)
    for _ in range(20):
        static.browse(user, rng)
    np.testing.assert_array_equal(static.tastes, static.initial_tastes)


def test_browse_actions_are_well_formed():
    world = SyntheticWorld(SMALL, seed=8)
    rng = np.random.default_rng(1)
    pairs = [p for _ in range(50) for p in world.browse(world.user_ids[0], rng)]
    assert pairs and {a for _, a in pairs} <= {"click", "collect", "cart", "purchase"}
    # Every deeper action on an item follows a click on it.
    for k, (item, action) in enumerate(pairs):
        if action != "click":
            assert ("click" in [a for i, a in pairs[:k] if i == item])


def test_reference_policies_leave_headroom():
    world = SyntheticWorld(seed=0)
    figures = reference_policy_rewards(world, moments=500, seed=0)
    assert figures["random"] < 0.5 * figures["history_similar"]
    assert figures["history_similar"] < 0.8 * figures["oracle"]
    np.testing.assert_array_equal(world.tastes, world.initial_tastes)


def test_hashed_metadata_separates_categories():
    world = SyntheticWorld(seed=0)
    enc = ItemEncoder(32, world.meta)
    cats = [world.meta[i].category for i in world.item_ids]
    vecs = enc.encode_many(world.item_ids)
    latent_sim = world.item_vectors @ world.item_vectors.T
    hashed_sim = vecs @ vecs.T
    same = np.array([[a == b for b in cats] for a in cats]) & ~np.eye(len(cats), dtype=bool)
    other = np.array([[a != b for b in cats] for a in cats])
    assert hashed_sim[same].mean() > hashed_sim[other].mean() + 0.3
    assert latent_sim[same].mean() > latent_sim[other].mean() + 0.3


def test_products_csv_round_trip(tmp_path):
    world = SyntheticWorld(SMALL, seed=9)
    products = load_products(world.write_products_csv(tmp_path / "products.csv"))
    assert products.keys() == set(world.item_ids)
    for item in world.item_ids:
        assert products[item] == world.meta[item]


def test_log_csv_round_trip_through_tmall_loader(tmp_path):
    world = SyntheticWorld(SMALL, seed=10)
    rows = world.generate_log(500, seed=1)
    path = world.write_log_csv(tmp_path / "log.csv", 500, seed=1)
    text = path.read_text(encoding="utf-8").splitlines()
    assert text[0] == "item_id,user_id,action,vtime" and text[1].startswith("i")
    assert ",u" in text[1] and "purchase" not in path.read_text()
    parsed = load_tmall_log(path)
    assert not parsed.bad_rows and len(parsed.actions) == 500
    assert [(a.item_id, a.user_id, a.action, a.ts) for a in parsed.actions] == rows
    np.testing.assert_array_equal(world.tastes, world.initial_tastes)  # log generation leaves the world as it was


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="n_items"):
        WorldConfig(n_items=0)
    with pytest.raises(ValueError, match="user_categories"):
        WorldConfig(n_top_categories=2, user_categories=3)
    world = SyntheticWorld(SMALL, seed=0)
    with pytest.raises(KeyError, match="unknown item"):
        world.expected_reward(world.user_ids[0], "no-such-item")
