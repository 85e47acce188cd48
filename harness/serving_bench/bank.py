"""The serving bank the bench measures: built on disk as serving opens it, and its search's cost
and recall measured on its own."""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness.serving_bench.workload import HISTORY_DECAY, history_lengths, popular_items, request_bodies

__all__ = ["build_bank", "bank_figures"]


def build_bank(settings, n: int, items: int, seed: int, shards: int = 1) -> tuple[float, np.ndarray]:
    """Build the serving bank of ``n`` cases ``bench-<i>``; returns (seconds, the states [n, dim])."""
    from tqdm import tqdm

    from memento.encoder import ItemEncoder
    from memory_store import CaseBank
    from serving.app import serving_bank_path

    rng = np.random.default_rng(seed)
    item_vecs = ItemEncoder(settings.item_dim).encode_many([f"item{i}" for i in range(items)])
    weights = HISTORY_DECAY ** np.arange(5, dtype=np.float32)
    all_states = np.empty((n, settings.item_dim), np.float32)
    started = time.perf_counter()
    bank = CaseBank(serving_bank_path(settings.data_dir), dim=settings.item_dim, num_shards=shards,
                    fsync=False, tune_k=settings.top_k, ivf_encoding="fp16")  # as serving opens it
    try:
        batch = 50_000
        with tqdm(total=n, desc="building case bank", unit="case") as bar:
            for start in range(0, n, batch):
                m = min(batch, n - start)
                history = popular_items(rng, items, (m, 5))  # newest click first
                keep = np.arange(5)[None, :] < history_lengths(rng, m)[:, None]
                states = np.einsum("mh,mhd->md", keep * weights, item_vecs[history])
                states /= np.linalg.norm(states, axis=1, keepdims=True)
                all_states[start:start + m] = states
                which = popular_items(rng, items, m)
                bank.add_arrays([f"bench-{start + j}" for j in range(m)], states,
                                [f"item{i}" for i in which], item_vecs[which],
                                rng.integers(0, 4, size=m).astype(np.float64),
                                np.arange(start, start + m, dtype=np.float64))
                bar.update(m)
        bank.wait_for_index(timeout=900)
    finally:
        bank.close()
    return time.perf_counter() - started, all_states


def bank_figures(settings, states: np.ndarray, args: argparse.Namespace, queries: int = 512) -> dict:
    """The serving bank's search as serving opens it: per-query CPU time in batches of 16 on one
    thread, and recall@k of the request states against exact search (a found case counts when it
    scores at least the exact k-th best score, so equally good cases count alike). This is the
    part of a request's cost that the bank's size and nprobe set."""
    import faiss

    from memento.encoder import ItemEncoder, StateEncoder
    from serving.app import ServingConfig, serving_bank_path
    from serving.policy import PolicyOptions
    from serving.validation import parse_json, parse_recommend

    encoder = StateEncoder(ItemEncoder(settings.item_dim))
    reqs = [parse_recommend(parse_json(b)) for b in request_bodies(queries, args.items, args.seed)]
    q = np.stack([encoder.encode(r.recent_items, until=r.ts) for r in reqs]).astype(np.float32)
    k = settings.top_k
    exact, _ = faiss.knn(q, states, k, metric=faiss.METRIC_INNER_PRODUCT)
    config = ServingConfig(options=PolicyOptions(top_k=k), bank_shards=args.bank_shards, bank_nprobe=args.bank_nprobe)
    bank = config.open_bank(serving_bank_path(settings.data_dir), settings.state_dim)
    try:
        bank.search(q[:16], k)  # first touch
        cpu = time.thread_time()
        found = []
        for i in range(0, len(q), 16):
            found.extend(bank.search(q[i:i + 16], k)[1])
        cpu = time.thread_time() - cpu
        stats = bank.stats()
    finally:
        bank.close()
    good = [np.count_nonzero(states[[int(c.rsplit("-", 1)[1]) for c in ids]] @ q[i] >= exact[i, -1] - 1e-5)
            for i, ids in enumerate(found)]
    return {"search_per_query_ms": cpu * 1e3 / len(q), "recall_at_k": float(np.mean(good)) / k, "k": k,
            "index": [s["index_type"] for s in stats["shards"]], "nprobe": [s["nprobe"] for s in stats["shards"]]}

