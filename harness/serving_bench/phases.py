"""The bench's phases, one function each, in the order :func:`harness.serving_bench.bench.run`
calls them; each returns the figures it measured."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from harness.serving_bench.bank import bank_figures, build_bank
from harness.serving_bench.control import cpu_seconds, start_server, stop_server
from harness.serving_bench.load import driver_process, run_driver, summarise, wait_driver

__all__ = ["load_phases", "brief", "ratios", "baseline_phase", "bank_phase", "reference_phase",
           "serving_phase", "swap_phase"]


def load_phases(url: str, args: argparse.Namespace, work: Path, label: str, server_pid: int) -> dict:
    """Warm-up, each fixed rate, then flat out; the figures by phase, with the server's CPU time
    per answered request (which other load on the machine does not inflate as it does latency)."""
    def driver(rate: float, name: str) -> dict:
        cpu = cpu_seconds(server_pid)
        log = run_driver(url, rate, args.duration if name != "warmup" else 3.0, args.concurrency,
                         work / f"{label}-{name}.json", args.items, args.seed)
        out = summarise(log, args.duration)
        answered = len(log) - out["errors"]
        out["server_cpu_per_request_ms"] = (cpu_seconds(server_pid) - cpu) * 1e3 / max(answered, 1)
        return out

    driver(0, "warmup")  # flat out: every distinct request body is seen (item vectors cached)
    cpu = cpu_seconds(server_pid)
    time.sleep(3.0)
    figures: dict = {"server_idle_cpu_share": (cpu_seconds(server_pid) - cpu) / 3.0}
    for rate in args.rates:
        figures[f"rate_{rate:g}"] = {"target_per_s": rate, **driver(rate, f"rate-{rate:g}")}
        print(f"{label} {rate:g} req/s: {brief(figures[f'rate_{rate:g}'])}", flush=True)
    figures["flat_out"] = driver(0, "flat")
    print(f"{label} flat out: {brief(figures['flat_out'])}", flush=True)
    return figures


def brief(phase: dict) -> str:
    """One line of a phase's figures.

    >>> brief({"requests": 3, "p99_ms": 2.25})
    'requests 3, p99_ms 2.2'
    """
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in phase.items())


def ratios(figures: dict, other: dict, name: str = "baseline") -> dict:
    """``<phase>_<figure>_vs_<name>``: ours over the other server's, phase by phase.

    >>> ratios({"flat_out": {"throughput_per_s": 50.0}}, {"flat_out": {"throughput_per_s": 100.0}}, "reference")
    {'flat_out_throughput_vs_reference': 0.5}
    """
    out = {}
    for phase, values in figures.items():
        base = other.get(phase)
        if isinstance(values, dict) and isinstance(base, dict):
            for key, label in (("throughput_per_s", "throughput"), ("p99_ms", "p99"),
                               ("server_cpu_per_request_ms", "server_cpu")):
                if values.get(key) and base.get(key):
                    out[f"{phase}_{label}_vs_{name}"] = values[key] / base[key]
    return out


def _measure_server(command: list[str], env: dict, args: argparse.Namespace, work: Path, label: str,
                    ready_timeout: float) -> dict:
    """Start ``python -m <command>``, run :func:`load_phases` on it, stop it."""
    server, url = start_server(command, env, ready_timeout)
    try:
        return load_phases(url, args, work, label, server.pid)
    finally:
        stop_server(server)


def baseline_phase(args: argparse.Namespace, work: Path) -> dict:
    """The load phases against the trivial server (:mod:`harness.serving_bench.baseline`)."""
    return _measure_server(["harness.serving_bench", "baseline", "--workers", str(args.workers)], {},
                           args, work, "baseline", 60)


def bank_phase(settings, args: argparse.Namespace) -> dict:
    """Build the serving bank (and one copy per further worker) and measure its search alone:
    ``bank_build_s`` and ``bank``."""
    from serving.app import serving_bank_path

    build_s, states = build_bank(settings, args.cases, args.items, args.seed, args.bank_shards)
    figures = {"bank_build_s": build_s, "bank": bank_figures(settings, states, args)}
    del states
    print(f"bank: {brief(figures['bank'])}", flush=True)
    for worker in range(1, args.workers):  # each serving worker owns a copy of the bank
        shutil.copytree(serving_bank_path(settings.data_dir), serving_bank_path(settings.data_dir, worker))
    return figures


def reference_phase(settings, args: argparse.Namespace, work: Path) -> dict:
    """The load phases against the same-work reference (:mod:`harness.serving_bench.reference`)
    on the serving bank; run before serving starts (the two cannot hold the bank at once)."""
    return _measure_server(["harness.serving_bench", "reference", "--workers", str(args.workers)],
                           {**settings.to_env(), "MEMENTO_LOG_LEVEL": "WARNING"}, args, work, "reference", 600)


def serving_phase(settings, args: argparse.Namespace, work: Path) -> tuple[dict, subprocess.Popen, str]:
    """Start serving on the bank (version 1 must be announced) and run the load phases; returns
    (figures, the running server, its URL) for :func:`swap_phase`. The caller stops the server."""
    server, url = start_server(["serving.cli", "--workers", str(args.workers), "--seed", str(args.seed),
                                "--max-batch", str(args.max_batch), "--bank-shards", str(args.bank_shards)]
                               + ([] if args.bank_nprobe is None else ["--bank-nprobe", str(args.bank_nprobe)]),
                               {**settings.to_env(), "MEMENTO_LOG_LEVEL": "WARNING"})
    try:
        return load_phases(url, args, work, "serving", server.pid), server, url
    except BaseException:
        stop_server(server)
        raise


def swap_phase(url: str, args: argparse.Namespace, work: Path, announce: Callable[[int], float]) -> dict:
    """Announce version 2 while requests flow at ``--swap-rate``: the time from the announcement
    to the first answer that carries it (``visible_after_ms``), and the errors meanwhile."""
    out = work / "swap.json"
    proc = driver_process(url, args.swap_rate, 6.0, args.concurrency, out, args.items, args.seed)
    time.sleep(2.5)
    announced = announce(2)
    if wait_driver(proc, 130) != 0:
        raise RuntimeError("load generator failed during the swap")
    log = json.loads(out.read_text())
    seen = [t for t, _, status, v in log if status == 200 and v == 2]
    figures = {"target_per_s": args.swap_rate, **summarise(log, 6.0),
               "visible_after_ms": (min(seen) - announced) * 1e3 if seen else None}
    print(f"swap: {brief(figures)}", flush=True)
    return figures


def bench_settings(base, args: argparse.Namespace, work: Path):
    """The bench's settings: ``base``'s broker, its own directories and topic prefix."""
    from memento.config import TopicNames

    return dataclasses.replace(base, data_dir=str(work / "data"), checkpoint_dir=str(work / "ckpt"),
                               item_dim=args.item_dim, topics=TopicNames().prefixed(f"bench{int(time.time())}"))
