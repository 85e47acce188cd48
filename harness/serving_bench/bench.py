"""``memento bench serving``: the options, the run (its phases top to bottom) and the
sub-commands of ``python -m harness.serving_bench`` (the load generator, the baseline and
reference servers)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness.serving_bench.baseline import serve_baseline
from harness.serving_bench.load import drive
from harness.serving_bench.phases import (bank_phase, baseline_phase, bench_settings, ratios, reference_phase,
                                          serving_phase, swap_phase)

__all__ = ["add_arguments", "run", "main"]


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
                        help="skip the same-work reference server (harness.serving_bench.reference)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--work-dir", default=None, help="where to put the bank and logs (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)




def run(args: argparse.Namespace) -> dict:
    """Run the bench; returns (and writes to ``--json``) the figures."""
    from harness.broker import EmbeddedBroker
    from harness.serving_bench.control import stop_server
    from memento.checkpoint import ANNOUNCEMENT_KEY, save_checkpoint
    from memento.config import Settings
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
        figures["baseline"] = baseline_phase(args, work)
    broker = None
    if args.bootstrap_servers:
        base = Settings.from_env(bootstrap_servers=args.bootstrap_servers)
    else:
        broker = EmbeddedBroker(args.engine, 0, str(work / "broker"))
        broker.start()
        base = broker.settings()
    server = None
    try:
        settings = bench_settings(base, args, work)
        ensure_topics(settings)
        figures.update(bank_phase(settings, args))
        if not args.no_reference:
            figures["reference"] = reference_phase(settings, args, work)
        producer = make_producer(settings)

        def announce(version: int) -> float:
            ann = save_checkpoint(QNetwork(settings.state_dim), settings.checkpoint_dir, version=version, step=version)
            sent = time.time()
            producer.send(settings.topics.checkpoints, key=ANNOUNCEMENT_KEY, value=encode(ann)).get(timeout=10)
            return sent

        announce(1)
        serving, server, url = serving_phase(settings, args, work)
        figures.update(serving)
        figures["swap"] = swap_phase(url, args, work, announce)
        producer.close(5)
    finally:
        stop_server(server)
        if broker is not None:
            broker.stop()
    if "baseline" in figures:
        figures["vs_baseline"] = ratios(figures, figures["baseline"])
    if "reference" in figures:
        figures["vs_reference"] = ratios(figures, figures["reference"], "reference")
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
    if argv and argv[0] in ("baseline", "reference"):
        p = argparse.ArgumentParser(prog=f"harness.serving_bench {argv[0]}")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--workers", type=int, default=1)
        a = p.parse_args(argv[1:])
        if argv[0] == "baseline":
            serve_baseline(a.port, a.workers)
        else:
            import logging

            from harness.serving_bench.reference import serve_reference
            from memento.options import log_level

            logging.basicConfig(level=log_level(), format="%(asctime)s reference %(levelname)s %(name)s: %(message)s")
            serve_reference(a.port, a.workers)
        return 0
    from harness.serving_bench import __doc__ as doc

    parser = argparse.ArgumentParser(prog="memento bench serving", description=doc.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
