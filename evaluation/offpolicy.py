"""Off-policy value estimators for logged bandit data (used when a log has a ``propensity`` column).

Each logged event *i* has a reward ``r_i``, the logging policy's probability ``p_i`` of the logged
item, and the target policy's probability ``π_i`` of that same item; the importance weight is
``w_i = π_i / p_i``, optionally clipped at ``weight_clip`` (lower variance, bias towards zero).

* **IPS** (Horvitz & Thompson 1952; inverse propensity scoring): ``mean(w·r)``. Unbiased when
  the logged propensities are correct and the logging policy covers every item the target picks.
* **SNIPS** (Swaminathan & Joachims 2015, self-normalised IPS): ``Σ w·r / Σ w``. Slightly biased
  but consistent, bounded by the reward range, and much less variable when weights are large.
* **DR** (Dudík, Langford & Li 2011, doubly robust): ``mean(r̂_target + w·(r − r̂_logged))``.
  Unbiased if *either* the propensities or the reward model r̂ are correct; lower variance than
  IPS when r̂ is good.

All three assume the logged propensities are the probabilities the logging policy really used,
and overlap (support): every item the target policy can choose had ``p > 0`` in that context.
Items the target picks but the logger never shows contribute nothing, so the estimates are then
biased, and no confidence interval reveals it. Intervals are normal approximations at 95%
(``value ± 1.96·se``); with fewer than two events they are ``(nan, nan)``, and with no events, or
for SNIPS when every weight is zero, the value itself is ``nan`` (the estimate is undefined).

>>> r, p, pi = [1, 0, 1, 1], [0.5, 0.25, 0.5, 0.5], [1.0, 0.5, 0.0, 1.0]
>>> ips(r, p, pi).value                  # weights 2, 2, 0, 2: mean of (2, 0, 0, 2)
1.0
>>> round(snips(r, p, pi).value, 4)      # (2 + 0 + 0 + 2) / (2 + 2 + 0 + 2)
0.6667
>>> doubly_robust(r, p, pi, [0.5] * 4, [0.5] * 4).value  # 0.5 + mean of (1, -1, 0, 1)
0.75
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Estimate", "ips", "snips", "doubly_robust", "OffPolicyAccumulator", "Z_95"]

Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal."""

_NAN = float("nan")

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Estimate:
    """One off-policy estimate with its 95% normal-approximation confidence interval.

    Parameters
    ----------
    name: the estimator (``"ips"``, ``"snips"`` or ``"dr"``).
    value: the estimated mean reward of the target policy (``nan`` when undefined).
    ci_low, ci_high: ``value ∓ 1.96·std_error``; ``nan`` with fewer than two events.
    n: number of logged events used.
    std_error: the estimate's standard error; ``nan`` with fewer than two events.

    >>> Estimate("ips", 0.5, 0.3, 0.7, 10, 0.1).to_dict()
    {'value': 0.5, 'ci_low': 0.3, 'ci_high': 0.7, 'n': 10, 'std_error': 0.1}
    """

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    std_error: float

    def to_dict(self) -> dict:
        """The numbers, for ``--json`` output (the name is the caller's key)."""
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "n": self.n, "std_error": self.std_error}


def _as_array(name: str, values: ArrayLike) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a sequence of numbers ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    return arr


def _valid(kind: str, arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Mask of valid values and the requirement, for ``kind`` in finite / propensity / probability."""
    # Comparisons are written so that nan fails them and is reported too.
    if kind == "propensity":
        return (arr > 0) & (arr <= 1), "is outside (0, 1]"
    if kind == "probability":
        return (arr >= 0) & (arr <= 1), "is outside [0, 1]"
    return np.isfinite(arr), "is not finite"


def _first_bad(name: str, arr: np.ndarray, kind: str) -> None:
    ok, requirement = _valid(kind, arr)
    bad = np.flatnonzero(~ok)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {float(arr[i])!r} {requirement} "
                         f"({bad.size} bad value{'s' if bad.size > 1 else ''} in all)")


def _check_clip(weight_clip: float | None) -> None:
    if weight_clip is not None and not weight_clip > 0:
        raise ValueError(f"weight_clip = {weight_clip!r} must be > 0 (or None for no clipping)")


def _validated(rewards: ArrayLike, propensities: ArrayLike, target_probs: ArrayLike,
               **reward_hats: ArrayLike) -> list[np.ndarray]:
    named = {"rewards": rewards, "propensities": propensities, "target_probs": target_probs,
             **reward_hats}
    arrays = {name: _as_array(name, values) for name, values in named.items()}
    n = arrays["rewards"].size
    for name, arr in arrays.items():
        if arr.size != n:
            raise ValueError(f"{name} has {arr.size} values but rewards has {n}")
    r, p, pi = arrays["rewards"], arrays["propensities"], arrays["target_probs"]
    _first_bad("rewards", r, "finite")
    _first_bad("propensities", p, "propensity")
    _first_bad("target_probs", pi, "probability")
    for name in reward_hats:
        _first_bad(name, arrays[name], "finite")
    return list(arrays.values())


def _weights(p: np.ndarray, pi: np.ndarray, weight_clip: float | None) -> np.ndarray:
    w = pi / p
    return w if weight_clip is None else np.minimum(w, weight_clip)


def _estimate(name: str, value: float, std_error: float, n: int) -> Estimate:
    if n < 2:
        std_error = _NAN
    return Estimate(name=name, value=float(value), ci_low=float(value - Z_95 * std_error),
                    ci_high=float(value + Z_95 * std_error), n=n, std_error=float(std_error))


def _mean_estimate(name: str, terms: np.ndarray) -> Estimate:
    n = terms.size
    if n == 0:
        return _estimate(name, _NAN, _NAN, 0)
    se = float(np.std(terms, ddof=1)) / math.sqrt(n) if n >= 2 else _NAN
    return _estimate(name, float(np.mean(terms)), se, n)


def ips(rewards: ArrayLike, propensities: ArrayLike, target_probs: ArrayLike, *,
        weight_clip: float | None = None) -> Estimate:
    """Inverse propensity scoring: ``mean(w·r)`` with ``w = π/p``; se from the sample std.

    Parameters
    ----------
    rewards: finite reward of each logged event.
    propensities: the logging policy's probability of the logged item, in (0, 1].
    target_probs: the target policy's probability of the logged item, in [0, 1].
    weight_clip: if given (> 0), weights above it are set to it.

    Raises ``ValueError`` naming the argument and the first bad index.

    >>> e = ips([1, 0], [0.5, 0.5], [1, 1])
    >>> e.value, e.n
    (1.0, 2)
    >>> ips([1, 0], [0.1, 0.5], [1, 1], weight_clip=4).value   # weights (10 → 4, 2)
    2.0
    """
    _check_clip(weight_clip)
    r, p, pi = _validated(rewards, propensities, target_probs)
    return _mean_estimate("ips", _weights(p, pi, weight_clip) * r)


def snips(rewards: ArrayLike, propensities: ArrayLike, target_probs: ArrayLike, *,
          weight_clip: float | None = None) -> Estimate:
    """Self-normalised IPS: ``Σ w·r / Σ w``; se by the delta method for a ratio estimator,
    ``se² = Σ (w_i·(r_i − value))² / (Σ w)²``.

    If ``Σ w = 0`` (the target policy gives zero probability to every logged item) the estimate
    is undefined: value, se and interval are ``nan`` and ``n`` is still the number of events.

    Parameters are those of :func:`ips`.

    >>> snips([1, 0, 1], [0.5, 0.5, 0.25], [1, 1, 0]).value    # (2 + 0 + 0) / (2 + 2 + 0)
    0.5
    >>> snips([1, 0], [0.5, 0.5], [0, 0]).value
    nan
    """
    _check_clip(weight_clip)
    r, p, pi = _validated(rewards, propensities, target_probs)
    w = _weights(p, pi, weight_clip)
    n, total = r.size, float(np.sum(w))
    if n == 0 or total == 0:
        return _estimate("snips", _NAN, _NAN, n)
    value = float(np.sum(w * r)) / total
    se = math.sqrt(float(np.sum((w * (r - value)) ** 2))) / total
    return _estimate("snips", value, se, n)


def doubly_robust(rewards: ArrayLike, propensities: ArrayLike, target_probs: ArrayLike,
                  reward_hat_logged: ArrayLike, reward_hat_target: ArrayLike, *,
                  weight_clip: float | None = None) -> Estimate:
    """Doubly robust: ``mean(r̂_target + w·(r − r̂_logged))``; se from the sample std.

    Parameters
    ----------
    rewards, propensities, target_probs, weight_clip: as for :func:`ips`.
    reward_hat_logged: the reward model's prediction for the logged item (finite).
    reward_hat_target: the model's expected reward under the target policy in the same context,
        ``Σ_a π(a|x) r̂(x, a)`` (finite).

    With a zero reward model DR equals IPS:

    >>> doubly_robust([1, 0], [0.5, 0.5], [1, 1], [0, 0], [0, 0]).value
    1.0
    >>> doubly_robust([1, 0], [0.5, 0.5], [1, 1], [1, 0], [1, 0]).value  # perfect model
    0.5
    """
    _check_clip(weight_clip)
    r, p, pi, rh_logged, rh_target = _validated(
        rewards, propensities, target_probs,
        reward_hat_logged=reward_hat_logged, reward_hat_target=reward_hat_target)
    return _mean_estimate("dr", rh_target + _weights(p, pi, weight_clip) * (r - rh_logged))


class OffPolicyAccumulator:
    """Collects logged events one by one (streaming eval) and gives all three estimates.

    Each :meth:`add` is validated at once (the error names the argument and the event index);
    :meth:`estimates` runs the batch functions over everything added so far, so the results are
    exactly theirs. Without reward-model predictions (both default to 0) DR equals IPS.

    Parameters
    ----------
    weight_clip: passed to every estimator; ``None`` for no clipping.

    >>> acc = OffPolicyAccumulator()
    >>> acc.add(1.0, 0.5, 1.0)
    >>> acc.add(0.0, 0.5, 1.0)
    >>> len(acc), acc.estimates()["ips"].value, acc.estimates()["snips"].value
    (2, 1.0, 0.5)
    """

    def __init__(self, weight_clip: float | None = None) -> None:
        _check_clip(weight_clip)
        self.weight_clip = weight_clip
        self._columns: dict[str, list[float]] = {
            "rewards": [], "propensities": [], "target_probs": [],
            "reward_hat_logged": [], "reward_hat_target": []}

    def add(self, reward: float, propensity: float, target_prob: float,
            reward_hat_logged: float = 0.0, reward_hat_target: float = 0.0) -> None:
        """Record one event; raises ``ValueError`` naming the argument and the event's index (the
        number of events added before it) if a value is invalid, and then records nothing."""
        i = len(self)
        row = {"reward": (reward, "finite"), "propensity": (propensity, "propensity"),
               "target_prob": (target_prob, "probability"),
               "reward_hat_logged": (reward_hat_logged, "finite"),
               "reward_hat_target": (reward_hat_target, "finite")}
        values = []
        for name, (value, kind) in row.items():
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} = {value!r} (event {i}) is not a number") from None
            ok, requirement = _valid(kind, np.array([x]))
            if not ok[0]:
                raise ValueError(f"{name} = {x!r} (event {i}) {requirement}")
            values.append(x)
        for column, x in zip(self._columns.values(), values):
            column.append(x)

    def __len__(self) -> int:
        return len(self._columns["rewards"])

    def estimates(self) -> dict[str, Estimate]:
        """``{"ips": ..., "snips": ..., "dr": ...}`` over all events added so far."""
        c = self._columns
        r, p, pi = c["rewards"], c["propensities"], c["target_probs"]
        return {
            "ips": ips(r, p, pi, weight_clip=self.weight_clip),
            "snips": snips(r, p, pi, weight_clip=self.weight_clip),
            "dr": doubly_robust(r, p, pi, c["reward_hat_logged"], c["reward_hat_target"],
                                weight_clip=self.weight_clip),
        }
