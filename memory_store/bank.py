"""The case bank M: cases sharded by a stable hash of their id, searched by fan-out and exact merge.

Routing: a case goes to shard ``blake2b(case_id) mod num_shards``. The hash never changes between
processes or versions, so a bank directory must always be opened with the same ``num_shards``
(recorded in ``bank.json`` and checked on open). Search asks every shard for its top ``k`` and
keeps the best ``k`` of the union, which is exactly the top ``k`` one index over all cases would
return (each shard's top ``k`` contains every one of its cases in the global top ``k``).

Writes: :meth:`CaseBank.add` takes ``Case`` objects; :meth:`CaseBank.add_arrays` takes the same
batch as columns, skipping the per-case Python work (the path for bulk writers). Either way a call
costs one log record and one fsync per shard it touches, the shards writing in parallel. Reads:
one query searches on the calling thread alone; batches use ``omp_threads`` faiss threads.

>>> import numpy as np
>>> from memento.schemas import Case
>>> bank = CaseBank(None, dim=2, num_shards=2)
>>> bank.add([Case("c1", [1.0, 0.0], "i1", [0.0, 1.0], 1.0, 0.0),
...           Case("c2", [0.0, 1.0], "i2", [1.0, 0.0], 0.0, 0.0)])
2
>>> scores, ids = bank.search(np.array([[1.0, 0.0]], np.float32), k=3)
>>> ids, scores.tolist()
([['c1', 'c2']], [[1.0, 0.0, -inf]])
>>> bank.close()
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import heapq
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from memento.atomic import write_atomic
from memento.encoder import case_feature_dim, case_state
from memento.schemas import ORGANIC_CASE_SOURCE, Case
from memory_store import metrics
from memory_store.options import BankOptions
from memory_store.records import CaseBatch, batch_from_arrays, batch_from_cases
from memory_store.shard import Shard

__all__ = ["CaseBank", "shard_of", "shards_of"]

logger = logging.getLogger("memory_store.bank")

MANIFEST = "bank.json"
SMALL_BATCH = 16  # searches of fewer queries use one faiss thread whatever ``omp_threads`` says
NEWEST_KEPT = 4096  # case ids remembered in add order, for queries with no direction (newest)
FORMAT_VERSION = 1


def shard_of(case_id: str, num_shards: int) -> int:
    """The shard a case id is routed to (stable across processes and runs)."""
    digest = hashlib.blake2b(case_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def shards_of(case_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """:func:`shard_of` of every id in ``case_ids``, as an int64 array.

    >>> shards_of(["a", "b", "case-42"], 4).tolist() == [shard_of(c, 4) for c in ["a", "b", "case-42"]]
    True
    """
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(c.encode(), digest_size=8).digest() for c in case_ids])
    return (np.frombuffer(digests, "<u8") % np.uint64(num_shards)).astype(np.int64)


class CaseBank:
    """Sharded, durable case bank with exact-merge fan-out search.

    Parameters
    ----------
    path
        Directory of the bank (created if missing); None keeps everything in memory.
    dim
        Length of a case state (the search key) and of its item vector.
    num_shards
        Number of shards; fixed for the life of a bank directory.
    **options
        See :class:`memory_store.options.BankOptions`.
    """

    def __init__(self, path: str | os.PathLike | None, dim: int, *, num_shards: int = 4,
                 **options) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"CaseBank: dim must be a positive integer, got {dim!r}")
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"CaseBank: num_shards must be a positive integer, got {num_shards!r}")
        self.options = BankOptions.from_kwargs(**options)
        self.dim = dim
        self.num_shards = num_shards
        self.path = Path(path) if path is not None else None
        self.name = self.options.name or (self.path.name if self.path is not None else "memory")
        self._omp_threads = self.options.omp_threads or min(2, os.cpu_count() or 1)
        self._use_omp_threads()
        self._lock_fd = -1
        self._closed = False
        if self.path is not None:
            self._open_directory()
        build_gate = threading.Semaphore(1)
        self.shards = [Shard(i, dim, self.path / f"shard-{i:03d}" if self.path is not None else None,
                             self.options, build_gate, fan_out=num_shards) for i in range(num_shards)]
        self._pool = ThreadPoolExecutor(max_workers=num_shards, thread_name_prefix="casebank-add") \
            if num_shards > 1 else None
        self._adds_window: collections.deque = collections.deque()
        self._adds_lock = threading.Lock()
        stored = self._stored_newest()
        self._newest: collections.deque = collections.deque((c for c, _, _ in stored), maxlen=NEWEST_KEPT)
        self._organic: collections.deque = collections.deque()   # (case id, item id), oldest first
        self._organic_counts: collections.Counter = collections.Counter()
        self._organic_seq = 0                                     # organic cases remembered so far
        self._organic_last: dict[str, tuple[int, str]] = {}       # item -> (seq, case id) of its newest
        self._popular_cache: tuple[int, list[tuple[str, str]]] | None = None
        self._remember_organic([(c, item) for c, item, source in stored if source == ORGANIC_CASE_SOURCE])
        self._stop = threading.Event()
        self._snapshotter = None
        if self.path is not None and self.options.snapshot_interval_s:
            self._snapshotter = threading.Thread(target=self._snapshot_loop, daemon=True,
                                                 name="casebank-snapshot")
            self._snapshotter.start()
        self._pending_hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._hits_lock = threading.Lock()
        self._search_seconds = metrics.SEARCH_SECONDS.labels(self.name)
        self._adds_counter = metrics.ADDS.labels(self.name)
        self._searches = metrics.SEARCHES.labels(self.name)
        metrics.register_bank(self)

    @staticmethod
    def stored_num_shards(path: str | os.PathLike) -> int | None:
        """The ``num_shards`` a bank directory was created with (None if there is no bank there).

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> CaseBank.stored_num_shards(d) is None
        True
        >>> CaseBank(d, dim=2, num_shards=3).close(); CaseBank.stored_num_shards(d)
        3
        """
        manifest = Path(path) / MANIFEST
        return int(json.loads(manifest.read_text())["num_shards"]) if manifest.exists() else None

    def _open_directory(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"CaseBank: {self.path} is open in another process") from None
        manifest = self.path / MANIFEST
        wanted = {"format": FORMAT_VERSION, "dim": self.dim, "num_shards": self.num_shards,
                  "routing": "blake2b64(case_id) mod num_shards"}
        if manifest.exists():
            found = json.loads(manifest.read_text())
            for key in ("dim", "num_shards"):
                if found.get(key) != wanted[key]:
                    os.close(self._lock_fd)
                    raise ValueError(f"CaseBank: {self.path} was created with {key}={found.get(key)}, "
                                     f"opened with {key}={wanted[key]}")
        else:
            write_atomic(manifest, json.dumps(wanted, indent=2).encode())

    # ------------------------------------------------------------------ writes
    def add(self, cases: Sequence[Case]) -> int:
        """Add ``cases``; returns how many were new (a known case id is a no-op). With a path,
        every added case is in the fsynced write-ahead log when this returns."""
        self._check_open()
        cases = list(cases)
        if not cases:
            return 0
        return self._add_batch(batch_from_cases(cases, self.dim))

    def add_arrays(self, case_ids: Sequence[str], states: np.ndarray, item_ids: Sequence[str] | str,
                   item_vecs: np.ndarray, outcomes, ts, sources: Sequence[str] | str = "recommendation"
                   ) -> int:
        """Add a batch of cases given in columns, the fast path for bulk writers: no per-case
        objects are built and validation is vectorised. Same semantics as :meth:`add`.

        Parameters
        ----------
        case_ids
            n distinct ids (a repeated or known id is skipped).
        states, item_vecs
            [n, dim] arrays.
        item_ids, sources
            n strings, or one string for every case.
        outcomes, ts
            n numbers, or one number for every case.

        >>> bank = CaseBank(None, dim=2)
        >>> bank.add_arrays(["a", "b"], np.eye(2), ["i1", "i2"], np.eye(2), [1.0, 0.0], 0.0)
        2
        >>> bank.get("b").item_id
        'i2'
        """
        self._check_open()
        return self._add_batch(batch_from_arrays(case_ids, states, item_ids, item_vecs, outcomes, ts,
                                                 sources, dim=self.dim))

    def _add_batch(self, batch: CaseBatch) -> int:
        if not len(batch):
            return 0
        if self.options.eviction == "utility":
            self._apply_hits()
        # the organic cases this batch adds (a re-sent one is already here and counts once)
        organic = [(c, item) for c, item, source in zip(batch.case_ids, batch.item_ids, batch.sources)
                   if source == ORGANIC_CASE_SOURCE and c not in self]
        if self.num_shards == 1:
            groups = [(0, batch)]
        else:
            shard_no = shards_of(batch.case_ids, self.num_shards)
            order = np.argsort(shard_no, kind="stable")
            bounds = np.cumsum(np.bincount(shard_no, minlength=self.num_shards)).tolist()
            groups = [(s, batch.take(order[start:end])) for s, (start, end)
                      in enumerate(zip([0] + bounds[:-1], bounds)) if end > start]
        if len(groups) == 1 or self._pool is None or self.path is None:
            added = sum(self.shards[s].add(g) for s, g in groups)
        else:
            # Shards write their own logs: their fsyncs overlap.
            futures = [self._pool.submit(self.shards[s].add, g) for s, g in groups[1:]]
            added = self.shards[groups[0][0]].add(groups[0][1]) + sum(f.result() for f in futures)
        if added:
            self._adds_counter.inc(added)
            with self._adds_lock:
                self._adds_window.append((time.monotonic(), added))
                self._newest.extend(batch.case_ids[-NEWEST_KEPT:])
                self._remember_organic(organic)
                self._popular_cache = None   # new counts, or an evicted case
        return added

    def _remember_organic(self, cases: list[tuple[str, str]]) -> None:
        """Count the items of the newest :data:`NEWEST_KEPT` organic cases (caller holds
        ``_adds_lock`` or owns the bank)."""
        organic, counts, last = self._organic, self._organic_counts, self._organic_last
        for case in cases[-NEWEST_KEPT:]:
            if len(organic) == NEWEST_KEPT:
                _, gone = organic.popleft()
                counts[gone] -= 1
                if not counts[gone]:   # its newest case left the window too
                    del counts[gone], last[gone]
            organic.append(case)
            counts[case[1]] += 1
            self._organic_seq += 1
            last[case[1]] = (self._organic_seq, case[0])

    def _stored_newest(self) -> list[tuple[str, str, str]]:
        """(case id, item id, source) of the newest stored cases (event time, then insertion),
        oldest first: what :meth:`newest` and :meth:`popular` know after a restart."""
        found = [entry for shard in self.shards for entry in shard.newest(NEWEST_KEPT)]
        found.sort()
        return [(case_id, item, source) for _, _, case_id, item, source in found[-NEWEST_KEPT:]]

    def newest(self, n: int) -> list[str]:
        """Ids of the ``n`` most recently added cases still in the bank, newest first (at most
        :data:`NEWEST_KEPT`).

        >>> bank = CaseBank(None, dim=2)
        >>> _ = bank.add_arrays(["a", "b", "c"], np.eye(2)[[0, 1, 0]], "i", np.eye(2)[[0, 1, 0]], 1.0, 0.0)
        >>> bank.newest(2)
        ['c', 'b']
        """
        self._check_open()
        with self._adds_lock:
            recent = list(self._newest)
        out: list[str] = []
        seen: set[str] = set()
        for case_id in reversed(recent):
            if case_id not in seen and case_id in self:
                seen.add(case_id)
                out.append(case_id)
                if len(out) == n:
                    break
        return out

    def popular(self, n: int) -> list[tuple[str, str]]:
        """(item id, case id) of the ``n`` items users acted on most often among the bank's
        newest :data:`NEWEST_KEPT` organic cases (source ``"action"``), most often first (ties:
        the more recent first), each with its newest organic case still in the bank.

        A recommendation's case records what a policy chose, so only the users' own actions
        count: counting the policy's choices would feed them back as popularity.

        >>> bank = CaseBank(None, dim=2)
        >>> _ = bank.add_arrays(["a", "b", "c", "r"], np.eye(2)[[0, 1, 0, 1]], ["i", "j", "i", "j"],
        ...                     np.eye(2)[[0, 1, 0, 1]], 1.0, 0.0, ["action"] * 3 + ["recommendation"])
        >>> bank.popular(5)
        [('i', 'c'), ('j', 'b')]
        """
        self._check_open()
        with self._adds_lock:
            cached = self._popular_cache
            if cached is None or cached[0] < n:
                size = max(n, 64)   # one count serves the requests of a batch whatever their n
                counts, last = self._organic_counts, self._organic_last
                top = heapq.nsmallest(size, counts, key=lambda item: (-counts[item], -last[item][0]))
                answer = [(item, last[item][1]) for item in top]
                if not all(case_id in self for _, case_id in answer):
                    answer = self._popular_scan(size)   # a newest case was evicted: look further back
                cached = self._popular_cache = (size, answer)
            return cached[1][:n]

    def _popular_scan(self, size: int) -> list[tuple[str, str]]:
        """:meth:`popular` when an item's newest organic case has left the bank: each item's
        newest case still in it, ranked by that case's recency among equal counts (caller holds
        ``_adds_lock``)."""
        newest_case: dict[str, str] = {}
        rank: dict[str, int] = {}
        for position, (case_id, item) in enumerate(reversed(self._organic)):
            if item not in newest_case and case_id in self:
                newest_case[item] = case_id
                rank[item] = position
        top = sorted(newest_case, key=lambda item: (-self._organic_counts[item], rank[item]))
        return [(item, newest_case[item]) for item in top[:size]]

    # ------------------------------------------------------------------ reads
    def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        if type(queries) is np.ndarray and queries.dtype == np.float32 and queries.ndim == 2 and \
                queries.shape[1] == self.dim and queries.flags.c_contiguous and type(k) is int and k >= 1:
            return queries
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"CaseBank.search: k must be a positive integer, got {k!r}")
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"CaseBank.search: queries must have shape [B, {self.dim}], got "
                             f"{list(q.shape)}")
        if not np.issubdtype(q.dtype, np.floating):
            raise ValueError(f"CaseBank.search: queries must be floating point, got {q.dtype}")
        return np.ascontiguousarray(q, np.float32)

    def _use_omp_threads(self, batch: int | None = None) -> None:
        # OpenMP's thread count is per calling thread: set it in every thread that searches, on
        # every search (other code in the thread may have changed it). A small batch searches on
        # the calling thread alone: faiss would split even one query's scan over the threads, and
        # on shared cores the waits for a descheduled thread cost several times the scan.
        faiss.omp_set_num_threads(1 if batch is not None and batch < SMALL_BATCH else self._omp_threads)

    def _search(self, q: np.ndarray, k: int, with_features: bool):
        """Top ``k`` of each row of ``q`` (checked by :meth:`_search_or_popular`: float32 [B, dim])."""
        started = time.perf_counter()
        num_shards, batch = self.num_shards, len(q)
        self._use_omp_threads(batch)
        # Shard s writes its top k into block s; the merge reads all blocks at once.
        scores = np.empty((num_shards, batch, k), np.float32)
        slots = np.empty((num_shards, batch, k), np.int64)
        parts = [shard.search_into(q, k, scores[s], slots[s], with_features)
                 for s, shard in enumerate(self.shards)]
        if num_shards == 1:
            scores, slots = scores[0], slots[0]
            ids, seqs, features = parts[0]
            shard_no = 0
        else:
            width = num_shards * k
            merged = scores.transpose(1, 0, 2).reshape(batch, width)
            order = np.argsort(-merged, axis=1, kind="stable")[:, :k]
            rows = np.arange(batch)[:, None]
            scores = merged[rows, order]
            slots = slots.transpose(1, 0, 2).reshape(batch, width)[rows, order]
            ids = np.concatenate([p[0] for p in parts], axis=1)[rows, order]
            seqs = np.concatenate([p[1] for p in parts], axis=1)[rows, order]
            features = np.concatenate([p[2] for p in parts], axis=1)[rows, order] \
                if with_features else None
            shard_no = order // k
        # Hits come first in every row (a missing one scores the lowest float32); mark the rest.
        if (slots[:, -1] >= 0).all():
            id_lists = ids.tolist()
        else:
            real = slots >= 0
            scores[~real] = -np.inf
            id_lists = [row[:n] for row, n in zip(ids.tolist(), real.sum(axis=1).tolist())]
        self._search_seconds.observe(time.perf_counter() - started)
        self._searches.inc(batch)
        self._pending_hits.append((shard_no, slots, seqs))
        if len(self._pending_hits) >= 256:
            self._apply_hits()
        return id_lists, scores, features

    def _apply_hits(self) -> None:
        with self._hits_lock:
            pending, self._pending_hits = self._pending_hits, []
        if not pending:
            return
        slots = np.concatenate([p[1].ravel() for p in pending])
        seqs = np.concatenate([p[2].ravel() for p in pending])
        valid = slots >= 0
        if self.num_shards == 1:
            self.shards[0].count_hits(slots[valid], seqs[valid])
            return
        shards = np.concatenate([p[0].ravel() for p in pending])
        for s, shard in enumerate(self.shards):
            mask = valid & (shards == s)
            if mask.any():
                shard.count_hits(slots[mask], seqs[mask])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top ``k`` cases by inner product of ``queries`` [B, dim] with case states.

        Returns scores float32 [B, k] (``-inf`` past the last real hit) and, per query, the ids of
        the real hits, best first."""
        id_lists, scores, _ = self._search_or_popular(queries, k, False)
        return scores, id_lists

    def search_with_features(self, queries: np.ndarray, k: int
                             ) -> tuple[list[list[str]], np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`search`, plus each hit's features (state, item vector, outcome), zero-padded,
        and a mask that is True where a real case is. Returns (ids, scores, features, mask)."""
        id_lists, scores, features = self._search_or_popular(queries, k, True)
        mask = np.isfinite(scores)
        return id_lists, scores, features, mask

    def _search_or_popular(self, queries: np.ndarray, k: int, with_features: bool):
        """:meth:`_search`, except that a query of zeros (a user with no history: the state says
        nothing) gets :meth:`blank_answer`, scored 0, rather than whichever cases the index lists
        first."""
        self._check_open()
        q = self._check_queries(queries, k)
        blank = ~q.any(axis=1)
        if not blank.any():
            return self._search(q, k, with_features)
        id_lists: list[list[str]] = [[] for _ in range(len(q))]
        scores = np.full((len(q), k), -np.inf, np.float32)
        features = np.zeros((len(q), k, case_feature_dim(self.dim)), np.float32) if with_features else None
        rows = np.flatnonzero(~blank)
        if len(rows):
            found_ids, found_scores, found_features = self._search(np.ascontiguousarray(q[rows]), k, with_features)
            scores[rows] = found_scores
            if with_features:
                features[rows] = found_features
            for r, ids in zip(rows.tolist(), found_ids):
                id_lists[r] = ids
        answer = self.blank_answer(k)
        answer_features = self.features(answer) if with_features and answer else None
        for r in np.flatnonzero(blank).tolist():
            id_lists[r] = list(answer)
            scores[r, :len(answer)] = 0.0
            if answer_features is not None:
                features[r, :len(answer)] = answer_features
        return id_lists, scores, features

    def popular_items(self, n: int) -> list[str]:
        """The items of :meth:`popular`."""
        return [item for item, _ in self.popular(n)]

    def blank_answer(self, k: int) -> list[str]:
        """The ``k`` cases that answer a query of zeros: the :meth:`popular` items' cases, most
        often acted on first, then the :meth:`newest` cases (a bank without organic cases).

        Every case is equally near such a query, so its k nearest are arbitrary; the
        nearest-neighbour estimate over all of them, equally weighted, is how often each item
        was acted on, which is what the popular cases stand for."""
        answer = [case_id for _, case_id in self.popular(k)]
        if len(answer) < k:
            taken = set(answer)
            answer += [c for c in self.newest(k) if c not in taken][:k - len(answer)]
        return answer

    def append_cases(self, queries: np.ndarray, id_lists: list[list[str]], scores: np.ndarray,
                     features: np.ndarray, mask: np.ndarray, extra: Sequence[Sequence[str]]
                     ) -> tuple[list[list[str]], np.ndarray, np.ndarray, np.ndarray]:
        """A search's results (:meth:`search_with_features`) with, after each row's hits, the cases
        of ``extra[b]`` that the bank holds and the row lacks, in order, scored as a search scores
        (inner product with the query). Rows widen to the longest; padding as in a search.

        >>> bank = CaseBank(None, dim=2)
        >>> states = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
        >>> _ = bank.add([Case(f"c{i}", s, "x", [1.0, 0.0], 1.0, 0.0) for i, s in enumerate(states)])
        >>> q = np.array([[1.0, 0.0]], np.float32)
        >>> ids, scores, feats, mask = bank.append_cases(q, *bank.search_with_features(q, 1), [["c1", "c0", "nope"]])
        >>> ids, scores.tolist(), mask.tolist(), feats.shape
        ([['c0', 'c1']], [[1.0, 0.0]], [[True, True]], (1, 2, 5))
        """
        self._check_open()
        added = []
        for row, wanted in zip(id_lists, extra):
            have = set(row)
            new = [c for c in dict.fromkeys(wanted) if c not in have and c in self]
            added.append(new)
        width = max([len(r) + len(a) for r, a in zip(id_lists, added)] + [scores.shape[1]])
        if all(not a for a in added):
            return id_lists, scores, features, mask
        batch = len(id_lists)
        out_scores = np.full((batch, width), -np.inf, np.float32)
        out_features = np.zeros((batch, width, features.shape[2]), np.float32)
        out_ids = []
        for b, (row, new) in enumerate(zip(id_lists, added)):
            n = len(row)
            out_scores[b, :n], out_features[b, :n] = scores[b, :n], features[b, :n]
            if new:
                f = self.features(new)
                out_features[b, n:n + len(new)] = f
                out_scores[b, n:n + len(new)] = case_state(f) @ np.asarray(queries[b], np.float32)
            out_ids.append(list(row) + new)
        return out_ids, out_scores, out_features, np.isfinite(out_scores)

    def get(self, case_id: str) -> Case | None:
        self._check_open()
        return self.shards[shard_of(case_id, self.num_shards)].get(case_id)

    def item_of(self, case_id: str) -> str | None:
        """The item of ``case_id`` (None if unknown): :meth:`get`'s ``item_id`` without building
        the case, for the request path."""
        self._check_open()
        return self.shards[shard_of(case_id, self.num_shards)].item_of(case_id)

    def features(self, case_ids: Sequence[str]) -> np.ndarray:
        """Features [n, 2*dim+1] of ``case_ids``; KeyError naming the first unknown id."""
        self._check_open()
        case_ids = list(case_ids)
        out = np.zeros((len(case_ids), case_feature_dim(self.dim)), np.float32)
        rows: dict[int, list[int]] = collections.defaultdict(list)
        for row, case_id in enumerate(case_ids):
            rows[shard_of(case_id, self.num_shards)].append(row)
        for s, r in rows.items():
            out[r] = self.shards[s].features_of([case_ids[i] for i in r])
        return out

    def hit_count(self, case_id: str) -> int:
        """How often ``case_id`` was among returned search hits (0 if unknown)."""
        self._apply_hits()
        return self.shards[shard_of(case_id, self.num_shards)].hit_count(case_id)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __contains__(self, case_id: object) -> bool:
        return isinstance(case_id, str) and case_id in self.shards[shard_of(case_id, self.num_shards)]

    # ------------------------------------------------------------------ maintenance
    def adds_per_s(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        with self._adds_lock:
            while self._adds_window and self._adds_window[0][0] < now - window_s:
                self._adds_window.popleft()
            return sum(n for _, n in self._adds_window) / window_s

    def stats(self) -> dict:
        self._check_open()
        shards = [dict(shard=i, **s.stats()) for i, s in enumerate(self.shards)]
        return {"name": self.name, "dim": self.dim, "num_shards": self.num_shards,
                "cases": sum(s["cases"] for s in shards), "adds_per_s": self.adds_per_s(),
                "durable": self.path is not None, "shards": shards}

    def wait_for_index(self, timeout: float | None = None) -> bool:
        """Wait until no shard is building an index (building any that is due); True if idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(s.wait_for_build(None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for s in self.shards)

    def flush(self) -> None:
        """Make every write durable (already the case after ``add`` with ``fsync=True``)."""
        self._check_open()
        for s in self.shards:
            s.flush()

    def snapshot(self) -> None:
        """Snapshot every shard and empty its write-ahead log (no-op in memory)."""
        self._check_open()
        self._apply_hits()
        for s in self.shards:
            s.snapshot()

    def _snapshot_loop(self) -> None:
        interval = float(self.options.snapshot_interval_s)
        while not self._stop.wait(min(interval, 5.0)):
            for s in self.shards:
                st = s.stats()
                age = st["snapshot_age_s"]
                if st["wal_bytes"] > 0 and (age is None or age >= interval):
                    try:
                        s.snapshot()
                    except RuntimeError:  # closed meanwhile
                        return
                    except Exception:  # disk full, I/O error: the log keeps every record; retried later
                        logger.exception("case bank %s: snapshot of shard %d failed", self.name, s.shard_id)
                        metrics.SNAPSHOT_FAILURES.labels(self.name).inc()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("CaseBank is closed")

    def close(self) -> None:
        """Stop background work, snapshot (if ``snapshot_on_close``) and release the directory."""
        if self._closed:
            return
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join(timeout=60)
        self._apply_hits()
        for s in self.shards:
            s.close(snapshot=self.options.snapshot_on_close)
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "CaseBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CaseBank(path={str(self.path) if self.path else None!r}, dim={self.dim}, " \
               f"num_shards={self.num_shards}, cases={len(self)})"
