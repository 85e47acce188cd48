"""The bench's workload: a catalogue with power-law popularity, click histories of 1–5 items, and
the request bodies that carry them (so queries look like the cases of the bank)."""

from __future__ import annotations

import json

import numpy as np

__all__ = ["HISTORY_DECAY", "popular_items", "history_lengths", "request_bodies"]

HISTORY_DECAY = 0.85  # StateEncoder's default


def popular_items(rng: np.random.Generator, items: int, shape) -> np.ndarray:
    weights = 1.0 / (np.arange(items) + 10.0)
    return rng.choice(items, size=shape, p=weights / weights.sum())


def history_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1, 6, size=n)


def request_bodies(n: int, items: int, seed: int, users: int = 10_000) -> list[bytes]:
    """``n`` recommend request bodies, each with a history of 1–5 clicks as context.

    >>> body = json.loads(request_bodies(1, 100, 0)[0])
    >>> body["user_id"], 1 <= len(body["context"]["recent_items"]) <= 5
    ('u0', True)
    """
    rng = np.random.default_rng(seed + 1)
    picks = popular_items(rng, items, (n, 5))
    lengths = history_lengths(rng, n)
    return [json.dumps({"user_id": f"u{i % users}", "ts": 1000.0 + 10.0, "context": {"recent_items": [
        {"item_id": f"item{picks[i, j]}", "action": "click", "ts": 1000.0 + 10.0 - j}
        for j in range(int(lengths[i]))]}}, separators=(",", ":")).encode() for i in range(n)]

