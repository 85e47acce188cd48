"""``memento bench memory``: throughput, latency, recall and memory of the case bank, with a plain
``faiss.IndexFlatIP`` over the same data measured in the same run as the baseline.

Data: ``--cases`` L2-normalised points of a Gaussian mixture (``--clusters`` centres, ``--spread``
noise), queries drawn fresh from the same mixture. Single-query searches run on one faiss thread
(the baseline's too: OpenMP threads only slow one query down on shared cores), batch searches on
``--omp-threads``. Figures: durable add throughput (every add call
returns with its cases in the fsynced write-ahead log) through the column batch path
(:meth:`CaseBank.add_arrays`, ``adds_per_s``) and through lists of ``Case`` objects (every
``--case-object-every``-th batch, ``case_object_adds_per_s``); index build time; single-query search
p50/p99; batch search throughput; recall@k against exact search; resident memory.

JSON: latencies in milliseconds in keys ending ``_ms``, rates in keys ending ``_per_s``, durations
in seconds in keys ending ``_s``; the case bank's figures at the top level, the baseline's under
``baseline``, every setting under ``settings``, and ``os.getloadavg()`` at start and end (the cores
may be shared with other work) as ``loadavg_start`` / ``loadavg_end``.

>>> import argparse
>>> parser = argparse.ArgumentParser(); add_arguments(parser)
>>> result = run(parser.parse_args(["--cases", "3000", "--dim", "8", "--k", "8", "--queries", "50",
...                                 "--switch-threshold", "500", "--quiet"]))
>>> result["recall_at_k"] >= 0.9 and result["baseline"]["recall_at_k"] == 1.0
True
>>> sorted(k for k in result if k.endswith("_per_s"))
['adds_per_s', 'batch_queries_per_s', 'case_object_adds_per_s']
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

from memento.measure import percentile
from memento.schemas import Case
from memory_store.bank import CaseBank

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=100_000, help="cases to add (N)")
    parser.add_argument("--dim", type=int, default=64, help="state / item vector dimension")
    parser.add_argument("--k", type=int, default=64, help="neighbours per query")
    parser.add_argument("--shards", type=int, default=4, help="case bank shards")
    parser.add_argument("--queries", type=int, default=2000, help="single-query latency samples")
    parser.add_argument("--baseline-queries", type=int, default=500,
                        help="single-query latency samples of the (slow) exact baseline")
    parser.add_argument("--batch-queries", type=int, default=1000, help="queries per batch search")
    parser.add_argument("--add-batch", type=int, default=1000, help="cases per add call")
    parser.add_argument("--case-object-every", type=int, default=10,
                        help="every n-th add call passes Case objects (CaseBank.add), the others "
                             "columns (CaseBank.add_arrays); 0 = never")
    parser.add_argument("--clusters", type=int, default=0, help="mixture centres (0 = N/500)")
    parser.add_argument("--spread", type=float, default=0.6, help="per-dimension noise around a centre")
    parser.add_argument("--approx-index", default="ivf", choices=["ivf", "hnsw", "flat"])
    parser.add_argument("--switch-threshold", type=int, default=20_000,
                        help="cases per shard above which the approximate index is built")
    parser.add_argument("--nprobe", type=int, default=0,
                        help="IVF cells scanned per query (0 = tuned per build for --target-recall)")
    parser.add_argument("--target-recall", type=float, default=0.97,
                        help="recall@k the nprobe tuning aims for (on a sample of stored cases)")
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
    """Wall-clock latency of one query at a time, and the CPU time the searching thread spent
    (``search_cpu_*``: what a query costs when it has a core to itself, while the wall clock
    also counts time the thread waited for a core shared with other processes)."""
    times = np.empty(len(queries))
    cpu = np.empty(len(queries))
    for i in tqdm(range(len(queries)), desc=desc, disable=quiet, leave=False):
        q = queries[i:i + 1]
        c0 = time.thread_time()
        t0 = time.perf_counter()
        search(q)
        times[i] = time.perf_counter() - t0
        cpu[i] = time.thread_time() - c0
    return {"search_p50_ms": float(percentile(times, 50) * 1e3),
            "search_p99_ms": float(percentile(times, 99) * 1e3),
            "search_mean_ms": float(times.mean() * 1e3),
            "search_max_ms": float(times.max() * 1e3),
            "search_cpu_p50_ms": float(percentile(cpu, 50) * 1e3),
            "search_cpu_p99_ms": float(percentile(cpu, 99) * 1e3)}


def _batch_search(search, queries: np.ndarray, batch: int) -> tuple[float, list]:
    """Queries per second over ``queries`` in batches of ``batch``, and the batches' results."""
    results = []
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch):
        results.append(search(queries[start:start + batch]))
    return len(queries) / (time.perf_counter() - t0), results


def _recall(found: list[list[int]], exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact.tolist())]))


def _add_all(bank: CaseBank, data: np.ndarray, items: np.ndarray, args, result: dict) -> None:
    """Add every case durably; time the column batches and the Case-object batches apart."""
    seconds = {"arrays": 0.0, "cases": 0.0}
    counts = {"arrays": 0, "cases": 0}
    starts = range(0, args.cases, args.add_batch)
    for call, start in enumerate(tqdm(starts, desc="add (durable)", disable=args.quiet,
                                      unit_scale=args.add_batch, unit="case")):
        end = min(start + args.add_batch, args.cases)
        rows = range(start, end)
        if args.case_object_every and call % args.case_object_every == args.case_object_every - 1:
            cases = [Case(f"c{i}", data[i].tolist(), f"i{i}", items[i].tolist(), 1.0, float(i)) for i in rows]
            t0 = time.perf_counter()
            bank.add(cases)
            seconds["cases"] += time.perf_counter() - t0
            counts["cases"] += end - start
        else:
            case_ids = [f"c{i}" for i in rows]
            item_ids = [f"i{i}" for i in rows]
            ts = np.arange(start, end, dtype=np.float64)
            t0 = time.perf_counter()
            bank.add_arrays(case_ids, data[start:end], item_ids, items[start:end], 1.0, ts)
            seconds["arrays"] += time.perf_counter() - t0
            counts["arrays"] += end - start
    result["adds_per_s"] = counts["arrays"] / seconds["arrays"] if counts["arrays"] else None
    result["case_object_adds_per_s"] = counts["cases"] / seconds["cases"] if counts["cases"] else None
    result["add_calls_arrays"] = counts["arrays"] // max(args.add_batch, 1)
    result["add_calls_case_objects"] = counts["cases"] // max(args.add_batch, 1)


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; print a table (unless ``--quiet``) and write ``--json``; return the figures."""
    if args.cases < args.k:
        raise ValueError(f"--cases ({args.cases}) must be at least --k ({args.k})")
    loadavg_start = list(os.getloadavg())
    threads = args.omp_threads or min(2, os.cpu_count() or 1)
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(args.seed)
    clusters = args.clusters or max(16, args.cases // 500)
    centres = rng.standard_normal((clusters, args.dim)).astype(np.float32)
    data = _mixture(args.cases, args.dim, centres, args.spread, rng)
    items = rng.standard_normal((args.cases, args.dim)).astype(np.float32)
    queries = _mixture(max(args.queries, args.batch_queries), args.dim, centres, args.spread, rng)
    single = queries[:args.queries]
    bank_options = dict(approx_index=args.approx_index, switch_threshold=args.switch_threshold,
                        nprobe=args.nprobe or None, target_recall=args.target_recall,
                        fsync=not args.no_fsync, omp_threads=threads, snapshot_interval_s=None,
                        snapshot_on_close=False)
    result: dict = {"cases": args.cases, "dim": args.dim, "k": args.k, "shards": args.shards,
                    "settings": {**{key: value for key, value in vars(args).items()
                                    if key not in ("json", "quiet", "path") and
                                    isinstance(value, (int, float, str, bool, type(None)))},
                                 "clusters": clusters, "omp_threads": threads, "cpu_count": os.cpu_count(),
                                 "single_query_omp_threads": 1,
                                 "bank_options": bank_options, "faiss_version": faiss.__version__},
                    "loadavg_start": loadavg_start}

    # Baseline first: its batch search is the exact search every recall is measured against.
    rss_before = _rss_mb()
    flat = faiss.IndexFlatIP(args.dim)
    t0 = time.perf_counter()
    for start in range(0, args.cases, args.add_batch):
        flat.add(data[start:start + args.add_batch])
    baseline = {"adds_per_s": args.cases / (time.perf_counter() - t0), "durable": False}
    baseline["batch_queries_per_s"], found = _batch_search(lambda q: flat.search(q, args.k), queries,
                                                          args.batch_queries)
    exact = np.concatenate([labels for _, labels in found])[:args.queries]
    faiss.omp_set_num_threads(1)  # one query at a time: one thread, as the case bank does
    for q in single[:20]:
        flat.search(q[None], args.k)
    baseline_single = single[:min(args.baseline_queries, len(single))]
    baseline.update(_latencies(lambda q: flat.search(q, args.k), baseline_single, "baseline IndexFlatIP",
                               args.quiet))
    baseline["single_queries"] = len(baseline_single)
    faiss.omp_set_num_threads(threads)
    _, rows = flat.search(single, args.k)
    baseline["recall_at_k"] = _recall(rows.tolist(), exact, args.k)
    baseline["resident_delta_mb"] = _rss_mb() - rss_before
    del flat, found

    workdir = args.path or tempfile.mkdtemp(prefix="memento-bench-memory-")
    try:
        rss_before = _rss_mb()
        bank = CaseBank(workdir, args.dim, num_shards=args.shards, name="bench", **bank_options)
        t0 = time.perf_counter()
        _add_all(bank, data, items, args, result)
        result["add_phase_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bank.wait_for_index()
        result["index_build_wait_s"] = time.perf_counter() - t0
        stats = bank.stats()
        result["index_types"] = sorted({s["index_type"] for s in stats["shards"]})
        result["index_builds"] = sum(s["builds"] for s in stats["shards"])
        result["index_build_total_s"] = sum(s["build_seconds"] for s in stats["shards"])
        result["shard_cases"] = [s["cases"] for s in stats["shards"]]
        result["shard_nprobe"] = [s["nprobe"] for s in stats["shards"]]
        result["shard_tuned_recall"] = [s["tuned_recall"] for s in stats["shards"]]
        result["wal_bytes"] = sum(s["wal_bytes"] for s in stats["shards"])

        for q in single[:50]:  # warm-up
            bank.search(q[None], args.k)
        result.update(_latencies(lambda q: bank.search(q, args.k), single, "search (1 query)", args.quiet))
        result["single_queries"] = len(single)
        result["batch_queries_per_s"], _ = _batch_search(lambda q: bank.search(q, args.k), queries,
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
    result["baseline"] = baseline
    result["loadavg_end"] = list(os.getloadavg())

    if not args.quiet:
        print(f"\ncase bank benchmark: N={args.cases} d={args.dim} k={args.k} shards={args.shards} "
              f"threads={threads} index={'/'.join(result['index_types'])} nprobe={result['shard_nprobe']}")
        print(f"{'figure':<26}{'CaseBank':>14}{'IndexFlatIP':>14}")
        for key in ("adds_per_s", "case_object_adds_per_s", "search_p50_ms", "search_p99_ms",
                    "search_mean_ms", "search_cpu_p50_ms", "search_cpu_p99_ms", "batch_queries_per_s",
                    "recall_at_k", "resident_delta_mb"):
            ours, theirs = result.get(key), baseline.get(key)
            print(f"{key:<26}{_fmt(ours):>14}{_fmt(theirs):>14}")
        print(f"{'index_build_wait_s':<26}{_fmt(result['index_build_wait_s']):>14}")
        print(f"{'index_build_total_s':<26}{_fmt(result['index_build_total_s']):>14}")
        print(f"{'resident_mb (process)':<26}{_fmt(result['resident_mb']):>14}")
        print(f"loadavg start {loadavg_start} end {result['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="memento bench memory", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
