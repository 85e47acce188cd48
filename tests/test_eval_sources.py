"""``memento eval --source interactions`` end to end: every policy, through the CLI, on a rating
log with an item file and on a bandit log (propensities, categorical and numeric context, no
user id). Both logs are generated here, small and deterministic."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from evaluation.policies import POLICY_NAMES

# Small networks and early learning, so that the trained policies update within a short run.
FAST = ["--no-progress", "--item-dim", "16", "--top-k", "8", "--hidden", "16", "--batch-size", "16",
        "--learning-starts", "16", "--publish-every", "20"]
EVENTS = 120


def _write(path: Path, header: list[str], rows: list[list]) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def rating_log(tmp_path: Path) -> list[str]:
    """300 ratings by 25 users of 40 items (user_id,item_id,timestamp,rating) and an item file:
    users come back to two favourite items half of the time; they rate items of their favourite
    category high, others low."""
    rng = np.random.default_rng(11)
    categories = [f"{c}-{c * 7}" for c in range(5)]
    items = [(f"{i}", categories[i % 5], f"b{i % 3}", f"item {i} {categories[i % 5]}") for i in range(40)]
    rows = []
    for n in range(300):
        user = int(rng.integers(25))
        favourites = [user % 5 + 5 * (user % 8), user % 5 + 5 * ((user + 3) % 8)]   # of their category
        item = favourites[int(rng.integers(2))] if rng.random() < 0.5 else int(rng.integers(40))
        liked = items[item][1] == categories[user % 5]
        rating = int(rng.integers(4, 6)) if liked else int(rng.integers(1, 4))
        rows.append([f"u{user}", items[item][0], 1_400_000_000 + 90 * n, rating])
    log = _write(tmp_path / "ratings.csv", ["user_id", "item_id", "timestamp", "rating"], rows)
    meta = _write(tmp_path / "items.csv", ["item_id", "category", "brand", "title"], [list(i) for i in items])
    return ["--log", log, "--rating-threshold", "4", "--items", meta]


def bandit_log(tmp_path: Path) -> list[str]:
    """300 logged decisions over 6 items, uniform logging (propensity 1/6), no user id; the
    context has two hashed categorical columns and two numeric ones, with some values missing.
    A click is likelier when the item matches the site."""
    rng = np.random.default_rng(12)
    sites = ["81ce5f0a9e", "9f00e1c2b4", "0a1b2c3d4e"]
    devices = ["c4ca4238a0", "c81e728d9d"]
    rows = []
    for n in range(300):
        s = int(rng.integers(3))
        item = int(rng.integers(6))
        click = rng.random() < (0.7 if item % 3 == s else 0.1)
        site = "" if n % 23 == 0 else sites[s]
        age = "" if n % 19 == 0 else f"{rng.uniform(0, 1):.3f}"
        rows.append([f"item{item}", 1_500_000_000 + 5 * n, "click" if click else "view", f"{1 / 6:.6f}",
                     site, devices[int(rng.integers(2))], age, "NaN" if n % 29 == 0 else int(rng.integers(3))])
    log = _write(tmp_path / "bandit.csv", ["item_id", "timestamp", "action", "propensity",
                                           "ctx_site", "ctx_device", "ctx_age", "ctx_visits"], rows)
    return ["--log", log, "--context-cols", "ctx_", "--reward", "click=1,view=0"]


def _sane(name: str, m: dict) -> None:
    assert m["requests"] == EVENTS, name
    assert 0.0 <= m["hit@1"] <= m["hit@10"] <= 1.0, name
    assert 0.0 <= m["ndcg@10"] <= 1.0 and 0.0 < m["coverage"] <= 1.0, name
    assert 0.0 <= m["reward_mean"] <= 1.0, name          # rewards are 0 or 1 in both logs
    if name in ("greedy-q", "softq", "linucb"):
        assert m["updates"] > 0, name


@pytest.mark.parametrize("make_log", [rating_log, bandit_log], ids=["rating", "bandit"])
def test_every_policy_runs_on_an_interactions_log_through_the_cli(tmp_path, capsys, make_log):
    out = tmp_path / "eval.json"
    argv = ["eval", "--source", "interactions", *make_log(tmp_path), "--policies", ",".join(POLICY_NAMES),
            "--events", str(EVENTS), "--warmup-events", "60", "--json", str(out), *FAST]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert set(figures) == {*POLICY_NAMES, "settings"}
    for name in POLICY_NAMES:
        _sane(name, figures[name])
        assert name in printed
    assert max(figures[name]["reward_mean"] for name in POLICY_NAMES) > 0   # rewards are attributed
    bandit = make_log is bandit_log
    if bandit:
        assert "no user ids" in figures["settings"]["data"]
        assert "4 context columns (2 categorical)" in figures["settings"]["data"]
        assert "propensity logged" in figures["settings"]["data"]
    else:
        assert "25 users" in figures["settings"]["data"] and "40 with metadata" in figures["settings"]["data"]
    for name in POLICY_NAMES:
        for estimator in ("ips", "snips", "dr"):
            if not bandit:
                assert estimator not in figures[name]
                continue
            value = figures[name][estimator]
            low, high = figures[name][estimator + "_ci_low"], figures[name][estimator + "_ci_high"]
            assert all(isinstance(x, float) and math.isfinite(x) for x in (value, low, high)), (name, estimator)
            assert low <= value <= high, (name, estimator)
