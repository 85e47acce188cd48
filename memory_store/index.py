"""Vector indexes of one shard: exact inner product (flat) and approximate (IVF, HNSW).

Every index maps 64-bit ids (the shard's slot numbers) to vectors and answers inner-product top-k.
:meth:`ShardIndex.search` returns ``-inf`` scores and ``-1`` ids where fewer than ``k`` vectors exist.
Approximate indexes are built from a full set of vectors (:meth:`ShardIndex.build`) and then
accept incremental adds and removals.

>>> import numpy as np
>>> index = FlatIndex(dim=2)
>>> index.add(np.array([7, 9]), np.array([[1, 0], [0, 1]], np.float32))
>>> scores, ids = index.search(np.array([[1, 0]], np.float32), k=3)
>>> ids.tolist(), float(scores[0, 2])
([[7, 9, -1]], -inf)
"""

from __future__ import annotations

import abc
import math

import faiss
import numpy as np

__all__ = ["ShardIndex", "FlatIndex", "IVFIndex", "HNSWIndex", "make_index", "tune_nprobe", "INDEX_TYPES",
           "NPROBE_LADDER"]

INDEX_TYPES = ("flat", "ivf", "hnsw")


class ShardIndex(abc.ABC):
    """Inner-product top-k over id-tagged vectors."""

    kind: str = ""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._add(np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(vectors, np.float32))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self._remove(np.ascontiguousarray(ids, np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        scores = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        self.search_into(queries, k, scores, ids)
        scores[ids < 0] = -np.inf
        return scores, ids

    def search_into(self, queries: np.ndarray, k: int, scores: np.ndarray, ids: np.ndarray) -> None:
        """Search into caller-owned C-contiguous arrays: ``queries`` float32 [B, dim], ``scores``
        float32 [B, k], ``ids`` int64 [B, k]. Past the last hit, ids are -1 and scores are the
        lowest float32 (not ``-inf``). The serving path's hot loop: no allocation, no checks."""
        self._faiss().search_c(len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(scores),
                               faiss.swig_ptr(ids), self._params(k))

    def _params(self, k: int):
        return None

    @property
    def ntotal(self) -> int:
        return self._ntotal()

    @abc.abstractmethod
    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _remove(self, ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _ntotal(self) -> int: ...

    def serialize(self) -> np.ndarray:
        return faiss.serialize_index(self._faiss())

    @abc.abstractmethod
    def _faiss(self) -> faiss.Index: ...


class _IdMappedIndex(ShardIndex):
    """Hooks shared by indexes that hold the case slots as faiss ids (``self.index``)."""

    def _add(self, ids, vectors):
        self.index.add_with_ids(vectors, ids)

    def _ntotal(self):
        return self.index.ntotal

    def _faiss(self):
        return self.index


class FlatIndex(_IdMappedIndex):
    """Exact inner-product search over every vector."""

    kind = "flat"

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        super().__init__(dim)
        self.index = index if index is not None else faiss.IndexIDMap(
            faiss.IndexFlat(dim, faiss.METRIC_INNER_PRODUCT))

    def _remove(self, ids):
        self.index.remove_ids(faiss.IDSelectorBatch(ids))


class IVFIndex(_IdMappedIndex):
    """Inverted-file index: vectors in ``nlist`` k-means cells, ``nprobe`` cells scanned per query.

    Parameters
    ----------
    nlist_per_sqrt
        ``nlist = nlist_per_sqrt * sqrt(n)`` cells for ``n`` vectors at build time.
    nprobe
        Cells scanned per query; None = the smallest number that reaches ``target_recall``,
        measured at build time by :func:`tune_nprobe` (and again as the shard grows, see
        :meth:`memory_store.shard.Shard`).
    train_per_list
        Training points per cell (a sample of the vectors), bounding build time.
    target_recall, tune_k, tune_queries
        What the nprobe tuning aims for: recall@``tune_k`` of ``tune_queries`` sampled vectors.
    encoding
        How the cells store vectors: ``"flat"`` (float32) or ``"fp16"`` (half precision: half the
        memory read per probe, which is what an IVF scan is bound by; recall is tuned the same).
    """

    kind = "ivf"

    def __init__(self, dim: int, *, nlist_per_sqrt: float = 2.0, nprobe: int | None = None,
                 train_per_list: int = 40, seed: int = 0, target_recall: float = 0.97,
                 tune_k: int = 64, tune_queries: int = 200, encoding: str = "flat",
                 index: faiss.Index | None = None) -> None:
        super().__init__(dim)
        if encoding not in IVF_ENCODINGS:
            raise ValueError(f"IVF encoding must be one of {IVF_ENCODINGS}, got {encoding!r}")
        self.encoding = encoding if index is None else _encoding_of(index)  # a loaded index keeps its own
        self.nlist_per_sqrt = nlist_per_sqrt
        self.fixed_nprobe = nprobe
        self.train_per_list = train_per_list
        self.seed = seed
        self.target_recall = target_recall
        self.tune_k = tune_k
        self.tune_queries = tune_queries
        self.tuned_recall: float | None = None
        self.tuned_size = 0 if index is None else index.ntotal
        self.index = index
        if index is not None and nprobe is not None:
            self.index.nprobe = min(nprobe, index.nlist)

    @property
    def nprobe(self) -> int:
        return self.index.nprobe

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> "IVFIndex":
        n = len(ids)
        ids = np.ascontiguousarray(ids, np.int64)
        vectors = np.ascontiguousarray(vectors, np.float32)
        nlist = int(min(max(16, self.nlist_per_sqrt * math.sqrt(max(n, 1))), max(16, n // 8)))
        quantizer = faiss.IndexFlat(self.dim, faiss.METRIC_INNER_PRODUCT)
        index = _empty_ivf(quantizer, self.dim, nlist, self.encoding)
        index.own_fields = True
        quantizer.this.disown()
        rng = np.random.default_rng(self.seed)
        sample = vectors if n <= nlist * self.train_per_list else \
            vectors[np.sort(rng.choice(n, nlist * self.train_per_list, replace=False))]
        index.cp.seed = self.seed
        index.cp.min_points_per_centroid = 1  # a sample is used on purpose; silence faiss' warning
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(vectors, ids)
        self.index = index
        if self.fixed_nprobe is not None:
            index.nprobe = min(self.fixed_nprobe, nlist)
        else:
            self.set_tuning(*self.tune(ids, vectors, lambda q, k, params: index.search(q, k, params=params)[1]),
                            size=n)
        return self

    def tune(self, ids: np.ndarray, vectors: np.ndarray, search, max_nprobe: int | None = None
             ) -> tuple[int, float]:
        """:func:`tune_nprobe` for this index, holding ``vectors`` under ``ids``, searched by ``search``."""
        return tune_nprobe(search, ids, vectors, self.index.nlist, k=self.tune_k,
                           target=self.target_recall, queries=self.tune_queries, seed=self.seed,
                           max_nprobe=max_nprobe)

    def retune(self, ids: np.ndarray, vectors: np.ndarray, max_nprobe: int | None = None
               ) -> tuple[int, float]:
        """The nprobe :func:`tune_nprobe` picks for this index's cells holding ``vectors`` (the
        index's current contents, which keep changing): they are tuned on a private copy of the
        cells filled with ``vectors``, so the live index is neither locked nor disturbed. Returns
        (nprobe, recall) without applying them (see :meth:`set_tuning`)."""
        nlist = self.index.nlist
        quantizer = faiss.IndexFlat(self.dim, faiss.METRIC_INNER_PRODUCT)
        quantizer.add(self.index.quantizer.reconstruct_n(0, nlist))  # trained once, never changes
        copy = _empty_ivf(quantizer, self.dim, nlist, self.encoding)
        if not copy.is_trained:  # the quantizer is; this trains only the (untrained) fp16 codec
            copy.train(np.ascontiguousarray(vectors[:256], np.float32))
        copy.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
        return self.tune(ids, vectors, lambda q, k, params: copy.search(q, k, params=params)[1],
                         max_nprobe=max_nprobe)

    def set_tuning(self, nprobe: int, recall: float, size: int) -> None:
        self.index.nprobe = nprobe
        self.tuned_recall = recall
        self.tuned_size = size

    def _remove(self, ids):
        self.index.remove_ids(faiss.IDSelectorArray(ids))


def _without_own(found: np.ndarray, own: np.ndarray, k: int) -> list[list[int]]:
    """Each row of result ids in rank order, without the query's own id and -1s, cut to ``k``."""
    return [[i for i in row if i != me and i >= 0][:k] for row, me in zip(found.tolist(), own.tolist())]


IVF_ENCODINGS = ("flat", "fp16")


def _empty_ivf(quantizer: faiss.Index, dim: int, nlist: int, encoding: str) -> faiss.IndexIVF:
    if encoding == "fp16":
        return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                             faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)


def _encoding_of(index: faiss.Index) -> str:
    return "fp16" if isinstance(index, faiss.IndexIVFScalarQuantizer) else "flat"


NPROBE_LADDER = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def tune_nprobe(search, ids: np.ndarray, vectors: np.ndarray, nlist: int, *, k: int, target: float,
                queries: int = 200, seed: int = 0, max_nprobe: int | None = None) -> tuple[int, float]:
    """The smallest nprobe (of :data:`NPROBE_LADDER`, or ``nlist``; at most ``max_nprobe``) whose
    recall@``k`` against exact search reaches ``target``, and that recall (if none does: the
    largest tried).

    ``search(queries, k, params)`` returns the ids [B, k] an IVF index finds with
    ``faiss.SearchParametersIVF`` ``params``; ``vectors`` are what it indexes, under ``ids``. The
    queries are ``queries`` of those vectors (stored case states are what serving searches with);
    each query's own id is left out of both result lists, so finding itself earns it nothing.
    Recall counts a found case as right when it scores at least the exact k-th best score: cases
    with equal states (common: users with the same recent items) are equally good answers, and
    counting ids would make ties look like misses.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2000, 8)).astype(np.float32)
    >>> ivf = IVFIndex(8, target_recall=0.9, tune_k=10).build(np.arange(2000), x)
    >>> 1 <= ivf.nprobe <= ivf.index.nlist and ivf.tuned_recall >= 0.9
    True
    """
    n = len(vectors)
    kk = min(k + 1, n)
    pick = np.sort(np.random.default_rng(seed + 1).choice(n, min(queries, n), replace=False))
    q = np.ascontiguousarray(vectors[pick])
    scores, exact = faiss.knn(q, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
    own = ids[pick]
    # The k-th best exact score of each query, its own case left out (a tolerance for rounding).
    not_own = ids[exact] != own[:, None]
    kth = np.array([row[keep][:k][-1] if keep.any() else np.inf
                    for row, keep in zip(scores, not_own)], np.float32) - 1e-5
    order = np.argsort(ids)
    params = faiss.SearchParametersIVF()
    recall = 0.0
    limit = nlist if max_nprobe is None else min(max_nprobe, nlist)
    for nprobe in [p for p in NPROBE_LADDER if p < limit] + [limit]:
        params.nprobe = nprobe
        found = _without_own(search(q, kk, params), own, k)
        hits = []
        for i, row in enumerate(found):
            if not np.isfinite(kth[i]):
                hits.append(1.0)
                continue
            rows = order[np.searchsorted(ids, row, sorter=order)] if row else np.zeros(0, np.int64)
            good = int(np.count_nonzero(vectors[rows] @ q[i] >= kth[i]))
            hits.append(min(good, k) / min(k, int(not_own[i].sum())))
        recall = float(np.mean(hits))
        if recall >= target:
            break
    return nprobe, recall


class HNSWIndex(ShardIndex):
    """Hierarchical navigable small-world graph. Removed ids stay in the graph as tombstones and
    are filtered out during search; the shard rebuilds the index when tombstones pile up.

    Parameters
    ----------
    m
        Graph degree.
    ef_construction, ef_search
        Candidate list sizes when building and when searching (``ef_search`` is raised to ``k``).
    """

    kind = "hnsw"

    def __init__(self, dim: int, *, m: int = 32, ef_construction: int = 80, ef_search: int = 96,
                 index: faiss.Index | None = None) -> None:
        super().__init__(dim)
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.index = index
        self.tombstones: set[int] = set()
        self._selector = None

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> "HNSWIndex":
        hnsw = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        index = faiss.IndexIDMap(hnsw)
        index.own_fields = True
        hnsw.this.disown()
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
        self.index = index
        return self

    def _add(self, ids, vectors):
        if self.tombstones.intersection(ids.tolist()):
            self.tombstones.difference_update(ids.tolist())
            self._selector = None
            raise ValueError("HNSW index cannot re-add a removed id; rebuild required")
        self.index.add_with_ids(vectors, ids)

    def _remove(self, ids):
        self.tombstones.update(ids.tolist())
        self._selector = None

    def _params(self, k):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        if self.tombstones:
            if self._selector is None:
                dead = np.fromiter(self.tombstones, np.int64, len(self.tombstones))
                batch = faiss.IDSelectorBatch(dead)
                self._selector = (faiss.IDSelectorNot(batch), batch)
            params.sel = self._selector[0]
        return params

    def _ntotal(self):
        return self.index.ntotal - len(self.tombstones)

    def _faiss(self):
        return self.index


def make_index(kind: str, dim: int, **params) -> ShardIndex:
    """An empty flat index, or an unbuilt approximate one configured by ``params``."""
    if kind == "flat":
        return FlatIndex(dim)
    if kind == "ivf":
        return IVFIndex(dim, **{k: v for k, v in params.items()
                                if k in ("nlist_per_sqrt", "nprobe", "train_per_list", "seed", "target_recall",
                                         "tune_k", "encoding")})
    if kind == "hnsw":
        return HNSWIndex(dim, **{k: v for k, v in params.items()
                                 if k in ("m", "ef_construction", "ef_search")})
    raise ValueError(f"unknown index type {kind!r}; expected one of {list(INDEX_TYPES)}")
