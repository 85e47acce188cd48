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

__all__ = ["ShardIndex", "FlatIndex", "IVFIndex", "HNSWIndex", "make_index", "INDEX_TYPES"]

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
        scores, ids = self._search(np.ascontiguousarray(queries, np.float32), k)
        scores[ids < 0] = -np.inf
        return scores, ids

    @property
    def ntotal(self) -> int:
        return self._ntotal()

    @abc.abstractmethod
    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _remove(self, ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

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

    def _search(self, queries, k):
        return self.index.search(queries, k)

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
        Cells scanned per query (recall versus latency).
    train_per_list
        Training points per cell (a sample of the vectors), bounding build time.
    """

    kind = "ivf"

    def __init__(self, dim: int, *, nlist_per_sqrt: float = 2.0, nprobe: int = 24,
                 train_per_list: int = 40, seed: int = 0, index: faiss.Index | None = None) -> None:
        super().__init__(dim)
        self.nlist_per_sqrt = nlist_per_sqrt
        self.nprobe = nprobe
        self.train_per_list = train_per_list
        self.seed = seed
        self.index = index
        if index is not None:
            self.index.nprobe = nprobe

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> "IVFIndex":
        n = len(ids)
        nlist = int(min(max(16, self.nlist_per_sqrt * math.sqrt(max(n, 1))), max(16, n // 8)))
        quantizer = faiss.IndexFlat(self.dim, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        rng = np.random.default_rng(self.seed)
        sample = vectors if n <= nlist * self.train_per_list else \
            vectors[np.sort(rng.choice(n, nlist * self.train_per_list, replace=False))]
        index.cp.seed = self.seed
        index.cp.min_points_per_centroid = 1  # a sample is used on purpose; silence faiss' warning
        index.train(np.ascontiguousarray(sample, np.float32))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
        index.nprobe = min(self.nprobe, nlist)
        self.index = index
        return self

    def _remove(self, ids):
        self.index.remove_ids(faiss.IDSelectorArray(ids))


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

    def _search(self, queries, k):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        if self.tombstones:
            if self._selector is None:
                dead = np.fromiter(self.tombstones, np.int64, len(self.tombstones))
                batch = faiss.IDSelectorBatch(dead)
                self._selector = (faiss.IDSelectorNot(batch), batch)
            params.sel = self._selector[0]
        return self.index.search(queries, k, params=params)

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
                                if k in ("nlist_per_sqrt", "nprobe", "train_per_list", "seed")})
    if kind == "hnsw":
        return HNSWIndex(dim, **{k: v for k, v in params.items()
                                 if k in ("m", "ef_construction", "ef_search")})
    raise ValueError(f"unknown index type {kind!r}; expected one of {list(INDEX_TYPES)}")
