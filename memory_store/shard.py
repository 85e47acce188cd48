"""One shard of the case bank: case metadata in columns, a vector index over the case states,
a write-ahead log and snapshots.

Cases live in *slots*: row ``s`` of the column arrays holds one case and the index knows the case's
state under id ``s``. Two locks: ``_write_lock`` serialises writers (dedup, log append + fsync,
eviction, snapshot); ``_lock`` guards the in-memory columns and the index for the short moment a
write is applied, so searches only wait for in-memory work, never for disk.

An approximate index is built online: the builder copies the live vectors under ``_lock``, builds
outside any lock while searches keep using the current index, replays the adds and removals that
happened meanwhile, and swaps the index in under ``_lock``. While a build runs, freed slots are
retired instead of reused, so the builder's copy stays valid.

>>> import numpy as np
>>> from memory_store.options import BankOptions
>>> from memory_store.records import CaseBatch
>>> shard = Shard(0, dim=2, directory=None, options=BankOptions())
>>> batch = CaseBatch(["a"], ["i"], ["s"], np.zeros(1), np.ones(1), np.array([[1, 0]], np.float32),
...                   np.zeros((1, 2), np.float32))
>>> shard.add(batch), shard.add(batch), len(shard)
(1, 0, 1)
>>> scores, slots, ids, _ = shard.search(np.array([[1, 0]], np.float32), 2)
>>> ids[0].tolist(), scores[0].tolist()
(['a', None], [1.0, -inf])
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from memento.atomic import atomic_file
from memento.encoder import case_item, case_outcome, case_state
from memento.schemas import Case
from memory_store.eviction import make_eviction_policy
from memory_store.index import FlatIndex, HNSWIndex, IVFIndex, ShardIndex, make_index
from memory_store.options import BankOptions
from memory_store.records import (RECORD_ADD, RECORD_EVICT, CaseBatch, decode_add, decode_evict,
                                  encode_add, encode_evict)
from memory_store.wal import WriteAheadLog

__all__ = ["Shard"]

logger = logging.getLogger("memory_store.shard")

SNAPSHOT_FILE = "snapshot.npz"
WAL_FILE = "wal.log"


def _objects(values: list) -> np.ndarray:
    # An object array holding the very objects of ``values`` (np.asarray would make a str array).
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class Shard:
    """Cases routed to one shard, searchable and (with a ``directory``) durable.

    Parameters
    ----------
    shard_id
        Position of the shard in its bank.
    dim
        Length of a case state (the search key) and of its item vector.
    directory
        Where the shard keeps ``wal.log`` and ``snapshot.npz``; None = in memory only.
    options
        The bank's :class:`~memory_store.options.BankOptions`.
    build_gate
        Held while this shard builds an index (a bank passes one semaphore to all its shards, so
        their builds take turns); None = no limit.
    fan_out
        How many shards a search asks (the bank's shard count). A shard holds about ``k /
        fan_out`` of a query's top ``k``, so IVF nprobe tuning checks its recall at twice that
        (``tune_k`` at most) rather than at the whole ``k``.
    """

    def __init__(self, shard_id: int, dim: int, directory: str | os.PathLike | None,
                 options: BankOptions, build_gate: threading.Semaphore | None = None,
                 fan_out: int = 1) -> None:
        self.shard_id = shard_id
        self.dim = dim
        self.feature_dim = 2 * dim + 1
        self.options = options
        self.directory = Path(directory) if directory is not None else None
        self._eviction = make_eviction_policy(options.eviction, options.utility_hit_weight)
        self._build_gate = build_gate
        self._tune_k = min(options.tune_k, max(1, math.ceil(2 * options.tune_k / fan_out)))
        self._write_lock = threading.RLock()
        self._lock = threading.Lock()
        self._reset_state()
        self.builds = 0
        self.build_seconds = 0.0
        self.last_build_s: float | None = None
        self._pending: list[tuple[str, np.ndarray]] | None = None
        self._builder: threading.Thread | None = None
        self._snapshotter: threading.Thread | None = None
        self._snapshot_lock = threading.Lock()
        self._build_error: BaseException | None = None
        self._closed = False
        self.wal: WriteAheadLog | None = None
        self.snapshot_error: str | None = None  # why the snapshot found at open was set aside
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                self._load_snapshot()
            except Exception as exc:  # a corrupt or unreadable snapshot must not make the bank unopenable
                self._set_snapshot_aside(exc)
            self.wal = WriteAheadLog(self.directory / WAL_FILE, fsync=options.fsync)
            self._replay()
        self._maybe_build()

    # ------------------------------------------------------------------ columns
    def _reset_state(self) -> None:
        """The state of an empty shard (what a snapshot, when there is one, replaces)."""
        self._reset_columns(64)
        self.index: ShardIndex = FlatIndex(self.dim)
        self.built_size = 0
        self.lsn = 0
        self.next_seq = 0
        self.evictions = 0
        self.snapshot_time: float | None = None

    def _reset_columns(self, capacity: int) -> None:
        self.features = np.zeros((capacity, self.feature_dim), np.float32)
        self.ts = np.zeros(capacity, np.float64)
        self.added_at = np.zeros(capacity, np.float64)
        self.seq = np.zeros(capacity, np.int64)
        self.hits = np.zeros(capacity, np.int64)
        self.ids = np.full(capacity, None, dtype=object)  # case id per slot, None = free
        self.item_ids = np.full(capacity, None, dtype=object)
        self.sources = np.full(capacity, None, dtype=object)
        self.slot_of: dict[str, int] = {}
        self.high_water = 0
        self.free: list[int] = []
        self.retired: list[int] = []

    def _grow(self, needed: int) -> None:
        capacity = len(self.ts)
        if needed <= capacity:
            return
        new_capacity = max(needed, capacity * 2)
        for name in ("features", "ts", "added_at", "seq", "hits", "ids", "item_ids", "sources"):
            old = getattr(self, name)
            new = np.zeros((new_capacity,) + old.shape[1:], old.dtype) if old.dtype != object else \
                np.full(new_capacity, None, dtype=object)
            new[:capacity] = old
            setattr(self, name, new)

    def _allocate(self, count: int) -> np.ndarray:
        reused = min(count, len(self.free))
        slots = np.empty(count, np.int64)
        if reused:
            slots[:reused] = self.free[len(self.free) - reused:][::-1]
            del self.free[len(self.free) - reused:]
        fresh = count - reused
        self._grow(self.high_water + fresh)
        slots[reused:] = np.arange(self.high_water, self.high_water + fresh)
        self.high_water += fresh
        return slots

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self.slot_of

    # ------------------------------------------------------------------ writes
    def add(self, batch: CaseBatch) -> int:
        """Add the cases of ``batch`` not already present; durable on return. Returns how many."""
        with self._write_lock:
            self._check_open()
            batch = self._new_cases(batch)
            if not len(batch):
                return 0
            cap = self.options.max_cases_per_shard
            victims: list[str] = []
            if cap is not None:
                if len(batch) > cap:
                    batch = batch.take(np.arange(len(batch) - cap, len(batch)))
                overflow = len(self.slot_of) + len(batch) - cap
                if overflow > 0:
                    victims = self._choose_victims(overflow)
            if self.wal is not None:
                records = []
                if victims:
                    records.append((self.lsn + 1, RECORD_EVICT, encode_evict(victims)))
                records.append((self.lsn + len(records) + 1, RECORD_ADD, encode_add(batch)))
                self.wal.sync(self.wal.append(records))
            if victims:
                self._apply_evict(victims)
            self._apply_add(batch)
            self.lsn += 2 if victims else 1
            added = len(batch)
        self._after_write()
        return added

    def _new_cases(self, batch: CaseBatch) -> CaseBatch:
        """The cases of ``batch`` whose ids are neither stored nor repeated earlier in the batch."""
        ids = batch.case_ids
        if len(set(ids)) == len(ids) and not any(map(self.slot_of.__contains__, ids)):
            return batch
        seen: set[str] = set()
        rows = []
        for row, case_id in enumerate(ids):
            if case_id not in self.slot_of and case_id not in seen:
                seen.add(case_id)
                rows.append(row)
        return batch.take(rows)

    def _choose_victims(self, count: int) -> list[str]:
        with self._lock:
            slots = np.fromiter(self.slot_of.values(), np.int64, len(self.slot_of))
            chosen = self._eviction.select(slots, self.seq[slots], self.features[slots, -1],
                                           self.hits[slots], count)
            return [self.ids[s] for s in chosen.tolist()]

    def _apply_add(self, batch: CaseBatch) -> None:
        n = len(batch)
        now = time.time()
        with self._lock:
            slots = self._allocate(n)
            case_state(self.features)[slots] = batch.states     # views of the feature array: no copy
            case_item(self.features)[slots] = batch.item_vecs
            case_outcome(self.features)[slots] = batch.outcomes
            self.ts[slots] = batch.ts
            self.added_at[slots] = now
            self.seq[slots] = np.arange(self.next_seq, self.next_seq + n)
            self.next_seq += n
            self.hits[slots] = 0
            self.ids[slots] = _objects(batch.case_ids)
            self.item_ids[slots] = _objects(batch.item_ids)
            self.sources[slots] = _objects(batch.sources)
            self.slot_of.update(zip(batch.case_ids, slots.tolist()))
            self.index.add(slots, batch.states)
            if self._pending is not None:
                self._pending.append(("add", slots))

    def _apply_evict(self, case_ids: list[str]) -> None:
        with self._lock:
            slots = [self.slot_of.pop(c) for c in case_ids if c in self.slot_of]
            if not slots:
                return
            slots = np.asarray(slots, np.int64)
            self.index.remove(slots)
            self.ids[slots] = self.item_ids[slots] = self.sources[slots] = None
            if self._pending is not None:
                self._pending.append(("remove", slots))
            if self._pending is not None or isinstance(self.index, HNSWIndex):
                self.retired.extend(slots.tolist())
            else:
                self.free.extend(slots.tolist())
            self.evictions += len(slots)

    def _after_write(self) -> None:
        self._maybe_build()
        if self.wal is not None and self.wal.size_bytes > self.options.snapshot_wal_bytes and \
                self._snapshotter is None and not self._closed:
            # Written by a thread of its own: the add that crossed the limit returns at once.
            self._snapshotter = threading.Thread(target=self._snapshot_in_background, daemon=True,
                                                 name=f"casebank-shard{self.shard_id}-snapshot")
            self._snapshotter.start()

    # ------------------------------------------------------------------ reads
    def search(self, queries: np.ndarray, k: int, with_features: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Top-``k`` by inner product: scores [B,k] (-inf = none), slots [B,k] (-1 = none), case ids
        [B,k] (object, None = none) and, if asked, features [B,k,2*dim+1] (zeros where none)."""
        queries = np.ascontiguousarray(queries, np.float32)
        scores = np.empty((len(queries), k), np.float32)
        slots = np.empty((len(queries), k), np.int64)
        ids, _, features = self.search_into(queries, k, scores, slots, with_features)
        scores[slots < 0] = -np.inf
        return scores, slots, ids, features

    def search_into(self, queries: np.ndarray, k: int, scores: np.ndarray, slots: np.ndarray,
                    with_features: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Search into caller-owned ``scores`` float32 [B,k] and ``slots`` int64 [B,k] (as
        :meth:`ShardIndex.search_into <memory_store.index.ShardIndex.search_into>`: past the last
        hit, slot -1 and the lowest float32 score). Returns the hits' case ids [B,k] (object, None
        where none), insertion numbers [B,k] (-1 where none; they tell a reused slot apart in
        :meth:`count_hits`) and, if asked, features [B,k,2*dim+1] (zeros where none). Everything is
        read under one lock hold, so a hit never mixes two cases."""
        with self._lock:
            self.index.search_into(queries, k, scores, slots)
            missing = slots < 0
            if missing.any():
                safe = np.where(missing, 0, slots)
                ids = self.ids[safe]
                ids[missing] = None
                seqs = self.seq[safe]
                seqs[missing] = -1
            else:
                missing = None
                safe = slots
                ids = self.ids[safe]
                seqs = self.seq[safe]
            features = None
            if with_features:
                features = self.features[safe]
                if missing is not None:
                    features[missing] = 0.0
        return ids, seqs, features

    def count_hits(self, slots: np.ndarray, seqs: np.ndarray) -> None:
        """Count one retrieval for each (slot, insertion number) whose case is still in that slot."""
        with self._lock:
            same = self.seq[slots] == seqs
            np.add.at(self.hits, slots[same], 1)

    def get(self, case_id: str) -> Case | None:
        with self._lock:
            slot = self.slot_of.get(case_id)
            if slot is None:
                return None
            row = self.features[slot]
            return Case(case_id=case_id, state=case_state(row).tolist(), item_id=self.item_ids[slot],
                        item_vec=case_item(row).tolist(), outcome=float(case_outcome(row)),
                        ts=float(self.ts[slot]), source=self.sources[slot])

    def item_of(self, case_id: str) -> str | None:
        with self._lock:
            slot = self.slot_of.get(case_id)
            return None if slot is None else self.item_ids[slot]

    def features_of(self, case_ids: list[str]) -> np.ndarray:
        with self._lock:
            slots = []
            for case_id in case_ids:
                slot = self.slot_of.get(case_id)
                if slot is None:
                    raise KeyError(f"case bank has no case with id {case_id!r}")
                slots.append(slot)
            return self.features[np.asarray(slots, np.int64)]

    def newest(self, n: int) -> list[tuple[float, int, str, str, str]]:
        """(event time, insertion number, case id, item id, source) of the ``n`` newest live
        cases, oldest first."""
        with self._lock:
            ids = self.ids[:self.high_water]
            live = np.flatnonzero(ids != None)  # noqa: E711 (elementwise on an object array)
            live = live[np.lexsort((self.seq[live], self.ts[live]))[-n:]] if n else live[:0]
            return list(zip(self.ts[live].tolist(), self.seq[live].tolist(), ids[live].tolist(),
                            self.item_ids[live].tolist(), self.sources[live].tolist()))

    def hit_count(self, case_id: str) -> int:
        with self._lock:
            slot = self.slot_of.get(case_id)
            return 0 if slot is None else int(self.hits[slot])

    # ------------------------------------------------------------------ online index switch
    def _wanted_index(self) -> str | None:
        live = len(self.slot_of)
        approx = self.options.approx_index
        if approx == "flat":
            return None
        if self.index.kind == "flat":
            return approx if live > self.options.switch_threshold else None
        if live > self.options.rebuild_growth * max(self.built_size, 1):
            return approx
        if isinstance(self.index, HNSWIndex) and \
                len(self.retired) > self.options.rebuild_dead_fraction * max(live, 1):
            return approx
        if isinstance(self.index, IVFIndex) and self.options.nprobe is None and self.index.nprobe > 1 and \
                live >= math.sqrt(self.options.rebuild_growth) * max(self.index.tuned_size, 1):
            return "retune"
        return None

    def _maybe_build(self) -> None:
        if self._closed or self._builder is not None or self._pending is not None:
            return
        kind = self._wanted_index()
        if kind is None:
            return
        if self.options.background_build:
            self._builder = threading.Thread(target=self._build, args=(kind,), daemon=True,
                                             name=f"casebank-shard{self.shard_id}-build")
            self._builder.start()
        else:
            self._build(kind)

    def _build(self, kind: str) -> None:
        try:
            if self.options.background_build:  # the thread's own OpenMP setting
                faiss.omp_set_num_threads(self.options.build_threads)
            job = self._retune if kind == "retune" else lambda: self._build_and_swap(kind)
            if self._build_gate is None:
                job()
            else:
                with self._build_gate:
                    job()
        except BaseException as exc:  # reported in stats and logs; searches keep the old index
            self._build_error = exc
            logger.exception("case bank shard %d: %s failed", self.shard_id,
                             "tuning nprobe" if kind == "retune" else f"building a {kind} index")
            if kind == "retune":
                return
            with self._lock:
                self._pending = None
                self.free.extend(self.retired)
                self.retired = []
        finally:
            self._builder = None

    def _retune(self) -> None:
        """Tune the IVF index's nprobe again for the shard's current cases: it grew since the last
        tuning, neighbours got denser, so fewer cells may do (never more than now, which bounds the
        work). Runs on copies: searches and adds go on meanwhile."""
        started = time.perf_counter()
        with self._lock:
            index = self.index
            live = np.fromiter(self.slot_of.values(), np.int64, len(self.slot_of))
            vectors = self.features[live, :self.dim].copy()
        old = index.nprobe
        nprobe, recall = index.retune(live, vectors, max_nprobe=old)
        with self._lock:
            if self.index is not index:  # rebuilt meanwhile, with its own tuning
                return
            if recall < index.target_recall:  # not even the current nprobe: keep the build's tuning
                index.tuned_size = len(live)
            else:
                index.set_tuning(nprobe, recall, len(live))
        logger.info("case bank shard %d: tuned IVF nprobe %d -> %d over %d cases in %.2fs (sampled "
                    "recall %.3f)", self.shard_id, old, index.nprobe, len(live),
                    time.perf_counter() - started, recall)

    def _new_index(self, kind: str) -> ShardIndex:
        o = self.options
        return make_index(kind, self.dim, nlist_per_sqrt=o.nlist_per_sqrt, nprobe=o.nprobe,
                          train_per_list=o.train_per_list, seed=o.seed, target_recall=o.target_recall,
                          tune_k=self._tune_k, encoding=o.ivf_encoding, m=o.hnsw_m, ef_construction=o.hnsw_ef_construction,
                          ef_search=o.hnsw_ef_search)

    def _build_and_swap(self, kind: str) -> None:
        started = time.perf_counter()
        with self._lock:
            live = np.fromiter(self.slot_of.values(), np.int64, len(self.slot_of))
            vectors = self.features[live, :self.dim].copy()
            self._pending = []
            retired_before = len(self.retired)
        new = self._new_index(kind)
        new.build(live, vectors)
        # Catch up outside the lock while many writes are pending, then finish under it.
        while True:
            with self._lock:
                ops, self._pending = self._pending, []
                features = self.features
                if len(ops) <= 8:
                    self._replay_ops(new, ops, features)
                    old_kind = self.index.kind
                    self.index = new
                    self.built_size = len(self.slot_of)
                    self._pending = None
                    if isinstance(new, HNSWIndex):
                        self.free.extend(self.retired[:retired_before])
                        self.retired = self.retired[retired_before:]
                    else:
                        self.free.extend(self.retired)
                        self.retired = []
                    self.builds += 1
                    break
            self._replay_ops(new, ops, features)
        self.last_build_s = time.perf_counter() - started
        self.build_seconds += self.last_build_s
        logger.info("case bank shard %d: switched %s -> %s index over %d cases in %.2fs%s",
                    self.shard_id, old_kind, kind, self.built_size, self.last_build_s,
                    f" (nprobe {new.nprobe}, sampled recall {new.tuned_recall:.3f})"
                    if isinstance(new, IVFIndex) and new.tuned_recall is not None else "")

    def _replay_ops(self, index: ShardIndex, ops, features: np.ndarray) -> None:
        for op, slots in ops:
            if op == "add":
                index.add(slots, features[slots, :self.dim])
            else:
                index.remove(slots)

    def wait_for_build(self, timeout: float | None = None) -> bool:
        """Wait until no index build runs (and start one that is due); True if idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            builder = self._builder
            if builder is None:
                self._maybe_build()
                builder = self._builder
                if builder is None:
                    return True
            builder.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline and builder.is_alive():
                return False

    # ------------------------------------------------------------------ durability
    def flush(self) -> None:
        if self.wal is not None:
            self.wal.sync()

    def snapshot(self) -> None:
        """Write the shard's state to ``snapshot.npz`` atomically, then drop the log records it
        holds. Writers wait only while the state is copied, not while it is written."""
        if self.directory is None:
            return
        self._check_open()
        self._snapshot()

    def _snapshot(self) -> None:
        with self._snapshot_lock:
            with self._write_lock:
                if self.wal.closed:  # closed while this background snapshot waited
                    return
                with self._lock:
                    live = np.fromiter(self.slot_of.values(), np.int64, len(self.slot_of))
                    index = self.index
                    arrays = dict(
                        lsn=np.int64(self.lsn), next_seq=np.int64(self.next_seq),
                        slots=live, high_water=np.int64(self.high_water),
                        case_ids=self.ids[live].astype(str),
                        item_ids=self.item_ids[live].astype(str), sources=self.sources[live].astype(str),
                        features=self.features[live], ts=self.ts[live], added_at=self.added_at[live],
                        seq=self.seq[live], hits=self.hits[live],
                        retired=np.asarray(self.retired, np.int64),
                        index_kind=np.array(index.kind), built_size=np.int64(self.built_size),
                        evictions=np.int64(self.evictions))
                # Serialising the index while searches read it is safe: no writer holds _write_lock.
                arrays["index"] = index.serialize()
                # Every record up to here is in the copy; later ones stay in the log.
                covered = self.wal.size_bytes
            with atomic_file(self.directory / SNAPSHOT_FILE) as f:
                np.savez(f, **arrays)
            with self._write_lock:
                self.wal.drop_prefix(covered)
            self.snapshot_time = time.time()

    def _snapshot_in_background(self) -> None:
        try:
            self._snapshot()
        except BaseException:  # the log keeps every record; the next trigger tries again
            logger.exception("case bank shard %d: snapshot failed", self.shard_id)
        finally:
            self._snapshotter = None

    def _load_snapshot(self) -> None:
        path = self.directory / SNAPSHOT_FILE
        if not path.exists():
            return
        with np.load(path, allow_pickle=False) as z:
            live = z["slots"]
            self._reset_columns(max(64, int(z["high_water"])))
            self.high_water = int(z["high_water"])
            self.features[live] = z["features"]
            self.ts[live] = z["ts"]
            self.added_at[live] = z["added_at"]
            self.seq[live] = z["seq"]
            self.hits[live] = z["hits"]
            case_ids = z["case_ids"].tolist()
            self.ids[live] = _objects(case_ids)
            self.item_ids[live] = _objects(z["item_ids"].tolist())
            self.sources[live] = _objects(z["sources"].tolist())
            self.slot_of = dict(zip(case_ids, live.tolist()))
            self.lsn = int(z["lsn"])
            self.next_seq = int(z["next_seq"])
            self.built_size = int(z["built_size"])
            self.evictions = int(z["evictions"])
            kind = str(z["index_kind"])
            raw = faiss.deserialize_index(np.ascontiguousarray(z["index"]))
            retired = set(z["retired"].tolist())
        if kind == "flat":
            self.index = FlatIndex(self.dim, raw)
        elif kind == "ivf":
            self.index = IVFIndex(self.dim, nprobe=self.options.nprobe, target_recall=self.options.target_recall,
                                  tune_k=self._tune_k, seed=self.options.seed, index=raw)
        else:
            self.index = HNSWIndex(self.dim, ef_search=self.options.hnsw_ef_search, index=raw)
            in_index = faiss.vector_to_array(raw.id_map)
            dead = np.setdiff1d(in_index, live)
            self.index.tombstones.update(dead.tolist())
            retired.update(dead.tolist())
        live_set = set(live.tolist())
        self.retired = sorted(retired - live_set) if kind == "hnsw" else []
        blocked = live_set | set(self.retired)
        self.free = [s for s in range(self.high_water) if s not in blocked]
        self.snapshot_time = path.stat().st_mtime

    def _set_snapshot_aside(self, exc: Exception) -> None:
        """Keep an unreadable snapshot for inspection (``snapshot.npz.corrupt``) and open the
        shard from its log alone: the cases the snapshot held are missing until they are added
        again (serving's followers re-read the cases topic from the start, and do)."""
        path = self.directory / SNAPSHOT_FILE
        aside = path.with_name(SNAPSHOT_FILE + ".corrupt")
        os.replace(path, aside)
        self.snapshot_error = f"{exc!r} (kept as {aside.name})"
        logger.error("case bank shard %d: snapshot %s cannot be read (%r); set aside as %s, opening from "
                     "the log alone", self.shard_id, path, exc, aside.name)
        self._reset_state()

    def _replay(self) -> None:
        replayed = 0
        for record in self.wal.replay():
            if record.lsn <= self.lsn:
                continue
            if record.kind == RECORD_ADD:
                batch = decode_add(record.payload, self.dim)
                fresh = [i for i, c in enumerate(batch.case_ids) if c not in self.slot_of]
                if fresh:
                    self._apply_add(batch if len(fresh) == len(batch) else batch.take(fresh))
                replayed += len(fresh)
            elif record.kind == RECORD_EVICT:
                self._apply_evict(decode_evict(record.payload))
            else:
                logger.warning("case bank shard %d: skipping WAL record of unknown type %d (lsn %d)",
                               self.shard_id, record.kind, record.lsn)
            self.lsn = record.lsn
        if replayed:
            logger.info("case bank shard %d: replayed %d cases from %s", self.shard_id, replayed,
                        self.wal.path)

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"case bank shard {self.shard_id} is closed")

    def stats(self) -> dict:
        with self._lock:
            return {
                "cases": len(self.slot_of),
                "index_type": self.index.kind,
                "index_building": self._pending is not None,
                "built_size": self.built_size,
                "builds": self.builds,
                "build_seconds": self.build_seconds,
                "nprobe": self.index.nprobe if isinstance(self.index, IVFIndex) else None,
                "tuned_recall": getattr(self.index, "tuned_recall", None),
                "evictions": self.evictions,
                "wal_bytes": self.wal.size_bytes if self.wal is not None else 0,
                "wal_fsyncs": self.wal.fsyncs if self.wal is not None else 0,
                "wal_truncated_bytes": self.wal.truncated_bytes if self.wal is not None else 0,
                "wal_failed": self.wal.failed if self.wal is not None else None,
                "wal_corrupt_bytes": self.wal.corrupt_bytes if self.wal is not None else 0,
                "snapshot_error": self.snapshot_error,
                "snapshot_age_s": (time.time() - self.snapshot_time) if self.snapshot_time else None,
                "lsn": self.lsn,
                "build_error": repr(self._build_error) if self._build_error else None,
            }

    def close(self, snapshot: bool) -> None:
        if self._closed:
            return
        self._closed = True  # no new writes, builds or background snapshots; running ones finish
        for thread in (self._builder, self._snapshotter):
            if thread is not None:
                thread.join(timeout=120)
        if snapshot and self.wal is not None and self.wal.size_bytes > 0:
            self._snapshot()
        with self._write_lock:
            if self.wal is not None:
                self.wal.close()
