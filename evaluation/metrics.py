"""Ranking and reward metrics of one evaluation run, and their mean ± std over seeds.

Per request the run records the reward attributed to the recommended item (the stream worker's
rule), the target item (the logged item, or on the simulator the oracle's item), and the ranked
list. ``hit@k`` is 1 when the target is among the first k items; ``NDCG@10`` is
1/log2(1 + rank) of the target within the first 10 (binary relevance, one relevant item, so the
ideal DCG is 1); coverage is the share of the catalogue that was recommended (first item) at
least once.

>>> m = RunMetrics(catalogue_size=4)
>>> m.add(reward=1.0, items=["a", "b"], target="b")
>>> m.add(reward=0.0, items=["c"], target="a")
>>> s = m.summary()
>>> s["reward_mean"], s["hit@1"], s["hit@10"], round(s["ndcg@10"], 4), s["coverage"]
(0.5, 0.0, 0.5, 0.3155, 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["RunMetrics", "ndcg_at", "aggregate", "shift_recovery", "RECOVERY_WINDOW", "RECOVERY_SHARE"]

RECOVERY_WINDOW = 250     # requests per window of the expected-reward share around a taste shift
RECOVERY_SHARE = 0.9      # recovered: a post-shift window's share is back to this part of the pre-shift one


def ndcg_at(items: Sequence[str], target: str | None, k: int = 10) -> float:
    """NDCG@k of a list with one relevant item ``target``."""
    if target is None:
        return 0.0
    for rank, item in enumerate(items[:k]):
        if item == target:
            return 1.0 / math.log2(rank + 2)
    return 0.0


@dataclass
class RunMetrics:
    """Accumulates one policy's requests in one run.

    Parameters
    ----------
    catalogue_size
        Number of items that could be recommended (for coverage).
    """

    catalogue_size: int
    rewards: list[float] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    oracle: list[float] = field(default_factory=list)
    ceiling: list[float] = field(default_factory=list)
    greedy: list[float] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    hits1: int = 0
    hits10: int = 0
    ndcg: float = 0.0
    recommended: set = field(default_factory=set)

    def add(self, reward: float, items: Sequence[str], target: str | None,
            expected: float | None = None, oracle: float | None = None,
            ceiling: float | None = None, greedy: float | None = None, index: int | None = None) -> None:
        """One closed request; ``ceiling`` is the best expected reward among the retrieved
        candidates' items (simulator), what any case policy could at most have earned;
        ``greedy`` the expected reward of the item the policy ranked best (simulator), which
        differs from ``expected`` when the policy explores; ``index`` the request's position in
        the stream (requests close out of order when windows are held for a session gap)."""
        self.rewards.append(float(reward))
        if index is not None:
            self.index.append(int(index))
        if greedy is not None:
            self.greedy.append(float(greedy))
        if ceiling is not None:
            self.ceiling.append(float(ceiling))
        if expected is not None:
            self.expected.append(float(expected))
        if oracle is not None:
            self.oracle.append(float(oracle))
        self.hits1 += int(target is not None and items[:1] == [target])
        self.hits10 += int(target is not None and target in items[:10])
        self.ndcg += ndcg_at(items, target, 10)
        self.recommended.add(items[0])

    def __len__(self) -> int:
        return len(self.rewards)

    def cumulative_reward(self) -> np.ndarray:
        return np.cumsum(np.asarray(self.rewards, np.float64))

    def shift_recovery(self, at: int, window: int = RECOVERY_WINDOW,
                       share: float = RECOVERY_SHARE) -> dict[str, float]:
        """:func:`shift_recovery` over the simulator's requests in request order (by ``index``
        when every request has one, else in closing order)."""
        if not (self.expected and len(self.expected) == len(self.oracle)):
            return {}
        order = np.argsort(self.index, kind="stable") if len(self.index) == len(self.expected) else slice(None)
        return shift_recovery(np.asarray(self.expected)[order], np.asarray(self.oracle)[order], at, window, share)

    def summary(self) -> dict[str, float]:
        n = max(1, len(self.rewards))
        out = {"requests": float(len(self.rewards)), "reward_total": float(sum(self.rewards)),
               "reward_mean": float(sum(self.rewards)) / n, "hit@1": self.hits1 / n,
               "hit@10": self.hits10 / n, "ndcg@10": self.ndcg / n,
               "coverage": len(self.recommended) / max(1, self.catalogue_size)}
        if self.expected and self.oracle:
            exp, orc = float(np.mean(self.expected)), float(np.mean(self.oracle))
            out.update({"expected_reward_mean": exp, "oracle_reward_mean": orc,
                        "regret_total": float(np.sum(self.oracle) - np.sum(self.expected)),
                        "regret_mean": orc - exp, "share_of_oracle": exp / orc if orc > 0 else math.nan})
        if self.ceiling and self.oracle:
            orc = float(np.mean(self.oracle))
            out["candidate_ceiling_share"] = float(np.mean(self.ceiling)) / orc if orc > 0 else math.nan
        if self.greedy and self.oracle:
            orc = float(np.mean(self.oracle))
            out["greedy_share_of_oracle"] = float(np.mean(self.greedy)) / orc if orc > 0 else math.nan
        return out


def shift_recovery(expected: Sequence[float], oracle: Sequence[float], at: int,
                   window: int = RECOVERY_WINDOW, share: float = RECOVERY_SHARE) -> dict[str, float]:
    """How a policy's windowed share of the oracle fares after a shift at request ``at``.

    The share of a window is Σ expected / Σ oracle over its requests (request order).
    ``shift_pre_share``: the window just before the shift. ``shift_min_share``: the lowest
    window wholly after it. ``shift_post_share``: all requests after it.
    ``shift_recovery_requests``: the requests after the shift until the first wholly post-shift
    window whose share is back to ``share`` × the pre-shift one (at least ``window``; NaN when
    that never happens in the run).

    >>> exp = [0.5] * 500 + [0.0] * 300 + [0.5] * 700       # the shift at request 500
    >>> r = shift_recovery(exp, [1.0] * 1500, at=500, window=100)
    >>> round(r["shift_pre_share"], 3), round(r["shift_min_share"], 3)
    (0.5, 0.0)
    >>> r["shift_recovery_requests"]          # the window [390 − 100, 390) holds 90 good requests
    390.0
    """
    e, o = np.asarray(expected, np.float64), np.asarray(oracle, np.float64)
    if not 0 < window <= at or len(e) < at + window:
        return {}
    ce, co = np.concatenate([[0.0], np.cumsum(e)]), np.concatenate([[0.0], np.cumsum(o)])
    pre = (ce[at] - ce[at - window]) / (co[at] - co[at - window])
    ends = np.arange(at + window, len(e) + 1)
    shares = (ce[ends] - ce[ends - window]) / np.maximum(co[ends] - co[ends - window], 1e-12)
    back = np.flatnonzero(shares >= share * pre)
    return {"shift_pre_share": float(pre), "shift_min_share": float(shares.min()),
            "shift_post_share": float((ce[-1] - ce[at]) / max(co[-1] - co[at], 1e-12)),
            "shift_recovery_requests": float(ends[back[0]] - at) if len(back) else math.nan}


def aggregate(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """``{metric: mean, metric + "_std": sample std}`` over seeds (std 0 for one seed); metrics
    missing from some seeds are averaged over those that have them."""
    keys = list(dict.fromkeys(k for run in per_seed for k in run))
    out: dict[str, float] = {}
    for key in keys:
        values = np.asarray([run[key] for run in per_seed if key in run], np.float64)
        out[key] = float(values.mean())
        out[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out
