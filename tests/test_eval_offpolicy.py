"""Off-policy estimators (IPS, SNIPS, DR): hand-computed values on a 4-event log, unbiasedness on a
simulated contextual bandit with a known target value, input validation, and the streaming
accumulator against the batch functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.offpolicy import (Z_95, Estimate, OffPolicyAccumulator, doubly_robust, ips,
                                          snips)

# -- a 4-event log, computed by hand -------------------------------------------------------------
# weights w = π/p = (2, 2, 0, 2); w·r = (2, 0, 0, 2)
R = [1.0, 0.0, 1.0, 1.0]
P = [0.5, 0.25, 0.5, 0.5]
PI = [1.0, 0.5, 0.0, 1.0]
RH_LOGGED = [0.5, 0.5, 0.5, 0.5]
RH_TARGET = [0.6, 0.4, 0.2, 0.8]


def test_ips_by_hand():
    e = ips(R, P, PI)
    # mean(2, 0, 0, 2) = 1; deviations (1, -1, -1, 1): sample var 4/3, se = sqrt(4/3)/2 = 1/sqrt(3)
    assert e.name == "ips" and e.n == 4
    assert e.value == pytest.approx(1.0)
    assert e.std_error == pytest.approx(1 / math.sqrt(3))
    assert e.ci_low == pytest.approx(1.0 - 1.96 / math.sqrt(3), abs=1e-4)
    assert e.ci_high == pytest.approx(1.0 + 1.96 / math.sqrt(3), abs=1e-4)


def test_snips_by_hand():
    e = snips(R, P, PI)
    # Σwr / Σw = 4/6; delta method: w(r − 2/3) = (2/3, −4/3, 0, 2/3), squares sum 24/9 = 8/3,
    # se² = (8/3) / 6² = 2/27
    assert e.name == "snips" and e.n == 4
    assert e.value == pytest.approx(2 / 3)
    assert e.std_error == pytest.approx(math.sqrt(2 / 27))
    assert (e.ci_low, e.ci_high) == pytest.approx((2 / 3 - Z_95 * math.sqrt(2 / 27),
                                                   2 / 3 + Z_95 * math.sqrt(2 / 27)))


def test_dr_by_hand():
    e = doubly_robust(R, P, PI, RH_LOGGED, RH_TARGET)
    # terms r̂_t + w(r − r̂_l) = (0.6 + 1, 0.4 − 1, 0.2 + 0, 0.8 + 1) = (1.6, −0.6, 0.2, 1.8): mean 0.75;
    # deviations (0.85, −1.35, −0.55, 1.05): squares sum 3.95, sample var 3.95/3
    assert e.name == "dr" and e.n == 4
    assert e.value == pytest.approx(0.75)
    assert e.std_error == pytest.approx(math.sqrt(3.95 / 3) / 2)
    assert e.ci_high - e.ci_low == pytest.approx(2 * Z_95 * math.sqrt(3.95 / 3) / 2)


def test_weight_clip_by_hand():
    # clipped weights (1.5, 1.5, 0, 1.5): IPS = mean(1.5, 0, 0, 1.5); SNIPS unchanged (uniform scale)
    assert ips(R, P, PI, weight_clip=1.5).value == pytest.approx(0.75)
    assert snips(R, P, PI, weight_clip=1.5).value == pytest.approx(2 / 3)
    # DR terms (0.6 + 0.75, 0.4 − 0.75, 0.2, 0.8 + 0.75) = (1.35, −0.35, 0.2, 1.55): mean 0.6875
    assert doubly_robust(R, P, PI, RH_LOGGED, RH_TARGET, weight_clip=1.5).value == pytest.approx(0.6875)
    # a clip above every weight changes nothing
    assert ips(R, P, PI, weight_clip=100).value == pytest.approx(1.0)


def test_dr_with_zero_model_equals_ips():
    zeros = [0.0] * 4
    assert doubly_robust(R, P, PI, zeros, zeros).value == pytest.approx(ips(R, P, PI).value)


def test_single_event_has_value_but_no_interval():
    for e in (ips([1.0], [0.5], [1.0]), snips([1.0], [0.5], [1.0]),
              doubly_robust([1.0], [0.5], [1.0], [0.0], [0.0])):
        assert e.n == 1
        assert not math.isnan(e.value)
        assert math.isnan(e.ci_low) and math.isnan(e.ci_high) and math.isnan(e.std_error)
    assert ips([1.0], [0.5], [1.0]).value == 2.0
    assert snips([1.0], [0.5], [1.0]).value == 1.0


def test_snips_with_zero_total_weight_is_nan():
    e = snips([1.0, 0.0, 1.0], [0.5, 0.5, 0.2], [0.0, 0.0, 0.0])
    assert e.n == 3
    assert math.isnan(e.value) and math.isnan(e.std_error)
    assert math.isnan(e.ci_low) and math.isnan(e.ci_high)
    assert ips([1.0, 0.0, 1.0], [0.5, 0.5, 0.2], [0.0, 0.0, 0.0]).value == 0.0


def test_empty_input_is_nan_with_n_zero():
    for e in (ips([], [], []), snips([], [], []), doubly_robust([], [], [], [], [])):
        assert e.n == 0 and math.isnan(e.value) and math.isnan(e.ci_low)


def test_to_dict_keys_and_values():
    d = ips(R, P, PI).to_dict()
    assert set(d) == {"value", "ci_low", "ci_high", "n", "std_error"}
    assert d["value"] == pytest.approx(1.0) and d["n"] == 4
    assert all(type(d[k]) is float for k in ("value", "ci_low", "ci_high", "std_error"))


def test_estimate_is_frozen():
    e = ips(R, P, PI)
    with pytest.raises(AttributeError):
        e.value = 0.0  # type: ignore[misc]


# -- unbiasedness on a simulated contextual bandit -----------------------------------------------
# Two contexts (equally likely), three arms. The logger picks arms with known, context-dependent
# probabilities; the target policy is deterministic; rewards are Bernoulli with known means.
LOG_PROBS = np.array([[0.5, 0.3, 0.2],
                      [0.2, 0.3, 0.5]])
MEANS = np.array([[0.6, 0.4, 0.3],
                  [0.2, 0.5, 0.9]])
TARGET_ARM = np.array([0, 2])
TRUE_VALUE = 0.5 * MEANS[0, 0] + 0.5 * MEANS[1, 2]   # 0.75


def simulate(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, size=n)
    u = rng.random(n)
    arm = (u[:, None] > np.cumsum(LOG_PROBS[x], axis=1)).sum(axis=1)
    reward = (rng.random(n) < MEANS[x, arm]).astype(float)
    propensity = LOG_PROBS[x, arm]
    target_prob = (arm == TARGET_ARM[x]).astype(float)
    return x, arm, reward, propensity, target_prob


def test_simulated_log_matches_the_logging_policy():
    x, arm, _, propensity, _ = simulate(20_000, seed=7)
    for ctx in (0, 1):
        freq = np.bincount(arm[x == ctx], minlength=3) / (x == ctx).sum()
        assert freq == pytest.approx(LOG_PROBS[ctx], abs=0.02)


def test_estimators_are_unbiased_on_simulated_bandit():
    x, arm, r, p, pi = simulate(20_000, seed=7)
    perfect_logged = MEANS[x, arm]
    perfect_target = MEANS[x, TARGET_ARM[x]]
    # a wrong reward model: DR stays unbiased because the propensities are right
    wrong_logged = np.full_like(r, 0.5)
    wrong_target = np.full_like(r, 0.5)

    estimates = {
        "ips": ips(r, p, pi),
        "snips": snips(r, p, pi),
        "dr": doubly_robust(r, p, pi, perfect_logged, perfect_target),
        "dr_wrong_model": doubly_robust(r, p, pi, wrong_logged, wrong_target),
    }
    for name, e in estimates.items():
        assert e.n == 20_000
        assert e.ci_low <= TRUE_VALUE <= e.ci_high, (name, e)
    for name in ("ips", "dr", "dr_wrong_model"):
        assert abs(estimates[name].value - TRUE_VALUE) < 0.02, (name, estimates[name])
    # the naive average of logged rewards is the logging policy's value, well away from the target's
    assert abs(r.mean() - TRUE_VALUE) > 0.1


def test_dr_with_perfect_model_has_lower_std_error_than_ips():
    x, arm, r, p, pi = simulate(20_000, seed=11)
    dr = doubly_robust(r, p, pi, MEANS[x, arm], MEANS[x, TARGET_ARM[x]])
    base = ips(r, p, pi)
    assert dr.std_error < 0.8 * base.std_error


def test_estimates_detect_a_worse_target_policy():
    # the target policy that always plays arm 1 is worth 0.5·0.4 + 0.5·0.5 = 0.45
    x, arm, r, p, _ = simulate(20_000, seed=3)
    pi = (arm == 1).astype(float)
    for e in (ips(r, p, pi), snips(r, p, pi)):
        assert e.ci_low <= 0.45 <= e.ci_high, e
        assert abs(e.value - 0.45) < 0.03, e


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(propensities=[0.5, 0.5, 0.0, 0.5]), r"propensities\[2\] = 0\.0 is outside \(0, 1\]"),
    (dict(propensities=[0.5, 1.5, 0.5, -1]), r"propensities\[1\] = 1\.5.*2 bad values"),
    (dict(propensities=[0.5, 0.5, 0.5, float("nan")]), r"propensities\[3\]"),
    (dict(target_probs=[1.0, -0.1, 0.0, 1.0]), r"target_probs\[1\] = -0\.1 is outside \[0, 1\]"),
    (dict(target_probs=[1.0, 1.0, 1.01, 1.0]), r"target_probs\[2\]"),
    (dict(rewards=[1.0, float("inf"), 0.0, 1.0]), r"rewards\[1\] = inf is not finite"),
    (dict(rewards=[1.0, 0.0, 1.0, float("nan")]), r"rewards\[3\] = nan is not finite"),
    (dict(rewards=[1.0, 0.0, 1.0]), r"propensities has 4 values but rewards has 3"),
    (dict(target_probs=[1.0, 1.0]), r"target_probs has 2 values but rewards has 4"),
    (dict(rewards=[[1.0, 0.0], [1.0, 1.0]]), r"rewards: expected a 1-D"),
    (dict(rewards=["a", "b", "c", "d"]), r"rewards: not a sequence of numbers"),
])
def test_validation_names_argument_and_index(kwargs, match):
    args = dict(rewards=R, propensities=P, target_probs=PI) | kwargs
    for estimator in (ips, snips):
        with pytest.raises(ValueError, match=match):
            estimator(**args)
    with pytest.raises(ValueError, match=match):
        doubly_robust(**args, reward_hat_logged=RH_LOGGED, reward_hat_target=RH_TARGET)


def test_dr_validates_reward_model_inputs():
    with pytest.raises(ValueError, match=r"reward_hat_logged\[0\] = nan is not finite"):
        doubly_robust(R, P, PI, [float("nan"), 0, 0, 0], RH_TARGET)
    with pytest.raises(ValueError, match=r"reward_hat_target has 3 values but rewards has 4"):
        doubly_robust(R, P, PI, RH_LOGGED, [0.1, 0.2, 0.3])


@pytest.mark.parametrize("clip", [0, -1.0, float("nan")])
def test_weight_clip_must_be_positive(clip):
    with pytest.raises(ValueError, match="weight_clip"):
        ips(R, P, PI, weight_clip=clip)
    with pytest.raises(ValueError, match="weight_clip"):
        OffPolicyAccumulator(weight_clip=clip)


# -- streaming accumulator -----------------------------------------------------------------------
def assert_same(a: Estimate, b: Estimate):
    assert a.name == b.name and a.n == b.n
    for field in ("value", "ci_low", "ci_high", "std_error"):
        x, y = getattr(a, field), getattr(b, field)
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12, abs=1e-15), field


@pytest.mark.parametrize("clip", [None, 1.5])
def test_accumulator_equals_batch(clip):
    x, arm, r, p, pi = simulate(2_000, seed=5)
    rh_l, rh_t = MEANS[x, arm], MEANS[x, TARGET_ARM[x]]
    acc = OffPolicyAccumulator(weight_clip=clip)
    for i in range(len(r)):
        acc.add(r[i], p[i], pi[i], rh_l[i], rh_t[i])
    assert len(acc) == 2_000
    got = acc.estimates()
    assert set(got) == {"ips", "snips", "dr"}
    assert_same(got["ips"], ips(r, p, pi, weight_clip=clip))
    assert_same(got["snips"], snips(r, p, pi, weight_clip=clip))
    assert_same(got["dr"], doubly_robust(r, p, pi, rh_l, rh_t, weight_clip=clip))
    if clip is not None:   # clipping binds here: the target's weights are 2
        assert got["ips"].value != pytest.approx(ips(r, p, pi).value)


def test_accumulator_by_hand_and_defaults():
    acc = OffPolicyAccumulator()
    assert len(acc) == 0
    assert math.isnan(acc.estimates()["ips"].value)
    for row in zip(R, P, PI, RH_LOGGED, RH_TARGET):
        acc.add(*row)
    got = acc.estimates()
    assert got["ips"].value == pytest.approx(1.0)
    assert got["snips"].value == pytest.approx(2 / 3)
    assert got["dr"].value == pytest.approx(0.75)
    # without reward-model predictions DR is IPS
    plain = OffPolicyAccumulator()
    for row in zip(R, P, PI):
        plain.add(*row)
    assert plain.estimates()["dr"].value == pytest.approx(plain.estimates()["ips"].value)


@pytest.mark.parametrize("row, match", [
    ((1.0, 0.0, 1.0), r"propensity = 0\.0 \(event 2\) is outside \(0, 1\]"),
    ((1.0, 0.5, 2.0), r"target_prob = 2\.0 \(event 2\) is outside \[0, 1\]"),
    ((float("nan"), 0.5, 1.0), r"reward = nan \(event 2\) is not finite"),
    ((1.0, 0.5, 1.0, float("inf")), r"reward_hat_logged = inf \(event 2\)"),
    ((1.0, 0.5, 1.0, 0.0, float("-inf")), r"reward_hat_target = -inf \(event 2\)"),
    (("x", 0.5, 1.0), r"reward = 'x' \(event 2\) is not a number"),
])
def test_accumulator_rejects_bad_event_and_records_nothing(row, match):
    acc = OffPolicyAccumulator()
    acc.add(1.0, 0.5, 1.0)
    acc.add(0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match=match):
        acc.add(*row)
    assert len(acc) == 2
    assert acc.estimates()["ips"].value == pytest.approx(1.0)
