"""Every tunable of the case bank, with its meaning, in one place.

>>> BankOptions(max_cases_per_shard=1000).eviction
'oldest'
>>> BankOptions.from_kwargs(bogus=1)
Traceback (most recent call last):
...
TypeError: CaseBank: unknown option 'bogus'; known options: approx_index, background_build, build_threads, eviction, fsync, hnsw_ef_construction, hnsw_ef_search, hnsw_m, ivf_encoding, max_cases_per_shard, name, nlist_per_sqrt, nprobe, omp_threads, rebuild_dead_fraction, rebuild_growth, seed, snapshot_interval_s, snapshot_on_close, snapshot_wal_bytes, switch_threshold, target_recall, train_per_list, tune_k, utility_hit_weight
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memory_store.index import IVF_ENCODINGS

__all__ = ["BankOptions"]


@dataclass(frozen=True)
class BankOptions:
    """Options of :class:`memory_store.CaseBank` (pass them as keyword arguments).

    Parameters
    ----------
    approx_index
        Index a shard switches to once it holds more than ``switch_threshold`` cases: ``"ivf"``,
        ``"hnsw"``, or ``"flat"`` to stay exact forever.
    switch_threshold
        Cases per shard above which the approximate index is built (in the background).
    rebuild_growth
        Rebuild an approximate index once its shard grew this many times past the size it was built
        at (IVF cells sized for a small shard get coarse as it grows, and need many more probed).
    rebuild_dead_fraction
        Rebuild an HNSW index once removed (tombstoned) cases exceed this fraction of live ones.
    nprobe, nlist_per_sqrt, train_per_list
        IVF: cells scanned per query (None = tuned at every build, see ``target_recall``); cells per
        square root of shard size; training points per cell.
    target_recall, tune_k
        IVF with ``nprobe=None``: each build, and each growth of the shard by sqrt(``rebuild_growth``)
        between builds, picks the smallest nprobe whose recall, measured on a sample of the shard's
        own cases against exact search, reaches ``target_recall``. Recall is taken at ``tune_k``
        (the k searches are expected to use) with one shard, and at ``2 * tune_k / num_shards``
        with more: a shard holds about ``1 / num_shards`` of a query's top k. The sample stands for
        queries like the stored states; queries from elsewhere (other clusters) can see lower
        recall, for which set a fixed ``nprobe``.
    ivf_encoding
        IVF cell storage for new builds: ``"flat"`` (float32) or ``"fp16"`` (half the memory read per
        probe; an IVF scan is bound by memory reads, so searches run up to twice as fast at equal
        recall). An index already on disk keeps its encoding until it is rebuilt.
    hnsw_m, hnsw_ef_construction, hnsw_ef_search
        HNSW: graph degree and candidate list sizes.
    max_cases_per_shard
        Capacity of each shard (None = unbounded); a full shard evicts by ``eviction``.
    eviction
        ``"oldest"`` (first in, first out) or ``"utility"`` (lowest outcome + hit_weight*log1p(hits)).
    utility_hit_weight
        Weight of retrieval hits in the utility eviction score.
    fsync
        fsync the write-ahead log before ``add`` returns (one fsync per shard per call). False keeps
        cases safe from a process kill but not from power loss.
    snapshot_wal_bytes
        Snapshot a shard (and empty its log) once its log exceeds this many bytes.
    snapshot_interval_s
        Snapshot shards with a non-empty log at least this often (None = only by size / on close).
    snapshot_on_close
        Snapshot shards with a non-empty log in :meth:`CaseBank.close`, so the next open is fast.
    omp_threads
        Threads faiss may use for a search of 16 or more queries (``faiss.omp_set_num_threads``, set
        in the searching thread); None = min(2, CPU count). Smaller searches, the serving path's one
        query at a time, always run on the calling thread alone: there OpenMP threads only add
        waiting, badly so when the cores are shared with other processes.
    background_build
        Build approximate indexes in a background thread (True) or inside ``add`` (False, for tests).
    build_threads
        faiss threads of one index build; builds of a bank's shards run one at a time, so adds and
        searches keep the other cores.
    name
        Label of this bank in Prometheus metrics (default: the directory name, or "memory").
    seed
        Seed of index training (k-means sampling).
    """

    approx_index: str = "ivf"
    switch_threshold: int = 20_000
    rebuild_growth: float = 2.0
    rebuild_dead_fraction: float = 0.2
    nprobe: int | None = None
    target_recall: float = 0.97
    tune_k: int = 64
    ivf_encoding: str = "flat"
    nlist_per_sqrt: float = 2.0
    train_per_list: int = 40
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 96
    max_cases_per_shard: int | None = None
    eviction: str = "oldest"
    utility_hit_weight: float = 0.5
    fsync: bool = True
    snapshot_wal_bytes: int = 256 << 20
    snapshot_interval_s: float | None = 300.0
    snapshot_on_close: bool = True
    omp_threads: int | None = 1
    background_build: bool = True
    build_threads: int = 1
    name: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.approx_index not in ("ivf", "hnsw", "flat"):
            raise ValueError(f"CaseBank: option approx_index must be 'ivf', 'hnsw' or 'flat', "
                             f"got {self.approx_index!r}")
        if self.ivf_encoding not in IVF_ENCODINGS:
            raise ValueError(f"CaseBank: option ivf_encoding must be 'flat' or 'fp16', got {self.ivf_encoding!r}")
        if self.eviction not in ("oldest", "utility"):
            raise ValueError(f"CaseBank: option eviction must be 'oldest' or 'utility', got {self.eviction!r}")
        if self.max_cases_per_shard is not None and self.max_cases_per_shard < 1:
            raise ValueError(f"CaseBank: option max_cases_per_shard must be >= 1 or None, "
                             f"got {self.max_cases_per_shard}")
        for name in ("switch_threshold", "train_per_list", "hnsw_m", "hnsw_ef_construction",
                     "hnsw_ef_search", "snapshot_wal_bytes", "tune_k", "build_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"CaseBank: option {name} must be >= 1, got {getattr(self, name)}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"CaseBank: option nprobe must be >= 1 or None, got {self.nprobe}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"CaseBank: option target_recall must be in (0, 1], got {self.target_recall}")
        if self.rebuild_growth <= 1.0:
            raise ValueError(f"CaseBank: option rebuild_growth must be > 1, got {self.rebuild_growth}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "BankOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in known:
                raise TypeError(f"CaseBank: unknown option {key!r}; known options: "
                                f"{', '.join(sorted(known))}")
        return cls(**kwargs)
