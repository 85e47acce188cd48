"""Item and state encoders: the one definition of how items and users become vectors.

Items are encoded by signed feature hashing of their metadata (category, brand, seller, title
tokens and the item id itself) into ``dim`` dimensions, L2-normalised. A user's state is the
L2-normalised sum of the vectors of their recent items, weighted by action type and by recency
(newest first, geometric decay). Every process (stream worker, serving, learner, eval) imports
these classes, so a state computed anywhere means the same thing everywhere.

>>> import numpy as np
>>> enc = ItemEncoder(dim=8)
>>> v = enc.encode("42")
>>> round(float((v ** 2).sum()), 5)
1.0
>>> st = StateEncoder(enc)
>>> s = st.encode([HistoryEntry("42", "click", 1.0)])
>>> bool(np.allclose(s, v))
True
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "ItemMeta", "HistoryEntry", "ItemEncoder", "StateEncoder", "load_products", "ACTION_STRENGTH",
    "case_feature_vector", "case_feature_dim",
]

# How much an action says about taste, for the state encoder (not the reward).
ACTION_STRENGTH = {"click": 1.0, "collect": 2.0, "cart": 2.5, "purchase": 3.0}


@dataclass(frozen=True)
class ItemMeta:
    """Product metadata used for item features (Tmall product file columns)."""

    item_id: str
    category: str = ""
    brand: str = ""
    seller: str = ""
    title: str = ""


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    action: str
    ts: float


def _hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


def load_products(path: str | Path) -> dict[str, ItemMeta]:
    """Read a product CSV (``item_id,title,pict_url,category,brand_id,seller_id``).

    Tmall's files are GB18030; UTF-8 is tried first. Item ids keep no ``i`` prefix.
    """
    raw = Path(path).read_bytes()
    for encoding in ("utf-8", "gb18030"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ValueError(f"{path}: neither UTF-8 nor GB18030")
    reader = csv.DictReader(io.StringIO(text))
    need = {"item_id", "category"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise ValueError(f"{path}: product CSV needs columns {sorted(need)}, has {reader.fieldnames}")
    out = {}
    for row in reader:
        item_id = normalise_item_id(row["item_id"])
        brand = row.get("brand_id") or ""
        out[item_id] = ItemMeta(
            item_id=item_id,
            category=row.get("category") or "",
            brand="" if brand == "null" else brand,
            seller=row.get("seller_id") or "",
            title=row.get("title") or "",
        )
    return out


def normalise_item_id(raw: str) -> str:
    """Tmall logs prefix item ids with ``i``; product files do not. Use the bare id."""
    raw = raw.strip()
    return raw[1:] if len(raw) > 1 and raw[0] == "i" and raw[1:].isdigit() else raw


class ItemEncoder:
    """Hashes item metadata into a unit vector.

    Parameters
    ----------
    dim
        Output dimension.
    catalogue
        Item metadata by item id; unknown items are encoded from their id alone.
    weights
        Relative weight of each feature group.
    """

    def __init__(self, dim: int = 32, catalogue: dict[str, ItemMeta] | None = None,
                 weights: dict[str, float] | None = None):
        self.dim = dim
        self.catalogue = catalogue or {}
        self.weights = {"category": 1.0, "category_top": 0.7, "brand": 0.6, "seller": 0.5,
                        "title": 0.3, "id": 0.5, **(weights or {})}
        self._cache: dict[str, np.ndarray] = {}

    def _features(self, item_id: str) -> Iterable[tuple[str, float]]:
        meta = self.catalogue.get(item_id)
        yield f"id={item_id}", self.weights["id"]
        if meta is None:
            return
        if meta.category:
            yield f"cat={meta.category}", self.weights["category"]
            yield f"cat0={meta.category.split('-')[0]}", self.weights["category_top"]
        if meta.brand:
            yield f"brand={meta.brand}", self.weights["brand"]
        if meta.seller:
            yield f"seller={meta.seller}", self.weights["seller"]
        tokens = [t for t in meta.title.split() if t]
        for tok in tokens:
            yield f"tok={tok}", self.weights["title"] / max(1.0, len(tokens) ** 0.5)

    def encode(self, item_id: str) -> np.ndarray:
        vec = self._cache.get(item_id)
        if vec is None:
            vec = np.zeros(self.dim, dtype=np.float32)
            for token, weight in self._features(item_id):
                # Several hashes per token spread it over dimensions (a random projection).
                for j in range(4):
                    h = _hash(f"{j}:{token}")
                    vec[h % self.dim] += weight * (1.0 if (h >> 32) & 1 else -1.0)
            norm = float(np.linalg.norm(vec))
            vec /= norm if norm > 0 else 1.0
            vec.setflags(write=False)
            self._cache[item_id] = vec
        return vec

    def encode_many(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.stack([self.encode(i) for i in item_ids]) if item_ids else np.zeros((0, self.dim), np.float32)


class StateEncoder:
    """Encodes a user's recent history into a state vector.

    Parameters
    ----------
    items
        The item encoder.
    decay
        Weight multiplier per step back in history (newest entry has weight 1).
    max_len
        Only the newest ``max_len`` entries count.
    """

    def __init__(self, items: ItemEncoder, decay: float = 0.85, max_len: int = 30):
        self.items = items
        self.decay = decay
        self.max_len = max_len

    @property
    def dim(self) -> int:
        return self.items.dim

    def encode(self, history: Sequence[HistoryEntry], until: float | None = None) -> np.ndarray:
        """State from ``history`` (any order); only entries with ``ts <= until`` when given."""
        entries = [h for h in history if until is None or h.ts <= until]
        entries.sort(key=lambda h: h.ts, reverse=True)
        state = np.zeros(self.dim, dtype=np.float32)
        for rank, h in enumerate(entries[: self.max_len]):
            state += (self.decay ** rank) * ACTION_STRENGTH.get(h.action, 1.0) * self.items.encode(h.item_id)
        norm = float(np.linalg.norm(state))
        return state / norm if norm > 0 else state


def case_feature_dim(dim: int) -> int:
    """Length of a case's feature vector: case state, item vector and outcome."""
    return 2 * dim + 1


def case_feature_vector(state: Sequence[float], item_vec: Sequence[float], outcome: float) -> np.ndarray:
    """The features the Q network sees for a case: [case state, item vector, outcome]."""
    return np.concatenate([np.asarray(state, np.float32), np.asarray(item_vec, np.float32),
                           np.asarray([outcome], np.float32)])
