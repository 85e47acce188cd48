"""``memento bench memory``: throughput, latency, recall and memory of the case bank, with a plain
``faiss.IndexFlatIP`` over the same data measured in the same run as the baseline.

Data: ``--cases`` L2-normalised points of a Gaussian mixture (``--clusters`` centres, ``--spread``
noise), queries drawn fresh from the same mixture. Figures: durable add throughput (WAL fsynced
per batch), single-query search p50/p99, batch search throughput, recall@k against exact search,
resident memory. JSON keys: latencies end in ``_ms``, rates in ``_per_s``; the baseline's figures
sit under ``baseline``.

>>> import argparse
>>> parser = argparse.ArgumentParser(); add_arguments(parser)
>>> result = run(parser.parse_args(["--cases", "3000", "--dim", "8", "--k", "8", "--queries", "50",
...                                 "--switch-threshold", "500", "--quiet"]))
>>> result["recall_at_k"] >= 0.9 and result["baseline"]["recall_at_k"] == 1.0
True
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import faiss
import numpy as np
from tqdm import tqdm

from memento.schemas import Case
from memory_store.bank import CaseBank

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=100_000, help="cases to add (N)")
    parser.add_argument("--dim", type=int, default=64, help="state / item vector dimension")
    parser.add_argument("--k", type=int, default=64, help="neighbours per query")
    parser.add_argument("--shards", type=int, default=4, help="case bank shards")
    parser.add_argument("--queries", type=int, default=2000, help="single-query latency samples")
    parser.add_argument("--batch-queries", type=int, default=1000, help="queries per batch search")
    parser.add_argument("--add-batch", type=int, default=1000, help="cases per CaseBank.add call")
    parser.add_argument("--clusters", type=int, default=0, help="mixture centres (0 = N/500)")
    parser.add_argument("--spread", type=float, default=0.6, help="per-dimension noise around a centre")
    parser.add_argument("--approx-index", default="ivf", choices=["ivf", "hnsw", "flat"])
    parser.add_argument("--switch-threshold", type=int, default=20_000,
                        help="cases per shard above which the approximate index is built")
    parser.add_argument("--nprobe", type=int, default=24, help="IVF cells scanned per query")
    parser.add_argument("--omp-threads", type=int, default=0, help="faiss threads (0 = min(2, CPUs))")
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync the WAL per add")
    parser.add_argument("--path", default="", help="bank directory (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write the figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no table")


def _mixture(n: int, dim: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    points = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _latencies(search, queries: np.ndarray, desc: str, quiet: bool) -> dict:
    times = np.empty(len(queries))
    for i in tqdm(range(len(queries)), desc=desc, disable=quiet, leave=False):
        q = queries[i:i + 1]
        t0 = time.perf_counter()
        search(q)
        times[i] = time.perf_counter() - t0
    return {"search_p50_ms": float(np.percentile(times, 50) * 1e3),
            "search_p99_ms": float(np.percentile(times, 99) * 1e3),
            "search_mean_ms": float(times.mean() * 1e3)}


def _batch_rate(search, queries: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch):
        search(queries[start:start + batch])
    return len(queries) / (time.perf_counter() - t0)


def _recall(found: list[list[int]], exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact.tolist())]))


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; print a table (unless ``--quiet``) and write ``--json``; return the figures."""
    if args.cases < args.k:
        raise ValueError(f"--cases ({args.cases}) must be at least --k ({args.k})")
    threads = args.omp_threads or min(2, os.cpu_count() or 1)
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(args.seed)
    clusters = args.clusters or max(16, args.cases // 500)
    centres = rng.standard_normal((clusters, args.dim)).astype(np.float32)
    data = _mixture(args.cases, args.dim, centres, args.spread, rng)
    items = rng.standard_normal((args.cases, args.dim)).astype(np.float32)
    queries = _mixture(max(args.queries, args.batch_queries), args.dim, centres, args.spread, rng)
    rss_before = _rss_mb()

    exact_index = faiss.IndexFlatIP(args.dim)
    exact_index.add(data)
    _, exact = exact_index.search(queries[:args.queries], args.k)
    del exact_index

    workdir = args.path or tempfile.mkdtemp(prefix="memento-bench-memory-")
    result: dict = {"cases": args.cases, "dim": args.dim, "k": args.k, "shards": args.shards,
                    "omp_threads": threads, "fsync": not args.no_fsync, "approx_index": args.approx_index,
                    "nprobe": args.nprobe, "clusters": clusters, "spread": args.spread}
    try:
        bank = CaseBank(workdir, args.dim, num_shards=args.shards, approx_index=args.approx_index,
                        switch_threshold=args.switch_threshold, nprobe=args.nprobe,
                        fsync=not args.no_fsync, omp_threads=threads, snapshot_interval_s=None,
                        snapshot_on_close=False, name="bench")
        add_seconds = 0.0
        for start in tqdm(range(0, args.cases, args.add_batch), desc="add (durable)", disable=args.quiet,
                          unit_scale=args.add_batch, unit="case"):
            end = min(start + args.add_batch, args.cases)
            cases = [Case(f"c{i}", data[i].tolist(), f"i{i}", items[i].tolist(), 1.0, float(i))
                     for i in range(start, end)]
            t0 = time.perf_counter()
            bank.add(cases)
            add_seconds += time.perf_counter() - t0
        result["adds_per_s"] = args.cases / add_seconds
        t0 = time.perf_counter()
        bank.wait_for_index()
        result["index_build_wait_s"] = time.perf_counter() - t0
        stats = bank.stats()
        result["index_types"] = sorted({s["index_type"] for s in stats["shards"]})
        result["wal_bytes"] = sum(s["wal_bytes"] for s in stats["shards"])

        single = queries[:args.queries]
        for q in single[:50]:  # warm-up
            bank.search(q[None], args.k)
        result.update(_latencies(lambda q: bank.search(q, args.k), single, "search (1 query)", args.quiet))
        result["batch_queries_per_s"] = _batch_rate(lambda q: bank.search(q, args.k), queries,
                                                    args.batch_queries)
        _, ids = bank.search(single, args.k)
        result["recall_at_k"] = _recall([[int(c[1:]) for c in row] for row in ids], exact, args.k)
        result["resident_mb"] = _rss_mb()
        result["resident_delta_mb"] = result["resident_mb"] - rss_before
        t0 = time.perf_counter()
        bank.snapshot()
        result["snapshot_s"] = time.perf_counter() - t0
        bank.close()
        t0 = time.perf_counter()
        CaseBank(workdir, args.dim, num_shards=args.shards, snapshot_on_close=False,
                 snapshot_interval_s=None, name="bench-reopen").close()
        result["reopen_s"] = time.perf_counter() - t0
    finally:
        if not args.path:
            shutil.rmtree(workdir, ignore_errors=True)

    rss_before = _rss_mb()
    flat = faiss.IndexFlatIP(args.dim)
    t0 = time.perf_counter()
    for start in range(0, args.cases, args.add_batch):
        flat.add(data[start:start + args.add_batch])
    baseline = {"adds_per_s": args.cases / (time.perf_counter() - t0), "durable": False}
    for q in single[:20]:
        flat.search(q[None], args.k)
    baseline.update(_latencies(lambda q: flat.search(q, args.k), single, "baseline IndexFlatIP",
                               args.quiet))
    baseline["batch_queries_per_s"] = _batch_rate(lambda q: flat.search(q, args.k), queries,
                                                  args.batch_queries)
    _, rows = flat.search(single, args.k)
    baseline["recall_at_k"] = _recall(rows.tolist(), exact, args.k)
    baseline["resident_delta_mb"] = _rss_mb() - rss_before
    result["baseline"] = baseline

    if not args.quiet:
        print(f"\ncase bank benchmark: N={args.cases} d={args.dim} k={args.k} shards={args.shards} "
              f"threads={threads} index={'/'.join(result['index_types'])}")
        print(f"{'figure':<26}{'CaseBank':>14}{'IndexFlatIP':>14}")
        for key in ("adds_per_s", "search_p50_ms", "search_p99_ms", "search_mean_ms",
                    "batch_queries_per_s", "recall_at_k", "resident_delta_mb"):
            print(f"{key:<26}{result[key]:>14.4g}{baseline[key]:>14.4g}")
        print(f"{'resident_mb (process)':<26}{result['resident_mb']:>14.4g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="memento bench memory", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
