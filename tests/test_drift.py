"""Reward drift (learner.drift): ADWIN flags a drop of the mean reward and not a stationary or
rising stream; the exploration boost it raises is bounded and decays; the learner publishes the
boosted μ (the learner process's checkpoint, the evaluation's softq) and exports it; the
simulator's taste shift happens at its moment and not before."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from learner.drift import DriftConfig, RewardDrift
from learner.loop import TrainingLoop
from learner.service import LearnerService, LearnerServiceConfig
from learner.storage import ReplayTransition
from learner.trainer import SoftQConfig
from memento.checkpoint import PolicyParams, read_checkpoint
from memento.config import Settings
from memento.encoder import case_feature_vector
from memento.schemas import Case, Transition
from evaluation.simulator import WorldConfig
from support.common import RecordingProducer

replace = dataclasses.replace
# The boost is off by default (detect and alert only); these tests exercise it switched on.
BOOSTED = DriftConfig(drift_boost_alpha=3.0, drift_boost_min_prob=0.02)

torch.set_num_threads(1)

D, K = 4, 2
HIGH, LOW = [0.6, 0.3, 0.1], [0.85, 0.13, 0.02]      # P(reward = 0, 1, 5): means 0.8 and 0.23


def _rewards(n: int, p, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice([0.0, 1.0, 5.0], size=n, p=p)


def _detected(drift: RewardDrift, rewards) -> list[int]:
    return [i for i, r in enumerate(rewards) if drift.update(r)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_drop_is_flagged_once_soon_after_it_happens(seed):
    drift = RewardDrift(BOOSTED)
    flagged = _detected(drift, np.concatenate([_rewards(3000, HIGH, seed), _rewards(3000, LOW, seed + 10)]))
    assert len(flagged) == 1 and 3000 < flagged[0] < 3600, flagged
    assert drift.detections == 1 and drift.reference > drift.window_mean


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_stationary_stream_and_a_rising_one_raise_nothing(seed):
    drift = RewardDrift(BOOSTED)
    assert _detected(drift, _rewards(20_000, HIGH, seed)) == []
    assert _detected(drift, _rewards(3000, HIGH, seed + 10)) == []   # the reward rises: no boost
    rising = RewardDrift(BOOSTED)
    assert _detected(rising, np.concatenate([_rewards(3000, LOW, seed), _rewards(3000, HIGH, seed + 10)])) == []
    assert rising.rises >= 1 and rising.boost == 0.0


def test_the_boost_halves_every_half_life_and_ends_at_zero():
    drift = RewardDrift(replace(BOOSTED, drift_half_life=200))
    at = _detected(drift, np.concatenate([_rewards(3000, HIGH, 0), _rewards(600, LOW, 1)]))[0]
    assert drift.boost == pytest.approx(0.5 ** ((3600 - 1 - at) / 200))
    boosts = [drift.boost]
    for r in _rewards(4000, LOW, 2):
        drift.update(r)
        boosts.append(drift.boost)
    assert all(b1 <= b0 for b0, b1 in zip(boosts, boosts[1:])) and boosts[-1] == 0.0


def test_the_boosted_policy_is_bounded_and_never_below_the_learners():
    base = PolicyParams(alpha=0.1, min_prob=0.01, top_k=16)
    drift = RewardDrift(replace(BOOSTED, drift_boost_alpha=50.0, drift_max_alpha=0.4, drift_boost_min_prob=0.9))
    assert drift.apply(base) == base                                   # no boost: exactly the learner's μ
    drift.boost = 1.0
    p = drift.apply(base)
    assert p.alpha == 0.4 and p.min_prob == 0.5 / 16 and p.top_k == 16   # α ≤ max, floor·K ≤ 0.5
    drift.boost = 0.5
    q = drift.apply(base)
    assert q.alpha == pytest.approx(min(0.4, 0.1 * 50 ** 0.5)) and base.min_prob < q.min_prob <= 0.5 / 16
    hot = PolicyParams(alpha=2.0, min_prob=0.2, top_k=4)               # already above the caps: untouched
    assert drift.apply(hot) == hot
    mild = RewardDrift(DriftConfig(drift_boost_alpha=2.0))
    mild.boost = 0.5
    assert mild.apply(base).alpha == pytest.approx(0.1 * 2 ** 0.5)


def test_drops_inside_the_cooldown_are_counted_but_do_not_re_arm_the_boost():
    drift = RewardDrift(replace(BOOSTED, drift_half_life=100, drift_cooldown=10_000))
    rewards = [_rewards(3000, HIGH, 0), _rewards(3000, LOW, 1), _rewards(3000, [0.97, 0.03, 0.0], 2)]
    _detected(drift, np.concatenate(rewards))
    assert (drift.detections, drift.suppressed) == (1, 1) and drift.boost == 0.0


def test_bad_options_are_refused_and_off_means_no_detector():
    for bad in ({"drift_detector": "cusum"}, {"drift_delta": 0.0}, {"drift_boost_alpha": 0.5},
                {"drift_half_life": 0.0}, {"drift_boost_min_prob": 1.0}, {"drift_reward_max": -1.0}):
        with pytest.raises(ValueError, match="bad DriftConfig"):
            DriftConfig(**bad)
    assert RewardDrift.from_config(DriftConfig(drift_detector="off")) is None
    assert RewardDrift.from_config(None) is None


# -- the learner publishes the boosted μ ----------------------------------------------------

def _rows(rewards, start: int = 0) -> list[ReplayTransition]:
    return [ReplayTransition.empty(f"t{start + i}", state_dim=D, top_k=K, reward=float(r))
            for i, r in enumerate(rewards)]


def _drop_rows() -> list[ReplayTransition]:
    return _rows(np.concatenate([_rewards(3000, HIGH, 0), _rewards(600, LOW, 1)]))


def test_the_training_loop_feeds_new_rows_to_the_detector_and_not_duplicates():
    from learner.loop import replay_buffer

    options = LearnerServiceConfig(buffer_capacity=8000, learning_starts=10_000)
    drift = RewardDrift(BOOSTED)
    loop = TrainingLoop(replay_buffer(options, D, K, seed=0), options, drift=drift)
    rows = _drop_rows()
    loop.add(rows)
    loop.add(rows[:100])                                               # redelivered: not counted again
    assert drift.seen == 3600 and drift.detections == 1 and drift.boost > 0.3


def test_a_detected_drop_publishes_after_the_next_update_not_publish_every_later():
    from learner.loop import replay_buffer

    options = LearnerServiceConfig(buffer_capacity=8000, learning_starts=1, publish_every=1_000_000,
                                   updates_per_transition=0.01)
    loop = TrainingLoop(replay_buffer(options, D, K, seed=0), options, drift=RewardDrift(BOOSTED))
    published, updates_at_detection = [], None
    rows = _drop_rows()
    for i in range(0, len(rows), 100):
        loop.add(rows[i:i + 100])
        if loop.drift.detections and updates_at_detection is None:
            updates_at_detection = loop.updates
        loop.step(lambda batch: np.zeros(len(batch)), lambda: published.append(loop.updates) or True, batch_size=4)
    assert loop.drift.detections == 1 and published == [updates_at_detection + 1] and not loop.drift_pending


def _service(tmp_path, drift: DriftConfig | None = None) -> LearnerService:
    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=D,
                        top_k=K)
    service = LearnerService(settings, SoftQConfig(top_k=K, hidden=8, alpha=0.1, min_prob=0.01, seed=0),
                             LearnerServiceConfig(buffer_capacity=8000, learning_starts=10_000),
                             BOOSTED if drift is None else drift)
    service.producer = RecordingProducer()
    return service


def test_the_published_checkpoint_carries_the_boosted_alpha_and_floor(tmp_path):
    service = _service(tmp_path)
    vote = service.learner.config.vote_prior
    base = PolicyParams(alpha=service.learner.alpha, min_prob=0.01, top_k=K,   # α ≈ 0.1 (float32 log α)
                        vote_prior=vote, priors=((0.0, vote, 0.5), (1000.0, 0.0, 1000.0, 0.5)))
    ann = service.publish()
    assert read_checkpoint(ann.path, ann.sha256, expect_state_dim=D).policy == base
    service.loop.add(_drop_rows())
    ann = service.publish()
    policy = read_checkpoint(ann.path, ann.sha256, expect_state_dim=D).policy
    assert policy == service.drift.apply(base) == service.learner.policy_params()
    assert 0.1 < policy.alpha <= 1.0 and 0.01 < policy.min_prob <= 0.5 / K
    assert service.learner.alpha == base.alpha                         # the learner's own α is untouched
    off = _service(tmp_path / "off", DriftConfig(drift_detector="off"))
    off.loop.add(_drop_rows())
    ann = off.publish()
    assert off.drift is None and read_checkpoint(ann.path, ann.sha256, expect_state_dim=D).policy == base
    # the default detects and counts the drop but leaves μ as the learner has it
    alert = _service(tmp_path / "alert", DriftConfig())
    alert.loop.add(_drop_rows())
    ann = alert.publish()
    assert alert.drift.detections >= 1 and read_checkpoint(ann.path, ann.sha256, expect_state_dim=D).policy == base


def test_the_learner_metrics_move_with_a_detected_drop(tmp_path):
    from memory_store import CaseBank

    service = _service(tmp_path)
    service.bank = CaseBank(None, dim=D)
    service.bank.add([Case("c1", [1.0, 0.0, 0.0, 0.0], "7", [0.0, 1.0, 0.0, 0.0], 1.0, 0.0)])
    features = case_feature_vector([1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], 1.0).tolist()
    rewards = np.concatenate([_rewards(3000, HIGH, 0), _rewards(600, LOW, 1)])
    transitions = [Transition(f"r{i}", "u", [1.0, 0.0, 0.0, 0.0], "c1", features, "7", 0.5, float(r),
                              [1.0, 0.0, 0.0, 0.0], False, 0, float(i)) for i, r in enumerate(rewards)]

    def scrape() -> dict[str, float]:
        lines = generate_latest(service.metrics.registry).decode().splitlines()
        return {k: float(v) for k, v in (line.split(" ") for line in lines if line.startswith(
            ("memento_learner_drift_detections_total ", "memento_learner_exploration_boost ",
             "memento_learner_published_alpha ", "memento_learner_drift_reward_mean ")))}

    service._ingest(transitions[:3000])
    before = scrape()
    assert before["memento_learner_drift_detections_total"] == 0.0
    assert before["memento_learner_exploration_boost"] == 0.0
    service._ingest(transitions[3000:])
    service.publish()
    after = scrape()
    assert after["memento_learner_drift_detections_total"] == 1.0
    assert after["memento_learner_exploration_boost"] == pytest.approx(service.drift.boost) and \
        after["memento_learner_exploration_boost"] > 0.3
    assert after["memento_learner_published_alpha"] > 0.1
    assert after["memento_learner_drift_reward_mean"] < before["memento_learner_drift_reward_mean"]


def test_the_evaluations_softq_samples_the_boosted_mu_after_a_publication():
    from evaluation.policies import SoftQPolicy

    pacing = LearnerServiceConfig(buffer_capacity=8000, learning_starts=10_000)
    policy = SoftQPolicy(None, D, SoftQConfig(top_k=K, hidden=8, alpha=0.1, min_prob=0.01), pacing, BOOSTED)
    assert policy.learner.drift is policy.loop.drift is not None
    policy.loop.add(_drop_rows())
    assert policy._publish()
    boosted = policy.loop.drift.apply(PolicyParams(alpha=policy.learner.alpha, min_prob=0.01, top_k=K))
    assert (policy.policy.options.alpha, policy.policy.options.min_prob) == (boosted.alpha, boosted.min_prob)
    assert policy.policy.options.alpha > 0.1 and policy.stats()["drift_detections"] == 1.0
    plain = SoftQPolicy(None, D, SoftQConfig(top_k=K, hidden=8), pacing, DriftConfig(drift_detector="off"))
    assert plain.loop.drift is None and plain.learner.drift is None and "drift_detections" not in plain.stats()
    from evaluation.runner import EvalConfig, make_policy   # memento eval's softq gets EvalConfig.drift

    half = make_policy("softq", EvalConfig(top_k=K, drift=replace(BOOSTED, drift_half_life=7.0)), None, [], seed=0)
    assert half.loop.drift.config.drift_half_life == 7.0 and half.learner.drift is half.loop.drift
    assert make_policy("softq", EvalConfig(drift=DriftConfig(drift_detector="off")), None, [], seed=0).loop.drift is None


def test_learner_and_eval_flags_build_the_drift_options():
    import argparse

    from learner.service import add_arguments, options_from_args
    from evaluation.cli import add_arguments as eval_arguments, config_from_args

    args = add_arguments(argparse.ArgumentParser()).parse_args(["--drift-detector", "off", "--drift-half-life", "50"])
    assert options_from_args(DriftConfig, args) == DriftConfig(drift_detector="off", drift_half_life=50.0)
    args = eval_arguments(argparse.ArgumentParser()).parse_args(
        ["--drift-boost-alpha", "2", "--shift-at-moment", "300", "--shift-strength", "0.5"])
    config = config_from_args(args)
    assert config.drift == DriftConfig(drift_boost_alpha=2.0)
    assert (config.world.shift_at_moment, config.world.shift_strength) == (300, 0.5)


# -- the simulator's taste shift ------------------------------------------------------------

def _tastes_by_moment(world: WorldConfig, n: int, seed: int = 3):
    """The world's tastes as each request moment is generated (its browsing already done)."""
    from evaluation.replay import ReplayConfig, SyntheticSource

    source = SyntheticSource(ReplayConfig(world=world, warmup_moments=1, seed=seed))
    list(source.warmup())
    out = []
    for m in source.moments(n):
        out.append((m.user_id, [(a.item_id, a.action) for a in m.before], source.world.tastes.copy()))
    return out, source.world


def test_the_shift_changes_tastes_at_its_moment_and_not_before():
    small = WorldConfig(n_items=60, n_users=20)
    plain, _ = _tastes_by_moment(small, 12)
    shifted, world = _tastes_by_moment(dataclasses.replace(small, shift_at_moment=8), 12)
    for i in range(8):                       # the same users, browsing and tastes until the shift
        assert plain[i][:2] == shifted[i][:2] and np.array_equal(plain[i][2], shifted[i][2])
    assert plain[8][0] == shifted[8][0]      # the same user comes: the user stream is untouched
    for i in range(8, 12):
        cos = np.sum(plain[i][2] * shifted[i][2], axis=1)
        assert np.median(cos) < 0.7, cos     # a new taste for most users from moment 8 on
    anchored = np.sum(world.tastes * world.initial_tastes, axis=1)   # drift is anchored to the new taste
    assert anchored.min() > 0.8 and np.median(np.sum(plain[0][2] * world.initial_tastes, axis=1)) < 0.7
    again, _ = _tastes_by_moment(dataclasses.replace(small, shift_at_moment=8), 12)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(again, shifted))   # reproducible


def test_a_weak_shift_moves_tastes_less_and_the_best_items_change():
    small = WorldConfig(n_items=60, n_users=20, drift_eta=0.0)
    plain, _ = _tastes_by_moment(small, 6)
    weak, _ = _tastes_by_moment(dataclasses.replace(small, shift_at_moment=3, shift_strength=0.2), 6)
    strong, world = _tastes_by_moment(dataclasses.replace(small, shift_at_moment=3), 6)
    cos_weak = np.sum(plain[5][2] * weak[5][2], axis=1)
    cos_strong = np.sum(plain[5][2] * strong[5][2], axis=1)
    assert cos_weak.mean() > cos_strong.mean() and cos_weak.min() > 0.5
    before = [int(np.argmax(world.item_vectors @ t)) for t in plain[5][2]]
    after = [int(np.argmax(world.item_vectors @ t)) for t in strong[5][2]]
    assert sum(a != b for a, b in zip(before, after)) >= len(before) // 2
    with pytest.raises(ValueError, match="shift_strength"):
        WorldConfig(shift_strength=1.5)
    with pytest.raises(ValueError, match="shift_at_moment"):
        WorldConfig(shift_at_moment=-1)


def test_an_eval_run_with_a_shift_reports_the_recovery():
    from evaluation.runner import EvalConfig, run_policy

    cfg = EvalConfig(events=700, warmup_moments=1, world=WorldConfig(n_items=60, n_users=20, shift_at_moment=300))
    m = run_policy(cfg, "cosine", seed=0).metrics
    assert {"shift_pre_share", "shift_min_share", "shift_post_share", "shift_recovery_requests"} <= set(m)
    assert m["shift_min_share"] < m["shift_pre_share"]
    assert math.isnan(m["shift_recovery_requests"]) or m["shift_recovery_requests"] >= 250
    assert "shift_pre_share" not in run_policy(dataclasses.replace(cfg, events=100, world=WorldConfig(
        n_items=60, n_users=20)), "cosine", seed=0).metrics
