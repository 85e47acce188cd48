"""``memento bench serving``: latency, throughput and swap-visibility of serving under load.

The bench builds a serving case bank of ``--cases`` random cases on disk, starts an embedded
broker (unless ``--bootstrap-servers`` is given) and serving as a separate process, announces a
checkpoint, then drives ``/v1/recommend`` from another process (the load generator,
``python -m serving.bench drive``): open-loop at each fixed ``--rates`` value, then flat out with
``--concurrency`` clients, then at a moderate rate while a new checkpoint is announced, to time
announcement → first response carrying the new version. Figures go to ``--json``: latencies in
keys ending ``_ms``, rates in keys ending ``_per_s``.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> p.parse_args(["--cases", "1000", "--duration", "2"]).rates
[500.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "run", "drive", "summarise"]

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=100_000, help="cases in the serving bank")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase")
    parser.add_argument("--rates", type=float, nargs="+", default=[500.0],
                        help="fixed request rates to measure (requests per second)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients in the flat-out phase")
    parser.add_argument("--workers", type=int, default=1, help="serving worker processes")
    parser.add_argument("--engine", choices=("noida", "tansu"), default="noida",
                        help="embedded broker engine (ignored with --bootstrap-servers)")
    parser.add_argument("--bootstrap-servers", default=None, help="use this Kafka instead of an embedded broker")
    parser.add_argument("--item-dim", type=int, default=32, help="state and item dimension")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--work-dir", default=None, help="where to put the bank and logs (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)


# -- load generator (runs in its own process) -------------------------------------------------
async def _drive(url: str, rate: float, duration: float, concurrency: int, users: int) -> list:
    import aiohttp

    log: list = []
    connector = aiohttp.TCPConnector(limit=max(concurrency, 64))
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> None:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/recommend", json={"user_id": f"u{i % users}"}) as resp:
                    body = await resp.json()
                    log.append((time.time(), time.perf_counter() - started, resp.status,
                                body.get("policy_version")))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.append((time.time(), time.perf_counter() - started, repr(exc), None))

        stop_at = time.perf_counter() + duration
        if rate > 0:  # open loop: request i is sent at t0 + i / rate, whatever the answers do
            t0 = time.perf_counter()
            tasks, i = [], 0
            while True:
                due = t0 + i / rate
                if due >= stop_at:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
                i += 1
            await asyncio.gather(*tasks)
        else:  # flat out: closed loop with `concurrency` clients
            async def client(c: int) -> None:
                n = c
                while time.perf_counter() < stop_at:
                    await one(n)
                    n += concurrency
            await asyncio.gather(*(client(c) for c in range(concurrency)))
    return log


def drive(url: str, rate: float, duration: float, concurrency: int = 32, users: int = 10_000) -> list:
    """[(wall time done, latency s, status, policy version)] of every request sent."""
    return asyncio.run(_drive(url, rate, duration, concurrency, users))


def summarise(log: list, duration: float) -> dict:
    ok = np.array([lat for _, lat, status, _ in log if status == 200], dtype=np.float64) * 1e3
    errors = sum(1 for _, _, status, _ in log if status != 200)
    # Answers per second of wall time from the first send to the last answer (an overloaded
    # server stretches this past the phase's duration).
    span = max(t for t, _, _, _ in log) - min(t - lat for t, lat, _, _ in log) if log else duration
    out = {"requests": len(log), "errors": errors, "throughput_per_s": len(ok) / max(span, 1e-9)}
    if len(ok):
        out.update({"p50_ms": float(np.percentile(ok, 50)), "p95_ms": float(np.percentile(ok, 95)),
                    "p99_ms": float(np.percentile(ok, 99)), "max_ms": float(ok.max())})
    return out


def _driver_process(url: str, rate: float, duration: float, concurrency: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving.bench", "drive", "--url", url, "--rate", str(rate),
                             "--duration", str(duration), "--concurrency", str(concurrency), "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _run_driver(url: str, rate: float, duration: float, concurrency: int, out: Path) -> list:
    proc = _driver_process(url, rate, duration, concurrency, out)
    if proc.wait(timeout=duration + 120) != 0:
        raise RuntimeError(f"load generator exited with {proc.returncode}")
    return json.loads(out.read_text())


# -- orchestration ------------------------------------------------------------------------------
def _build_bank(settings, n: int, seed: int) -> float:
    from tqdm import tqdm

    from memento.encoder import ItemEncoder
    from memento.schemas import Case
    from memory_store import CaseBank

    rng = np.random.default_rng(seed)
    items = ItemEncoder(settings.item_dim)
    item_vecs = items.encode_many([f"item{i}" for i in range(5000)])
    started = time.perf_counter()
    bank = CaseBank(Path(settings.data_dir) / "serving-bank", dim=settings.item_dim, fsync=False)
    try:
        batch = 20_000
        with tqdm(total=n, desc="building case bank", unit="case") as bar:
            for start in range(0, n, batch):
                m = min(batch, n - start)
                states = rng.normal(size=(m, settings.item_dim)).astype(np.float32)
                states /= np.linalg.norm(states, axis=1, keepdims=True)
                which = rng.integers(0, len(item_vecs), size=m)
                bank.add([Case(f"bench-{start + j}", states[j].tolist(), f"item{which[j]}",
                               item_vecs[which[j]].tolist(), float(rng.integers(0, 4)), float(start + j))
                          for j in range(m)])
                bar.update(m)
        bank.wait_for_index(timeout=600)
    finally:
        bank.close()
    return time.perf_counter() - started


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError:
        return 0, {}


def run(args: argparse.Namespace) -> dict:
    """Run the bench; returns (and writes to ``--json``) the figures."""
    from memento.broker import EmbeddedBroker, free_port
    from memento.checkpoint import save_checkpoint
    from memento.config import Settings
    from memento.kafka_io import ensure_topics, make_producer
    from memento.qnet import QNetwork
    from memento.schemas import encode

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="memento-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    broker = None
    if args.bootstrap_servers:
        base = Settings.from_env(bootstrap_servers=args.bootstrap_servers)
    else:
        broker = EmbeddedBroker(args.engine, 0, str(work / "broker"))
        broker.start()
        base = broker.settings()
    server = None
    try:
        from memento.config import TopicNames

        prefix = f"bench{int(time.time())}"
        settings = Settings(**{**base.__dict__, "data_dir": str(work / "data"),
                               "checkpoint_dir": str(work / "ckpt"), "item_dim": args.item_dim,
                               "topics": TopicNames(**{r: f"{prefix}.{t}" for r, t in TopicNames().all().items()})})
        ensure_topics(settings)
        build_s = _build_bank(settings, args.cases, args.seed)
        producer = make_producer(settings)

        def announce(version: int) -> float:
            ann = save_checkpoint(QNetwork(settings.state_dim), settings.checkpoint_dir, version=version, step=version)
            sent = time.time()
            producer.send(settings.topics.checkpoints, value=encode(ann)).get(timeout=10)
            return sent

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        announce(1)
        server = subprocess.Popen([sys.executable, "-m", "serving.cli", "--port", str(port),
                                   "--workers", str(args.workers), "--seed", str(args.seed)],
                                  cwd=ROOT, env={**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT),
                                                 "MEMENTO_LOG_LEVEL": "WARNING"})
        deadline = time.monotonic() + 300
        while _get(f"{url}/readyz")[0] != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serving did not become ready")
            time.sleep(0.5)
        _run_driver(url, 100, 2.0, args.concurrency, work / "warmup.json")
        figures: dict = {"cases": args.cases, "workers": args.workers, "duration_s": args.duration,
                         "bank_build_s": build_s}
        for rate in args.rates:
            log = _run_driver(url, rate, args.duration, args.concurrency, work / f"rate-{rate:g}.json")
            figures[f"rate_{rate:g}"] = {"target_per_s": rate, **summarise(log, args.duration)}
            print(f"{rate:g} req/s: {figures[f'rate_{rate:g}']}")
        log = _run_driver(url, 0, args.duration, args.concurrency, work / "flat.json")
        figures["flat_out"] = summarise(log, args.duration)
        print(f"flat out: {figures['flat_out']}")
        # Swap: announce version 2 while requests flow at a moderate rate.
        swap_rate = min(args.rates) if args.rates else 200.0
        out = work / "swap.json"
        proc = _driver_process(url, swap_rate, 6.0, args.concurrency, out)
        time.sleep(2.5)
        announced = announce(2)
        if proc.wait(timeout=130) != 0:
            raise RuntimeError("load generator failed during the swap")
        log = json.loads(out.read_text())
        seen = [t for t, _, status, v in log if status == 200 and v == 2]
        figures["swap"] = {**summarise(log, 6.0),
                           "visible_after_ms": (min(seen) - announced) * 1e3 if seen else None}
        print(f"swap: {figures['swap']}")
        producer.close(5)
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if broker is not None:
            broker.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "drive":
        p = argparse.ArgumentParser(prog="serving.bench drive")
        p.add_argument("--url", required=True)
        p.add_argument("--rate", type=float, required=True)
        p.add_argument("--duration", type=float, required=True)
        p.add_argument("--concurrency", type=int, default=32)
        p.add_argument("--out", required=True)
        a = p.parse_args(argv[1:])
        Path(a.out).write_text(json.dumps(drive(a.url, a.rate, a.duration, a.concurrency)))
        return 0
    parser = argparse.ArgumentParser(prog="memento bench serving", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
