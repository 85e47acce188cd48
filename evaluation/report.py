"""What ``memento eval`` prints and writes: the table, the JSON figures and the reward plot.

>>> from evaluation.runner import RunResult
>>> import numpy as np
>>> runs = [RunResult("cosine", s, {"reward_mean": 1.0 + s, "hit@10": 0.5}, np.ones(3)) for s in (0, 1)]
>>> summary = summarise(runs)
>>> summary["cosine"]["reward_mean"], summary["cosine"]["reward_mean_std"]
(1.5, 0.7071067811865476)
>>> print(format_table(summary).splitlines()[0].split()[:3])
['policy', 'reward/req', 'vs']
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.metrics import aggregate

__all__ = ["summarise", "format_table", "write_json", "plot_cumulative_reward"]

_OFF_POLICY = ("ips", "snips", "dr")


def summarise(runs: Sequence) -> dict[str, dict[str, float]]:
    """``{policy: {metric: mean over seeds, metric_std: std}}``, with off-policy estimates
    flattened as ``ips``, ``ips_ci_low``, ``ips_ci_high`` (and the same for snips, dr)."""
    by_policy: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        row = dict(run.metrics)
        for name, est in run.off_policy.items():
            row[name] = est["value"]
            row[name + "_ci_low"] = est["ci_low"]
            row[name + "_ci_high"] = est["ci_high"]
        by_policy.setdefault(run.policy, []).append(row)
    return {policy: aggregate(rows) for policy, rows in by_policy.items()}


def _cell(stats: dict[str, float], key: str, digits: int = 3) -> str:
    if key not in stats or not math.isfinite(stats[key]):
        return "-"
    std = stats.get(key + "_std", 0.0)
    return f"{stats[key]:.{digits}f}±{std:.{digits}f}" if std else f"{stats[key]:.{digits}f}"


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """A fixed-width table, one row per policy; ``vs cosine`` is the ratio of mean rewards."""
    base = summary.get("cosine", {}).get("reward_mean")
    columns = [("reward/req", "reward_mean"), ("vs cosine", None), ("%oracle", "share_of_oracle")]
    if any("greedy_share_of_oracle" in s for s in summary.values()):
        columns.append(("%oracle argmax", "greedy_share_of_oracle"))
    columns += [("regret/req", "regret_mean"), ("hit@1", "hit@1"), ("hit@10", "hit@10"),
               ("ndcg@10", "ndcg@10"), ("coverage", "coverage")]
    if any("shift_pre_share" in s for s in summary.values()):
        columns += [("recovery (req)", "shift_recovery_requests"), ("post-shift %oracle", "shift_post_share")]
    if any("ips" in s for s in summary.values()):
        columns += [(f"{n} [95% CI]", n) for n in _OFF_POLICY]
    rows = [["policy"] + [c[0] for c in columns]]
    for policy, stats in summary.items():
        row = [policy]
        for title, key in columns:
            if key is None:
                ratio = stats["reward_mean"] / base if base else math.nan
                row.append(f"{ratio:.2f}x" if math.isfinite(ratio) else "-")
            elif key in _OFF_POLICY:
                row.append(f"{stats[key]:.3f} [{stats[key + '_ci_low']:.3f}, {stats[key + '_ci_high']:.3f}]"
                           if key in stats else "-")
            elif key in ("share_of_oracle", "greedy_share_of_oracle", "shift_post_share") and key in stats:
                row.append(f"{100 * stats[key]:.1f}±{100 * stats.get(key + '_std', 0.0):.1f}%")
            elif key == "shift_recovery_requests":
                row.append(_cell(stats, key, 0))
            else:
                row.append(_cell(stats, key))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def write_json(path: str | Path, summary: dict[str, dict[str, float]], settings: dict) -> Path:
    """``{policy: {metric: value}}`` plus ``settings``; non-finite numbers become null."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean({**summary, "settings": settings}), indent=2, default=str))
    return path


def plot_cumulative_reward(path: str | Path, runs: Sequence, title: str = "") -> Path:
    """PNG of cumulative reward per request, one line per policy (mean over seeds, band ±1 std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_policy: dict[str, list[np.ndarray]] = {}
    for run in runs:
        by_policy.setdefault(run.policy, []).append(run.cumulative_reward)
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy, curves in by_policy.items():
        n = min(len(c) for c in curves)
        stack = np.stack([c[:n] for c in curves])
        mean, std = stack.mean(0), stack.std(0)
        x = np.arange(1, n + 1)
        ax.plot(x, mean, label=policy)
        if len(curves) > 1:
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("requests")
    ax.set_ylabel("cumulative reward")
    ax.set_title(title or "memento eval")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
