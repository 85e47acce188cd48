"""``memento bench serving``: latency, throughput and swap-visibility of serving under load.

The bench builds a serving case bank of ``--cases`` cases on disk, starts an embedded broker
(unless ``--bootstrap-servers`` is given) and serving as a separate process, announces a
checkpoint, then drives ``/v1/recommend`` from another process (the load generator,
``python -m harness.serving_bench drive``): open-loop at each fixed ``--rates`` value, then flat out with
``--concurrency`` connections, then at a moderate rate while a new checkpoint is announced, to
time announcement → first response carrying the new version.

Data: item vectors come from the shared :class:`~memento.encoder.ItemEncoder` over a catalogue
of ``--items`` ids with power-law popularity; each case's state is what
:class:`~memento.encoder.StateEncoder` makes of a history of 1–5 clicks on such items, and every
request carries such a history as ``context.recent_items``, so queries look like the cases.

Baseline, in the same run and under the same load generator: a trivial aiohttp server with the
same number of worker processes and the same event loop that parses the request JSON and
answers a fixed recommendation — the cost of HTTP alone on this machine. The load generator
speaks HTTP/1.1 over keep-alive connections with pre-encoded requests; open-loop latencies run
from each request's scheduled send time, so a stalled server cannot hide queueing delay.

Reference, in the same run, on the same bank and under the same load: the same-work server of
:mod:`harness.serving_reference`, which does only what a recommendation cannot avoid (state
encoding, one search, the numpy Q over the same K, sampling, one record through a producer with
serving's settings). Ours over it, phase by phase, is under ``vs_reference``: what serving's own
code costs beyond the work.

Figures go to ``--json``: latencies in keys ending ``_ms``, rates in keys ending ``_per_s``,
the baseline's under ``baseline``, the reference's under ``reference``.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> p.parse_args(["--cases", "1000", "--duration", "2"]).rates
[500.0]
>>> summarise([(1.0, 0.002, 200, 1), (1.5, 0.004, 200, 1), (1.6, 0.1, 503, None)], 1.0)["errors"]
1
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from memento.measure import percentile

__all__ = ["add_arguments", "run", "drive", "summarise", "request_bodies", "serve_baseline"]

ROOT = Path(__file__).resolve().parents[1]
HISTORY_DECAY = 0.85  # StateEncoder's default
_VERSION = re.compile(rb'"policy_version":\s*(-?\d+)')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=100_000, help="cases in the serving bank")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase")
    parser.add_argument("--rates", type=float, nargs="+", default=[500.0],
                        help="fixed request rates to measure (requests per second)")
    parser.add_argument("--swap-rate", type=float, default=200.0,
                        help="request rate while a new checkpoint is announced (keep it below capacity)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections in the flat-out phase")
    parser.add_argument("--workers", type=int, default=1, help="serving worker processes")
    parser.add_argument("--max-batch", type=int, default=64, help="serving's --max-batch (1 = no batching)")
    parser.add_argument("--bank-shards", type=int, default=1, help="shards of the serving case bank")
    parser.add_argument("--bank-nprobe", type=int, default=None,
                        help="serving's --bank-nprobe (default: tuned to the bank's target recall)")
    parser.add_argument("--items", type=int, default=20_000, help="catalogue size for case and request items")
    parser.add_argument("--engine", choices=("noida", "tansu"), default="noida",
                        help="embedded broker engine (ignored with --bootstrap-servers)")
    parser.add_argument("--bootstrap-servers", default=None, help="use this Kafka instead of an embedded broker")
    parser.add_argument("--item-dim", type=int, default=32, help="state and item dimension")
    parser.add_argument("--no-baseline", action="store_true", help="skip the trivial-server baseline")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the same-work reference server (harness.serving_reference)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--work-dir", default=None, help="where to put the bank and logs (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)


# -- workload -----------------------------------------------------------------------------------
def _popular_items(rng: np.random.Generator, items: int, shape) -> np.ndarray:
    weights = 1.0 / (np.arange(items) + 10.0)
    return rng.choice(items, size=shape, p=weights / weights.sum())


def _history_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1, 6, size=n)


def request_bodies(n: int, items: int, seed: int, users: int = 10_000) -> list[bytes]:
    """``n`` recommend request bodies, each with a history of 1–5 clicks as context.

    >>> body = json.loads(request_bodies(1, 100, 0)[0])
    >>> body["user_id"], 1 <= len(body["context"]["recent_items"]) <= 5
    ('u0', True)
    """
    rng = np.random.default_rng(seed + 1)
    picks = _popular_items(rng, items, (n, 5))
    lengths = _history_lengths(rng, n)
    return [json.dumps({"user_id": f"u{i % users}", "ts": 1000.0 + 10.0, "context": {"recent_items": [
        {"item_id": f"item{picks[i, j]}", "action": "click", "ts": 1000.0 + 10.0 - j}
        for j in range(int(lengths[i]))]}}, separators=(",", ":")).encode() for i in range(n)]


# -- load generator (runs in its own process) -------------------------------------------------
class _Connections:
    """Keep-alive HTTP/1.1 connections: an idle one is reused, else a new one is opened."""

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, limit
        self.idle: list = []
        self.opened = 0
        self.freed = asyncio.Event()

    async def get(self):
        while True:
            if self.idle:
                return self.idle.pop()
            if self.opened < self.limit:
                self.opened += 1
                try:
                    return await asyncio.open_connection(self.host, self.port)
                except OSError:
                    self.opened -= 1
                    raise
            self.freed.clear()
            await self.freed.wait()

    def put(self, conn, reusable: bool) -> None:
        if reusable:
            self.idle.append(conn)
        else:
            self.opened -= 1
            conn[1].close()
        self.freed.set()


async def _exchange(conn, request: bytes) -> tuple[int, bytes, bool]:
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    length = int(lower[at + 15:lower.index(b"\r\n", at)]) if at >= 0 else 0
    body = await reader.readexactly(length) if length else b""
    return status, body, b"connection: close" not in lower


async def _drive(url: str, rate: float, duration: float, concurrency: int, bodies: list[bytes]) -> list:
    host, _, port = url.removeprefix("http://").partition(":")
    requests = [(f"POST /v1/recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    pool = _Connections(host, int(port), max(concurrency, 512 if rate > 0 else concurrency))
    log: list = []

    async def one(i: int, due: float) -> None:
        conn = None
        try:
            conn = await pool.get()
            status, body, reusable = await _exchange(conn, requests[i % len(requests)])
            pool.put(conn, reusable)
            conn = None
            match = _VERSION.search(body)
            log.append((time.time(), time.perf_counter() - due, status, int(match.group(1)) if match else None))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if conn is not None:
                pool.put(conn, False)
            log.append((time.time(), time.perf_counter() - due, repr(exc), None))

    t0 = time.perf_counter()
    stop_at = t0 + duration
    if rate > 0:  # open loop: request i is due at t0 + i / rate, whatever the answers do
        tasks, i = [], 0
        while True:
            now = time.perf_counter()
            while t0 + i / rate <= now:
                tasks.append(asyncio.ensure_future(one(i, t0 + i / rate)))
                i += 1
            if t0 + i / rate >= stop_at:
                break
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
    else:  # flat out: closed loop over `concurrency` connections
        async def client(c: int) -> None:
            n = c
            while time.perf_counter() < stop_at:
                await one(n, time.perf_counter())
                n += concurrency
        await asyncio.gather(*(client(c) for c in range(concurrency)))
    for reader_writer in pool.idle:
        reader_writer[1].close()
    return log


def drive(url: str, rate: float, duration: float, concurrency: int = 32, items: int = 20_000,
          seed: int = 0) -> list:
    """[(wall time done, latency s, status, policy version)] of every request sent."""
    bodies = request_bodies(2048, items, seed)
    return asyncio.run(_drive(url, rate, duration, concurrency, bodies))


def summarise(log: list, duration: float) -> dict:
    ok = np.array([lat for _, lat, status, _ in log if status == 200], dtype=np.float64) * 1e3
    errors = sum(1 for _, _, status, _ in log if status != 200)
    # Answers per second of wall time from the first send to the last answer (an overloaded
    # server stretches this past the phase's duration).
    span = max(t for t, _, _, _ in log) - min(t - lat for t, lat, _, _ in log) if log else duration
    out = {"requests": len(log), "errors": errors, "throughput_per_s": len(ok) / max(span, 1e-9)}
    if len(ok):
        out.update({"p50_ms": float(percentile(ok, 50)), "p95_ms": float(percentile(ok, 95)),
                    "p99_ms": float(percentile(ok, 99)), "max_ms": float(ok.max())})
    return out


def _driver_process(url: str, rate: float, duration: float, concurrency: int, out: Path,
                    items: int = 20_000, seed: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.serving_bench", "drive", "--url", url, "--rate", str(rate),
                             "--duration", str(duration), "--concurrency", str(concurrency), "--out", str(out),
                             "--items", str(items), "--seed", str(seed)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _run_driver(url: str, rate: float, duration: float, concurrency: int, out: Path, items: int = 20_000,
                seed: int = 0) -> list:
    proc = _driver_process(url, rate, duration, concurrency, out, items, seed)
    if _wait_driver(proc, duration + 120) != 0:
        raise RuntimeError(f"load generator exited with {proc.returncode}")
    return json.loads(out.read_text())


def _wait_driver(proc: subprocess.Popen, timeout: float) -> int:
    """The load generator's exit code; killed (by PID) if it outlives ``timeout``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"load generator still running after {timeout:.0f} s; killed") from None


# -- baseline server ----------------------------------------------------------------------------
async def _baseline_recommend(request):
    from aiohttp import web

    body = json.loads(await request.read())
    if not isinstance(body, dict) or not isinstance(body.get("user_id"), str):
        return web.json_response({"error": "field 'user_id' is required"}, status=422)
    return web.json_response({"request_id": "0" * 32, "user_id": body["user_id"], "item_id": "item0",
                              "items": ["item0"], "case_id": "case0", "propensity": 1.0,
                              "policy_version": 0, "ts": body.get("ts", 0.0)})


async def _baseline_ready(request):
    from aiohttp import web

    return web.json_response({"ready": True})


def _baseline_worker(port: int, reuse_port: bool, worker_index: int = 0) -> None:
    from aiohttp import web

    from serving.cli import serve_app

    app = web.Application()
    app.router.add_post("/v1/recommend", _baseline_recommend)
    app.router.add_get("/readyz", _baseline_ready)
    serve_app(app, "127.0.0.1", port, reuse_port=reuse_port)


def serve_baseline(port: int, workers: int = 1) -> None:
    """A trivial aiohttp server (parse JSON, check ``user_id``, answer a fixed recommendation)
    on ``port`` with ``workers`` processes and serving's event loop; runs until SIGTERM."""
    from serving.cli import run_workers

    if workers == 1:
        _baseline_worker(port, False)
    else:
        run_workers(_baseline_worker, (port, True), workers)


# -- orchestration ------------------------------------------------------------------------------
def _build_bank(settings, n: int, items: int, seed: int, shards: int = 1) -> tuple[float, np.ndarray]:
    """Build the serving bank of ``n`` cases ``bench-<i>``; returns (seconds, the states [n, dim])."""
    from tqdm import tqdm

    from memento.encoder import ItemEncoder
    from memory_store import CaseBank

    rng = np.random.default_rng(seed)
    item_vecs = ItemEncoder(settings.item_dim).encode_many([f"item{i}" for i in range(items)])
    weights = HISTORY_DECAY ** np.arange(5, dtype=np.float32)
    all_states = np.empty((n, settings.item_dim), np.float32)
    started = time.perf_counter()
    bank = CaseBank(Path(settings.data_dir) / "serving-bank", dim=settings.item_dim, num_shards=shards,
                    fsync=False, tune_k=settings.top_k, ivf_encoding="fp16")  # as serving opens it
    try:
        batch = 50_000
        with tqdm(total=n, desc="building case bank", unit="case") as bar:
            for start in range(0, n, batch):
                m = min(batch, n - start)
                history = _popular_items(rng, items, (m, 5))  # newest click first
                keep = np.arange(5)[None, :] < _history_lengths(rng, m)[:, None]
                states = np.einsum("mh,mhd->md", keep * weights, item_vecs[history])
                states /= np.linalg.norm(states, axis=1, keepdims=True)
                all_states[start:start + m] = states
                which = _popular_items(rng, items, m)
                bank.add_arrays([f"bench-{start + j}" for j in range(m)], states,
                                [f"item{i}" for i in which], item_vecs[which],
                                rng.integers(0, 4, size=m).astype(np.float64),
                                np.arange(start, start + m, dtype=np.float64))
                bar.update(m)
        bank.wait_for_index(timeout=900)
    finally:
        bank.close()
    return time.perf_counter() - started, all_states


def _bank_figures(settings, states: np.ndarray, args: argparse.Namespace, queries: int = 512) -> dict:
    """The serving bank's search as serving opens it: per-query CPU time in batches of 16 on one
    thread, and recall@k of the request states against exact search (a found case counts when it
    scores at least the exact k-th best score, so equally good cases count alike). This is the
    part of a request's cost that the bank's size and nprobe set."""
    import faiss

    from memento.encoder import ItemEncoder, StateEncoder
    from serving.app import ServingConfig
    from serving.policy import PolicyOptions
    from serving.validation import parse_json, parse_recommend

    encoder = StateEncoder(ItemEncoder(settings.item_dim))
    reqs = [parse_recommend(parse_json(b)) for b in request_bodies(queries, args.items, args.seed)]
    q = np.stack([encoder.encode(r.recent_items, until=r.ts) for r in reqs]).astype(np.float32)
    k = settings.top_k
    exact, _ = faiss.knn(q, states, k, metric=faiss.METRIC_INNER_PRODUCT)
    config = ServingConfig(options=PolicyOptions(top_k=k), bank_shards=args.bank_shards, bank_nprobe=args.bank_nprobe)
    bank = config.open_bank(Path(settings.data_dir) / "serving-bank", settings.state_dim)
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


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError:
        return 0, {}


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _get(f"{url}/readyz")[0] != 200:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout:.0f} s")
        time.sleep(0.5)


def _stop(server: subprocess.Popen | None) -> None:
    if server is not None and server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its direct children (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _load_phases(url: str, args: argparse.Namespace, work: Path, label: str, server_pid: int) -> dict:
    """Warm-up, each fixed rate, then flat out; the figures by phase, with the server's CPU time
    per answered request (which other load on the machine does not inflate as it does latency)."""
    def driver(rate: float, name: str) -> dict:
        cpu = _cpu_seconds(server_pid)
        log = _run_driver(url, rate, args.duration if name != "warmup" else 3.0, args.concurrency,
                          work / f"{label}-{name}.json", args.items, args.seed)
        out = summarise(log, args.duration)
        answered = len(log) - out["errors"]
        out["server_cpu_per_request_ms"] = (_cpu_seconds(server_pid) - cpu) * 1e3 / max(answered, 1)
        return out

    driver(0, "warmup")  # flat out: every distinct request body is seen (item vectors cached)
    cpu = _cpu_seconds(server_pid)
    time.sleep(3.0)
    figures: dict = {"server_idle_cpu_share": (_cpu_seconds(server_pid) - cpu) / 3.0}
    for rate in args.rates:
        figures[f"rate_{rate:g}"] = {"target_per_s": rate, **driver(rate, f"rate-{rate:g}")}
        print(f"{label} {rate:g} req/s: {_brief(figures[f'rate_{rate:g}'])}", flush=True)
    figures["flat_out"] = driver(0, "flat")
    print(f"{label} flat out: {_brief(figures['flat_out'])}", flush=True)
    return figures


def _brief(phase: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in phase.items())


def _reference_phases(settings, args: argparse.Namespace, work: Path) -> dict:
    """The load phases against the same-work reference server (:mod:`harness.serving_reference`)
    on the serving bank."""
    from harness.broker import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "harness.serving_reference", "--port", str(port),
                               "--workers", str(args.workers)], cwd=ROOT,
                              env={**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT),
                                   "MEMENTO_LOG_LEVEL": "WARNING"})
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server, 600)
        return _load_phases(f"http://127.0.0.1:{port}", args, work, "reference", server.pid)
    finally:
        _stop(server)


def _ratios(figures: dict, baseline: dict, name: str = "baseline") -> dict:
    """``<phase>_<figure>_vs_<name>``: ours over the other server's, phase by phase."""
    out = {}
    for phase, values in figures.items():
        base = baseline.get(phase)
        if isinstance(values, dict) and isinstance(base, dict):
            for key, label in (("throughput_per_s", "throughput"), ("p99_ms", "p99"),
                              ("server_cpu_per_request_ms", "server_cpu")):
                if values.get(key) and base.get(key):
                    out[f"{phase}_{label}_vs_{name}"] = values[key] / base[key]
    return out


def run(args: argparse.Namespace) -> dict:
    """Run the bench; returns (and writes to ``--json``) the figures."""
    from harness.broker import EmbeddedBroker, free_port
    from memento.checkpoint import ANNOUNCEMENT_KEY, save_checkpoint
    from memento.config import Settings, TopicNames
    from memento.kafka_io import ensure_topics, make_producer
    from memento.qnet import QNetwork
    from memento.schemas import encode

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="memento-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"cases": args.cases, "workers": args.workers, "max_batch": args.max_batch,
                     "bank_shards": args.bank_shards, "bank_nprobe": args.bank_nprobe,
                     "duration_s": args.duration, "concurrency": args.concurrency,
                     "loadavg_start": list(os.getloadavg()), "cpus": os.cpu_count()}
    if not args.no_baseline:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "harness.serving_bench", "baseline", "--port", str(port),
                                   "--workers", str(args.workers)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            _wait_ready(f"http://127.0.0.1:{port}", server, 60)
            figures["baseline"] = _load_phases(f"http://127.0.0.1:{port}", args, work, "baseline", server.pid)
        finally:
            _stop(server)
    broker = None
    if args.bootstrap_servers:
        base = Settings.from_env(bootstrap_servers=args.bootstrap_servers)
    else:
        broker = EmbeddedBroker(args.engine, 0, str(work / "broker"))
        broker.start()
        base = broker.settings()
    server = None
    try:
        prefix = f"bench{int(time.time())}"
        settings = dataclasses.replace(base, data_dir=str(work / "data"), checkpoint_dir=str(work / "ckpt"),
                                       item_dim=args.item_dim, topics=TopicNames().prefixed(prefix))
        ensure_topics(settings)
        figures["bank_build_s"], states = _build_bank(settings, args.cases, args.items, args.seed, args.bank_shards)
        figures["bank"] = _bank_figures(settings, states, args)
        del states
        print(f"bank: {_brief(figures['bank'])}", flush=True)
        for worker in range(1, args.workers):  # each serving worker owns a copy of the bank
            shutil.copytree(Path(settings.data_dir) / "serving-bank", Path(settings.data_dir) / f"serving-bank-{worker}")
        if not args.no_reference:  # before serving: the two cannot hold the bank at once
            figures["reference"] = _reference_phases(settings, args, work)
        producer = make_producer(settings)

        def announce(version: int) -> float:
            ann = save_checkpoint(QNetwork(settings.state_dim), settings.checkpoint_dir, version=version, step=version)
            sent = time.time()
            producer.send(settings.topics.checkpoints, key=ANNOUNCEMENT_KEY, value=encode(ann)).get(timeout=10)
            return sent

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        announce(1)
        server = subprocess.Popen([sys.executable, "-m", "serving.cli", "--port", str(port),
                                   "--workers", str(args.workers), "--seed", str(args.seed),
                                   "--max-batch", str(args.max_batch), "--bank-shards", str(args.bank_shards)]
                                  + ([] if args.bank_nprobe is None else ["--bank-nprobe", str(args.bank_nprobe)]),
                                  cwd=ROOT, env={**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT),
                                                 "MEMENTO_LOG_LEVEL": "WARNING"})
        _wait_ready(url, server)
        figures.update(_load_phases(url, args, work, "serving", server.pid))
        # Swap: announce version 2 while requests flow at a moderate rate.
        out = work / "swap.json"
        proc = _driver_process(url, args.swap_rate, 6.0, args.concurrency, out, args.items, args.seed)
        time.sleep(2.5)
        announced = announce(2)
        if _wait_driver(proc, 130) != 0:
            raise RuntimeError("load generator failed during the swap")
        log = json.loads(out.read_text())
        seen = [t for t, _, status, v in log if status == 200 and v == 2]
        figures["swap"] = {"target_per_s": args.swap_rate, **summarise(log, 6.0),
                           "visible_after_ms": (min(seen) - announced) * 1e3 if seen else None}
        print(f"swap: {_brief(figures['swap'])}", flush=True)
        producer.close(5)
    finally:
        _stop(server)
        if broker is not None:
            broker.stop()
    if "baseline" in figures:
        figures["vs_baseline"] = _ratios(figures, figures["baseline"])
    if "reference" in figures:
        figures["vs_reference"] = _ratios(figures, figures["reference"], "reference")
    figures["loadavg_end"] = list(os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "drive":
        p = argparse.ArgumentParser(prog="harness.serving_bench drive")
        p.add_argument("--url", required=True)
        p.add_argument("--rate", type=float, required=True)
        p.add_argument("--duration", type=float, required=True)
        p.add_argument("--concurrency", type=int, default=32)
        p.add_argument("--items", type=int, default=20_000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)
        a = p.parse_args(argv[1:])
        Path(a.out).write_text(json.dumps(drive(a.url, a.rate, a.duration, a.concurrency, a.items, a.seed)))
        return 0
    if argv and argv[0] == "baseline":
        p = argparse.ArgumentParser(prog="harness.serving_bench baseline")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--workers", type=int, default=1)
        a = p.parse_args(argv[1:])
        serve_baseline(a.port, a.workers)
        return 0
    parser = argparse.ArgumentParser(prog="memento bench serving", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
