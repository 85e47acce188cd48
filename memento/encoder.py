"""Item and state encoders: the one definition of how items and users become vectors.

Items are encoded by signed feature hashing of their metadata (category, brand, seller, title
tokens and the item id itself) into ``dim`` dimensions, L2-normalised; an optional
:class:`TextEncoder` (off by default) adds a fixed random projection of the title's embedding.
A user's state is the L2-normalised sum of the vectors of their recent items, weighted by action
type and by recency (newest first, geometric decay). Every process (stream worker, serving,
learner, eval) imports these classes, so a state computed anywhere means the same thing
everywhere.

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

import abc
import csv
import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "ItemMeta", "HistoryEntry", "ItemEncoder", "StateEncoder", "RowStateEncoder", "load_products", "normalise_item_id",
    "ACTION_STRENGTH", "case_feature_vector", "case_feature_dim", "case_state", "case_item", "case_outcome",
    "signed_hash",
    "TextEncoder", "SentenceTransformerTextEncoder", "text_encoder_from_path", "TEXT_PROJECTION_SEED",
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
    """One action of a user's history; ``event_id`` names its organic case in the bank
    (:func:`memento.schemas.organic_case_id`), empty when unknown (items a request lists)."""

    item_id: str
    action: str
    ts: float
    event_id: str = ""


def _hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


def signed_hash(token: str, dim: int) -> tuple[int, float]:
    """Signed feature hashing of one token: its bucket in ``range(dim)`` and its sign (±1.0).

    The one hashing family of the project: :class:`ItemEncoder` adds each metadata token this
    way (several salted copies per token), and :mod:`evaluation.logs` encodes
    categorical context values (``"column=value"``) with it. The hash is BLAKE2b, the same in
    every process and Python run.

    >>> signed_hash("cat=1-2", 8) == signed_hash("cat=1-2", 8)
    True
    >>> index, sign = signed_hash("cat=1-2", 8)
    >>> 0 <= index < 8 and sign in (1.0, -1.0)
    True
    """
    h = _hash(token)
    return h % dim, (1.0 if (h >> 32) & 1 else -1.0)


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


class TextEncoder(abc.ABC):
    """Turns texts (item titles) into fixed-size embeddings.

    Subclasses implement :meth:`_encode` and :attr:`dim`; callers use :meth:`encode`, which
    checks what the subclass returned.

    >>> class Lengths(TextEncoder):
    ...     dim = 2
    ...     def _encode(self, texts):
    ...         return [[len(t), 1.0] for t in texts]
    >>> Lengths().encode(["ab", "abcd"]).tolist()
    [[2.0, 1.0], [4.0, 1.0]]
    """

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Length of one embedding."""

    @abc.abstractmethod
    def _encode(self, texts: list[str]) -> Any:
        """Embeddings of ``texts``, anything ``np.asarray`` turns into [len(texts), dim]."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``.

        Parameters
        ----------
        texts
            The texts, in order (a list, not a single string).

        Returns
        -------
        np.ndarray
            float32 array [len(texts), dim], all finite.

        Raises
        ------
        ValueError
            When the encoder returned the wrong shape or non-finite values.
        """
        if isinstance(texts, str):
            raise TypeError(f"{type(self).__name__}.encode takes a sequence of texts, not one str")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = np.asarray(self._encode(texts), dtype=np.float32)
        if out.shape != (len(texts), self.dim):
            raise ValueError(f"text encoder {type(self).__name__} returned shape {out.shape} for "
                             f"{len(texts)} texts; expected ({len(texts)}, {self.dim})")
        if not np.isfinite(out).all():
            raise ValueError(f"text encoder {type(self).__name__} returned non-finite values")
        return out


class SentenceTransformerTextEncoder(TextEncoder):
    """A sentence-transformers model loaded from a local path (optional; not a dependency).

    Parameters
    ----------
    model_path
        Directory of a saved sentence-transformers model.
    device
        Torch device the model runs on.
    batch_size
        Texts per forward pass.

    Raises
    ------
    FileNotFoundError
        When ``model_path`` does not exist.
    RuntimeError
        When the ``sentence_transformers`` package is not installed.

    >>> SentenceTransformerTextEncoder("/no/such/model")
    Traceback (most recent call last):
    ...
    FileNotFoundError: text encoder model path '/no/such/model' does not exist
    """

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 64):
        if not Path(model_path).exists():
            raise FileNotFoundError(f"text encoder model path {model_path!r} does not exist")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            import sentence_transformers
        except ImportError as err:
            raise RuntimeError("the sentence_transformers package is not installed: "
                               "pip install sentence-transformers; --text-encoder needs it") from err
        self.model_path = str(model_path)
        self.device = device
        self.batch_size = batch_size
        self._model = sentence_transformers.SentenceTransformer(self.model_path, device=device)
        dim = self._model.get_sentence_embedding_dimension()
        if dim is None:  # some models only know their output size after a forward pass
            dim = int(np.asarray(self._model.encode([""], convert_to_numpy=True)).shape[-1])
        self._dim = int(dim)

    @property
    def dim(self) -> int:
        return self._dim

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                  show_progress_bar=False)


def text_encoder_from_path(path: str | None) -> TextEncoder | None:
    """The CLI's ``--text-encoder PATH``: a :class:`SentenceTransformerTextEncoder`, or None.

    Parameters
    ----------
    path
        Model directory; None or "" means no text encoder (the default).

    >>> text_encoder_from_path("") is None
    True
    """
    if not path:
        return None
    return SentenceTransformerTextEncoder(path)


# Every process derives the same projection from this seed and the two dimensions.
TEXT_PROJECTION_SEED = 20240611
# A hashed feature of weight w adds 4 signed entries of ±w, norm 2w; the projected title
# embedding is scaled to the same norm (in expectation) so weights are comparable.
_TEXT_SCALE = 2.0


@functools.lru_cache(maxsize=8)
def _text_projection(text_dim: int, dim: int) -> np.ndarray:
    # RandomState's stream is frozen by NumPy (NEP 19), unlike Generator's: the projection
    # stays the same across NumPy versions. Entries N(0, 1/dim) keep E|x P|^2 = |x|^2.
    proj = np.random.RandomState(TEXT_PROJECTION_SEED).standard_normal((text_dim, dim))
    proj = (proj / np.sqrt(dim)).astype(np.float32)
    proj.setflags(write=False)
    return proj


class ItemEncoder:
    """Hashes item metadata (and optionally a title embedding) into a unit vector.

    Parameters
    ----------
    dim
        Output dimension.
    catalogue
        Item metadata by item id; unknown items are encoded from their id alone.
    weights
        Relative weight of each feature group: ``category``, ``category_top``, ``brand``,
        ``seller``, ``title`` (hashed tokens), ``id`` and ``text`` (the text encoder's part).
    text_encoder
        Optional encoder of item titles. Its unit-normalised embedding is projected to ``dim``
        by a fixed Gaussian projection and added to the hashed vector; None (the default)
        leaves the vectors exactly as without it.

    >>> enc = ItemEncoder(4, {"7": ItemMeta("7", category="1-2", title="red shoe")})
    >>> enc.encode_many(["7", "8"]).shape
    (2, 4)
    """

    def __init__(self, dim: int = 32, catalogue: dict[str, ItemMeta] | None = None,
                 weights: dict[str, float] | None = None, text_encoder: TextEncoder | None = None):
        self.dim = dim
        self.catalogue = catalogue or {}
        self.weights = {"category": 1.0, "category_top": 0.7, "brand": 0.6, "seller": 0.5,
                        "title": 0.3, "id": 0.5, "text": 1.0, **(weights or {})}
        self.text_encoder = text_encoder
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

    def _title(self, item_id: str) -> str | None:
        """The title the text encoder sees, or None when there is no encoder or no title."""
        if self.text_encoder is None:
            return None
        meta = self.catalogue.get(item_id)
        title = meta.title.strip() if meta is not None else ""
        return title or None

    def _text_part(self, embedding: np.ndarray) -> np.ndarray | None:
        norm = float(np.linalg.norm(embedding))
        if norm == 0:
            return None
        proj = _text_projection(embedding.shape[0], self.dim)
        scale = _TEXT_SCALE * self.weights["text"] / norm
        return (embedding @ proj * scale).astype(np.float32)

    def _build(self, item_id: str, embedding: np.ndarray | None) -> np.ndarray:
        vec = np.zeros(self.dim, dtype=np.float32)
        features = list(self._features(item_id))
        salt = 0
        while True:
            for token, weight in features:
                # Several hashes per token spread it over dimensions (a random projection).
                for j in range(4):
                    index, sign = signed_hash(f"{j}:{token}" if salt == 0 else f"{salt}.{j}:{token}", self.dim)
                    vec[index] += weight * sign
            # Rarely the signed hashes cancel out exactly; hash again rather than leave the item
            # with no direction.
            if embedding is not None or not features or np.any(vec) or salt >= 8:
                break
            salt += 1
        if embedding is not None:
            text = self._text_part(embedding)
            if text is not None:
                vec += text
        norm = float(np.linalg.norm(vec))
        vec /= norm if norm > 0 else 1.0
        vec.setflags(write=False)
        self._cache[item_id] = vec
        return vec

    def encode(self, item_id: str) -> np.ndarray:
        """Unit vector [dim] (float32, read-only, cached) of one item.

        Parameters
        ----------
        item_id
            The item; one missing from the catalogue is encoded from its id alone.
        """
        vec = self._cache.get(item_id)
        if vec is None:
            title = self._title(item_id)
            embedding = None if title is None else self.text_encoder.encode([title])[0]
            vec = self._build(item_id, embedding)
        return vec

    def encode_many(self, item_ids: Sequence[str]) -> np.ndarray:
        """Vectors [len(item_ids), dim] of several items; the text encoder runs once for all
        uncached titles.

        Parameters
        ----------
        item_ids
            The items, in order (repeats allowed).
        """
        if not item_ids:
            return np.zeros((0, self.dim), np.float32)
        if self.text_encoder is not None:
            pending: dict[str, list[str]] = {}
            for item_id in dict.fromkeys(item_ids):
                title = None if item_id in self._cache else self._title(item_id)
                if title is not None:
                    pending.setdefault(title, []).append(item_id)
            if pending:
                embeddings = self.text_encoder.encode(list(pending))
                for embedding, ids in zip(embeddings, pending.values()):
                    for item_id in ids:
                        self._build(item_id, embedding)
        return np.stack([self.encode(i) for i in item_ids])


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

    def encode_rows(self, rows: Sequence[Sequence], until: float | None = None,
                    before: float | None = None) -> np.ndarray:
        """:meth:`encode` of history rows ``[item_id, action, ts, ...]`` (a user's stream state),
        of those with ``ts <= until`` and ``ts < before`` where given."""
        return self.encode([HistoryEntry(r[0], r[1], r[2]) for r in rows
                            if (until is None or r[2] <= until) and (before is None or r[2] < before)])

    def encode(self, history: Sequence[HistoryEntry], until: float | None = None) -> np.ndarray:
        """State from ``history`` (any order); only entries with ``ts <= until`` when given."""
        entries = [h for h in history if until is None or h.ts <= until]
        entries.sort(key=lambda h: h.ts, reverse=True)
        state = np.zeros(self.dim, dtype=np.float32)
        for rank, h in enumerate(entries[: self.max_len]):
            state += (self.decay ** rank) * ACTION_STRENGTH.get(h.action, 1.0) * self.items.encode(h.item_id)
        norm = float(np.linalg.norm(state))
        return state / norm if norm > 0 else state


class RowStateEncoder(StateEncoder):
    """:class:`StateEncoder`'s states, bit for bit, with a few numpy calls instead of three per
    history entry, also from raw history rows ``[item_id, action, ts, ...]`` (a user's stream
    state; no :class:`HistoryEntry` objects): the stream worker's and the evaluation's encoder.

    ``StateEncoder.encode`` adds ``w_r * v_r`` to a float32 zero vector one entry at a time, newest
    first, ``w_r = decay**r * strength`` a Python float that numpy rounds to float32 before it
    multiplies the float32 item vector. Here the same float32 weights multiply the stacked item
    vectors in one operation (the same roundings), and ``np.add.reduce`` over the entries adds the
    rows to a float32 zero row after row (a reduction across the rows of a C-contiguous array
    runs element-wise in row order; it is not the pairwise summation numpy uses along a
    contiguous axis). The sort (stable, newest first), the cut at ``max_len``, the norm and the
    division are the original's.

    >>> items = ItemEncoder(8)
    >>> rows = [["1", "click", 1.0, "e1"], ["2", "cart", 2.0, "e2"], ["1", "purchase", 2.0, "e3"]]
    >>> entries = [HistoryEntry(*r) for r in rows]
    >>> fast, plain = RowStateEncoder(items), StateEncoder(items)
    >>> bool(np.array_equal(fast.encode_rows(rows), plain.encode(entries)))
    True
    >>> bool(np.array_equal(fast.encode_rows(rows, before=2.0), plain.encode(entries[:1])))
    True
    >>> bool(np.array_equal(fast.encode(entries, until=1.5), plain.encode(entries, until=1.5)))
    True
    """

    def __init__(self, items: ItemEncoder, decay: float = 0.85, max_len: int = 30):
        super().__init__(items, decay, max_len)
        self._weights: dict[str, np.ndarray] = {}  # action -> float32 weight by rank
        self._row_of: dict[str, int] = {}          # item -> its row of _vectors
        self._vectors = np.zeros((64, self.dim), np.float32)

    def _weights_of(self, action: str) -> np.ndarray:
        w = self._weights.get(action)
        if w is None:
            strength = ACTION_STRENGTH.get(action, 1.0)
            w = self._weights[action] = np.array([(self.decay ** rank) * strength for rank in range(self.max_len)],
                                                 np.float64).astype(np.float32)
        return w

    def _row(self, item_id: str) -> int:
        row = self._row_of.get(item_id)
        if row is None:
            row = len(self._row_of)
            if row == len(self._vectors):
                self._vectors = np.concatenate([self._vectors, np.zeros_like(self._vectors)])
            self._vectors[row] = self.items.encode(item_id)
            self._row_of[item_id] = row
        return row

    def encode_rows(self, rows: Sequence[Sequence], until: float | None = None,
                    before: float | None = None) -> np.ndarray:
        """The state from the history ``rows`` (any order) with ``ts <= until`` and ``ts < before``
        where given: ``StateEncoder.encode`` of the same entries."""
        entries = [h for h in rows if (until is None or h[2] <= until) and (before is None or h[2] < before)]
        entries.sort(key=_row_ts, reverse=True)
        del entries[self.max_len:]
        if not entries:
            return np.zeros(self.dim, dtype=np.float32)
        weights = np.array([self._weights_of(h[1])[rank] for rank, h in enumerate(entries)], np.float32)
        rows_of = [self._row(h[0]) for h in entries]  # before reading _vectors: a new item may grow it
        terms = self._vectors[rows_of]
        terms *= weights[:, None]
        state = np.add.reduce(terms, axis=0, initial=np.float32(0.0))
        norm = float(np.linalg.norm(state))
        return state / norm if norm > 0 else state

    def encode(self, history: Sequence[HistoryEntry], until: float | None = None) -> np.ndarray:
        return self.encode_rows([(h.item_id, h.action, h.ts) for h in history], until=until)


def _row_ts(row: Sequence) -> float:
    return row[2]


def case_feature_dim(dim: int) -> int:
    """Length of a case's feature vector: case state, item vector and outcome."""
    return 2 * dim + 1


def case_state(cases):
    """The case states of case features ``[..., 2D+1]`` (numpy or torch; a view): ``[..., D]``."""
    return cases[..., :(cases.shape[-1] - 1) // 2]


def case_item(cases):
    """The item vectors of case features ``[..., 2D+1]`` (numpy or torch; a view): ``[..., D]``."""
    d = (cases.shape[-1] - 1) // 2
    return cases[..., d:2 * d]


def case_outcome(cases):
    """The outcomes of case features ``[..., 2D+1]`` (numpy or torch; a view): ``[...]``.

    >>> f = case_feature_vector([1, 2], [3, 4], 5.0)
    >>> case_state(f).tolist(), case_item(f).tolist(), float(case_outcome(f))
    ([1.0, 2.0], [3.0, 4.0], 5.0)
    """
    return cases[..., -1]


def case_feature_vector(state: Sequence[float], item_vec: Sequence[float], outcome: float) -> np.ndarray:
    """The features the Q network sees for a case: [case state, item vector, outcome], the one
    layout every consumer reads with :func:`case_state`, :func:`case_item` and :func:`case_outcome`."""
    return np.concatenate([np.asarray(state, np.float32), np.asarray(item_vec, np.float32),
                           np.asarray([outcome], np.float32)])
