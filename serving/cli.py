"""``memento serve``: command-line flags and the process entry point.

Flags override environment variables (``MEMENTO_<FIELD>``, see :class:`memento.config.Settings`);
the bearer token comes from ``--api-token`` or ``MEMENTO_API_TOKEN``, the chat generator's key
only from ``MEMENTO_CHAT_API_KEY``. With ``--workers N`` (N > 1) N processes share the port
(SO_REUSEPORT), each with its own case bank directory, followers and metrics. The event loop is
uvloop when it is installed (``--loop auto``), else asyncio's.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> a = p.parse_args(["--port", "9000", "--alpha", "0.5"])
>>> a.port, a.alpha, a.workers
(9000, 0.5, 1)
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
from typing import Callable

from memento.config import (DEFAULT_ALPHA, DEFAULT_MIN_PROB, DEFAULT_OWN_CASES, DEFAULT_SIMILARITY_PRIOR,
                            DEFAULT_VOTE_PRIOR, Settings)

__all__ = ["add_arguments", "run_from_args", "settings_from_args", "config_from_args", "serve_app",
           "run_workers", "new_event_loop"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``memento serve``'s flags to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    parser.add_argument("--workers", type=int, default=1,
                        help="serving processes sharing the port via SO_REUSEPORT (default 1)")
    parser.add_argument("--bootstrap-servers", default=None, help="Kafka bootstrap servers (env MEMENTO_BOOTSTRAP_SERVERS)")
    parser.add_argument("--data-dir", default=None, help="local state root; the case bank lives in DATA_DIR/serving-bank")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where announced checkpoints are looked up if their path does not exist here")
    parser.add_argument("--products", default=None, help="product CSV for item features (env MEMENTO_PRODUCTS)")
    parser.add_argument("--embedded-broker", choices=["noida", "tansu"], default=None,
                        help="the embedded test broker in use, if any (env MEMENTO_EMBEDDED_BROKER)")
    # K, alpha, the floor and the prior define mu; a checkpoint that carries them (the learner's) replaces these.
    parser.add_argument("--top-k", type=int, default=None, help="nearest cases mu chooses among until a "
                        "checkpoint sets it; also the K the bank's IVF probes are tuned for (default settings.top_k)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="temperature of mu = softmax(Q/alpha) until a "
                        f"checkpoint sets it (default {DEFAULT_ALPHA})")
    parser.add_argument("--min-prob", type=float, default=DEFAULT_MIN_PROB, help="floor on each candidate's probability until "
                        f"a checkpoint sets it (default {DEFAULT_MIN_PROB})")
    parser.add_argument("--similarity-prior", type=float, default=DEFAULT_SIMILARITY_PRIOR,
                        help="weight beta of nearness in the retrieval prior softmax(beta*cos(s, c_state) + "
                        f"w*log(1 + V(c))) of mu until a checkpoint sets it (default {DEFAULT_SIMILARITY_PRIOR}; 0 = none)")
    parser.add_argument("--vote-prior", type=float, default=DEFAULT_VOTE_PRIOR,
                        help="weight w of the neighbours' vote V(c) in the retrieval prior until a checkpoint "
                        f"sets it (default {DEFAULT_VOTE_PRIOR}; 0 = none)")
    parser.add_argument("--own-cases", type=int, default=DEFAULT_OWN_CASES,
                        help="the user's own newest cases (one per distinct recent item) added to the nearest "
                        f"as candidates, and the recent items the priors' recency term ranks (default {DEFAULT_OWN_CASES}; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (worker i uses seed+i)")
    parser.add_argument("--api-token", default=None, help="bearer token for write endpoints (env MEMENTO_API_TOKEN)")
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="largest request body (default 65536)")
    parser.add_argument("--generator", choices=("case", "chat"), default="case",
                        help="item generator: the chosen case's item, or an OpenAI-compatible chat endpoint")
    parser.add_argument("--chat-url", default="", help="chat endpoint root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--chat-model", default="gpt-4o-mini", help="model name sent to the chat endpoint")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="most concurrent recommend requests answered by one search and Q pass (default 64)")
    parser.add_argument("--bank-shards", type=int, default=1,
                        help="shards of a new case bank (an existing bank keeps its count; default 1)")
    parser.add_argument("--bank-encoding", choices=("fp16", "flat"), default="fp16",
                        help="IVF cell storage of the case bank: fp16 (default, half the memory per search) or flat")
    parser.add_argument("--bank-nprobe", type=int, default=None,
                        help="IVF cells scanned per search (default: tuned to 0.97 recall); fewer trade recall for speed")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop: uvloop when installed (auto, default), or asyncio's")
    parser.add_argument("--log-level", default=os.environ.get("MEMENTO_LOG_LEVEL", "INFO"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        bootstrap_servers=args.bootstrap_servers, data_dir=args.data_dir,
        checkpoint_dir=args.checkpoint_dir, products=args.products, top_k=args.top_k,
        embedded_broker=args.embedded_broker)


def config_from_args(args: argparse.Namespace, settings: Settings, worker_index: int = 0):
    from serving.app import ServingConfig
    from serving.policy import PolicyOptions

    return ServingConfig(
        options=PolicyOptions(top_k=settings.top_k, alpha=args.alpha, min_prob=args.min_prob,
                              similarity_prior=args.similarity_prior, vote_prior=args.vote_prior,
                              own_cases=args.own_cases, seed=args.seed),
        api_token=args.api_token if args.api_token is not None else os.environ.get("MEMENTO_API_TOKEN", ""),
        max_body_bytes=args.max_body_bytes, generator=args.generator, chat_url=args.chat_url,
        chat_model=args.chat_model, chat_api_key=os.environ.get("MEMENTO_CHAT_API_KEY", ""),
        worker_index=worker_index, max_batch=args.max_batch,
        bank_shards=args.bank_shards, bank_encoding=args.bank_encoding, bank_nprobe=args.bank_nprobe)


def new_event_loop(kind: str = "auto"):
    """A new event loop: uvloop's (``uvloop``, or ``auto`` when installed) or asyncio's.

    >>> loop = new_event_loop("asyncio"); type(loop).__module__.startswith("asyncio"); loop.close()
    True
    """
    import asyncio

    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"loop must be auto, uvloop or asyncio, got {kind!r}")
    if kind != "asyncio":
        try:
            import uvloop
            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                raise SystemExit("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
    return asyncio.new_event_loop()


def serve_app(app, host: str, port: int, reuse_port: bool = False, loop: str = "auto") -> None:
    """Run the aiohttp ``app`` on ``host:port`` until SIGTERM/SIGINT (no access log)."""
    from aiohttp import web

    web.run_app(app, host=host, port=port, reuse_port=reuse_port or None, handle_signals=True,
                shutdown_timeout=5.0, print=None, access_log=None, backlog=1024, loop=new_event_loop(loop))


def run_workers(target: Callable[..., None], args: tuple, workers: int) -> int:
    """Run ``target(*args, worker_index)`` in ``workers`` spawned processes (``target`` must be a
    module-level function); SIGTERM/SIGINT are forwarded to them. Returns the first non-zero
    exit code, else 0."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(*args, i), name=f"serving-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()

    def forward(signum, frame):
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for proc in procs:
        proc.join()
        code = code or (proc.exitcode or 0)
    return code


def _serve(args: argparse.Namespace, worker_index: int) -> None:
    from serving.app import ServingService, make_app

    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s serving[{worker_index}] %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    service = ServingService(settings, config_from_args(args, settings, worker_index))
    log.info("serving worker %d on http://%s:%d (Kafka %s)", worker_index, args.host, args.port,
             settings.bootstrap_servers)
    serve_app(make_app(service), args.host, args.port, reuse_port=args.workers > 1, loop=args.loop)


def run_from_args(args: argparse.Namespace) -> int:
    """Run serving until SIGTERM/SIGINT; returns the exit code."""
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.max_batch < 1:
        raise SystemExit("--max-batch must be >= 1")
    if args.bank_nprobe is not None and args.bank_nprobe < 1:
        raise SystemExit("--bank-nprobe must be >= 1")
    if args.workers == 1:
        _serve(args, 0)
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s serving %(levelname)s %(message)s")
    code = run_workers(_serve, (args,), args.workers)
    log.info("all %d serving workers stopped", args.workers)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memento serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
