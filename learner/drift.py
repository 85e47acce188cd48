"""Reward drift: detect a drop of the mean transition reward and boost exploration until it recovers.

When users' tastes shift, the cases μ favours stop paying and the mean reward per transition
falls. :class:`RewardDrift` watches the stream of transition rewards with river's ADWIN and,
on a detected **drop**, raises an exploration *boost* b to 1, which then halves every
``drift_half_life`` transitions (and is cut to 0 below 0.001). While b > 0 the μ the learner
publishes (:meth:`RewardDrift.apply` on :meth:`learner.trainer.SoftQLearner.policy_params`)
is warmer and flatter:

* α ← α·``drift_boost_alpha``^b, at most ``drift_max_alpha`` (never below the learner's α);
* min_prob ← min_prob + b·(``drift_boost_min_prob`` − min_prob), at most 0.5/K, so the floor
  never spreads more than half of μ's mass uniformly over the K candidates.

The boost changes only the μ that serving samples (it travels in the checkpoint's
:class:`memento.checkpoint.PolicyParams`); the learner's TD target and α tuning are untouched.

Why ADWIN, and why only drops. A learning policy's reward *rises* as it learns, so a detector
must not mistake that for a change that needs action, and must judge a drop against the recent
level, not the all-time one. Page-Hinkley in ``mode="down"`` is one-sided, but its reference is
the mean since its last reset: after the reward has risen, that mean lags below the current
level and a drop is seen only once it has undone the learned gain; its threshold λ is also in
reward units. ADWIN keeps an adaptive window that forgets the old level whenever the mean
changes in either direction (a detected rise just moves the reference up), its δ bounds the
false-alarm rate, and at a detection the direction is known: the window keeps its recent part,
so the mean falls exactly when the dropped older part had the higher mean. Rises are counted in
:attr:`RewardDrift.rises` and otherwise ignored. Rewards are divided by ``drift_reward_max``
(and clipped to [0, 1]) because ADWIN's bound is written for values in [0, 1].
``drift_delta`` is 0.1, not river's 0.002: at 0.002 ADWIN never saw the simulator's taste shift
(a third of the reward lost for a few hundred requests); at 0.1 it saw it within a few hundred
transitions and raised no false drop on a stationary run (docs/evaluation.md, "Taste shifts
and drift detection", which also shows that there the boost does not speed recovery).
:class:`learner.loop.TrainingLoop` publishes after the next update once a drop is detected.

The boost's own exploration lowers the reward; so that this does not re-arm the boost forever,
drops detected within ``drift_cooldown`` transitions of the last acted-on detection are counted
in :attr:`RewardDrift.suppressed` and do nothing.

>>> import numpy as np
>>> from memento.checkpoint import PolicyParams
>>> rng = np.random.default_rng(0)
>>> before = rng.choice([0.0, 1.0, 5.0], size=3000, p=[0.6, 0.3, 0.1])   # mean 0.8
>>> after = rng.choice([0.0, 1.0, 5.0], size=3000, p=[0.85, 0.13, 0.02])  # mean 0.23
>>> drift = RewardDrift(DriftConfig(drift_half_life=100, drift_boost_alpha=3.0, drift_boost_min_prob=0.02))
>>> [i for i, r in enumerate(before) if drift.update(r)]                  # stationary: nothing
[]
>>> [i for i, r in enumerate(after[:400], start=3000) if drift.update(r)]  # the drop, 103 rewards in
[3103]
>>> round(drift.boost, 2), drift.detections, drift.rises
(0.13, 1, 0)
>>> base = PolicyParams(alpha=0.1, min_prob=0.01, top_k=16)
>>> p = drift.apply(base)
>>> base.alpha < p.alpha <= 1.0, base.min_prob < p.min_prob <= 0.5 / 16
(True, True)
>>> for r in after[400:]:
...     _ = drift.update(r)
>>> drift.boost, drift.apply(base) == base       # decayed back: the learner's μ exactly
(0.0, True)
>>> RewardDrift.from_config(DriftConfig(drift_detector="off")) is None
True
"""

from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, fields

from river.drift import ADWIN

from memento.checkpoint import PolicyParams
from memento.options import option

__all__ = ["DriftConfig", "RewardDrift", "DETECTORS"]

DETECTORS = ("adwin", "off")
_BOOST_OFF = 1e-3          # a boost below this is 0: the published μ is exactly the learner's again


@dataclass(frozen=True)
class DriftConfig:
    """Drift detection on the reward stream and the exploration boost it raises (``help``
    doubles as the CLI help)."""

    drift_detector: str = option("adwin", "'adwin': watch transition rewards for a drop of their mean "
                                        "and boost exploration on one; 'off': neither")
    drift_delta: float = option(0.1, "ADWIN's confidence δ: smaller detects later, with fewer false alarms "
                                   "(river's default 0.002 misses the simulator's taste shift)")
    drift_clock: int = option(32, "ADWIN checks for a change every this many rewards")
    drift_min_window: int = option(5, "ADWIN's smallest sub-window (rewards) compared at a check")
    drift_grace: int = option(100, "rewards seen before ADWIN may detect anything")
    drift_reward_max: float = option(5.0, "rewards are divided by this (the largest reward weight) and "
                                        "clipped to [0, 1], the range ADWIN's bound assumes")
    # Off by default: on the simulator's taste shift the boost slowed recovery (docs/evaluation.md),
    # so a detected drop is an alert (metrics) until a scenario shows the boost paying.
    drift_boost_alpha: float = option(1.0, "α multiplier at full boost (α·this^boost; 1 = α untouched; "
                                         "3 is a moderate boost)")
    drift_max_alpha: float = option(1.0, "upper bound on the boosted α")
    drift_boost_min_prob: float = option(0.0, "μ's per-candidate floor at full boost (e.g. 0.02) (never above 0.5/top_k; "
                                             "at or below the learner's min_prob = floor untouched)")
    drift_half_life: float = option(500.0, "transitions over which the boost halves")
    drift_cooldown: int = option(1500, "transitions after a boosted drop during which further drops "
                                     "(e.g. caused by the boost's own exploration) are only counted")

    def __post_init__(self):
        problems = []
        if self.drift_detector not in DETECTORS:
            problems.append(f"drift_detector must be one of {list(DETECTORS)}, got {self.drift_detector!r}")
        if not 0.0 < self.drift_delta < 1.0:
            problems.append(f"drift_delta must be in (0, 1), got {self.drift_delta}")
        if self.drift_clock < 1 or self.drift_min_window < 1 or self.drift_grace < 0:
            problems.append(f"drift_clock and drift_min_window must be >= 1 and drift_grace >= 0, got "
                            f"{self.drift_clock}, {self.drift_min_window}, {self.drift_grace}")
        if not (math.isfinite(self.drift_reward_max) and self.drift_reward_max > 0):
            problems.append(f"drift_reward_max must be a finite number > 0, got {self.drift_reward_max}")
        if not (math.isfinite(self.drift_boost_alpha) and self.drift_boost_alpha >= 1.0):
            problems.append(f"drift_boost_alpha must be a finite number >= 1, got {self.drift_boost_alpha}")
        if not (math.isfinite(self.drift_max_alpha) and self.drift_max_alpha > 0):
            problems.append(f"drift_max_alpha must be a finite number > 0, got {self.drift_max_alpha}")
        if not 0.0 <= self.drift_boost_min_prob < 1.0:
            problems.append(f"drift_boost_min_prob must be in [0, 1), got {self.drift_boost_min_prob}")
        if not self.drift_half_life > 0:
            problems.append(f"drift_half_life must be > 0, got {self.drift_half_life}")
        if self.drift_cooldown < 0:
            problems.append(f"drift_cooldown must be >= 0, got {self.drift_cooldown}")
        if problems:
            raise ValueError("bad DriftConfig: " + "; ".join(problems))

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


DriftConfig.__doc__ += "\n\n    Parameters\n    ----------\n" + "".join(
    f"    {name}\n        {text}\n" for name, text in DriftConfig.help().items())


class RewardDrift:
    """ADWIN over the transition rewards, and the exploration boost a detected drop raises.

    Parameters
    ----------
    config
        The options (``drift_detector`` must not be ``"off"``: see :meth:`from_config`).

    Attributes
    ----------
    boost
        Exploration boost in [0, 1]: 1 at a detected drop, then halving every
        ``drift_half_life`` transitions.
    detections
        Drops that raised the boost.
    suppressed
        Drops detected inside the cooldown (counted, no effect).
    rises
        Detected rises of the mean (counted, no effect).
    seen
        Rewards observed.
    reference
        Mean reward of ADWIN's window just before the last acted-on drop (NaN before any).
    """

    def __init__(self, config: DriftConfig | None = None):
        self.config = config = config or DriftConfig()
        if config.drift_detector == "off":
            raise ValueError("RewardDrift with drift_detector='off': use RewardDrift.from_config")
        self.adwin = ADWIN(delta=config.drift_delta, clock=config.drift_clock,
                           min_window_length=config.drift_min_window, grace_period=config.drift_grace)
        self._decay = 0.5 ** (1.0 / config.drift_half_life)
        self.boost = 0.0
        self.detections = 0
        self.suppressed = 0
        self.rises = 0
        self.seen = 0
        self.reference = math.nan
        self._last_detection = -math.inf

    @classmethod
    def from_config(cls, config: DriftConfig | None) -> "RewardDrift | None":
        """A detector, or None when ``config`` is None or ``drift_detector`` is ``"off"``."""
        if config is None or config.drift_detector == "off":
            return None
        return cls(config)

    @property
    def window_mean(self) -> float:
        """Mean reward (in reward units) of ADWIN's current window; NaN when it is empty."""
        return self.adwin.estimation * self.config.drift_reward_max if self.adwin.width else math.nan

    def update(self, reward: float) -> bool:
        """Observe one transition's reward: decay the boost, feed ADWIN; True when a drop was
        detected and raised the boost."""
        self.seen += 1
        self.boost *= self._decay
        if self.boost < _BOOST_OFF:
            self.boost = 0.0
        x = min(1.0, max(0.0, float(reward) / self.config.drift_reward_max))
        before = self.adwin.estimation
        self.adwin.update(x)
        if not self.adwin.drift_detected:
            return False
        if self.adwin.estimation >= before:
            self.rises += 1
            return False
        if self.seen - self._last_detection < self.config.drift_cooldown:
            self.suppressed += 1
            return False
        self.detections += 1
        self._last_detection = self.seen
        self.reference = before * self.config.drift_reward_max
        self.boost = 1.0
        return True

    def apply(self, params: PolicyParams) -> PolicyParams:
        """``params`` (the learner's μ) with the current boost; exactly ``params`` at boost 0."""
        b, c = self.boost, self.config
        if b <= 0.0:
            return params
        alpha = params.alpha * c.drift_boost_alpha ** b
        alpha = max(params.alpha, min(alpha, c.drift_max_alpha))
        floor = params.min_prob + b * max(0.0, c.drift_boost_min_prob - params.min_prob)
        floor = max(params.min_prob, min(floor, 0.5 / params.top_k))
        return dataclasses.replace(params, alpha=alpha, min_prob=floor)
