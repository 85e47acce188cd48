"""``memento serve``: command-line flags and the process entry point.

Flags override environment variables (``MEMENTO_<FIELD>``, see :class:`memento.config.Settings`);
the API tokens and their scopes come only from the environment (:mod:`serving.auth`), the chat
generator's key only from ``MEMENTO_CHAT_API_KEY``. With ``--workers N`` (N > 1) N processes share the port
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
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
from typing import Callable

from memento import config
from memento.config import Settings
from memento.options import add_dataclass_options, log_level, options_from_args

__all__ = ["add_arguments", "run_from_args", "settings_from_args", "config_from_args", "serve_app",
           "run_workers", "new_event_loop"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``memento serve``'s flags to ``parser``: the process's own, the shared settings', and
    one per field of :class:`~serving.policy.PolicyOptions` and :class:`~serving.app.ServingConfig`
    (defaults and help from the fields)."""
    from serving.app import ServingConfig
    from serving.policy import PolicyOptions

    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    parser.add_argument("--workers", type=int, default=1,
                        help="serving processes sharing the port via SO_REUSEPORT (default 1)")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop: uvloop when installed (auto, default), or asyncio's")
    config.add_settings_arguments(parser)
    parser.add_argument("--embedded-broker", choices=["noida", "tansu"], default=None,
                        help="the embedded test broker in use, if any (env MEMENTO_EMBEDDED_BROKER)")
    # K, α, the floor and the prior define μ; a checkpoint that carries them (the learner's) replaces these.
    add_dataclass_options(parser, PolicyOptions, "the policy μ until a checkpoint sets it", exclude=("priors",))
    add_dataclass_options(parser, ServingConfig, "serving", exclude=("options", "api_tokens", "chat_api_key",
                                                                   "worker_index"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The shared settings, with serving's K (``--top-k``) and embedded-broker flags."""
    return config.settings_from_args(args, top_k=getattr(args, "top_k", None), embedded_broker=args.embedded_broker)


def config_from_args(args: argparse.Namespace, settings: Settings, worker_index: int = 0):
    """Serving's options from the flags given; the rest from the dataclasses' defaults."""
    from serving.app import ServingConfig
    from serving.auth import ApiTokens
    from serving.policy import PolicyOptions

    options = options_from_args(PolicyOptions, args, top_k=settings.top_k)
    return options_from_args(ServingConfig, args, options=options, api_tokens=ApiTokens.from_env(),
                             chat_api_key=os.environ.get("MEMENTO_CHAT_API_KEY", ""), worker_index=worker_index)


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


def _serve(args: argparse.Namespace, settings: Settings, serving_config, worker_index: int) -> None:
    from serving.app import ServingService, make_app

    logging.basicConfig(level=log_level(args),
                        format=f"%(asctime)s serving[{worker_index}] %(levelname)s %(name)s: %(message)s")
    service = ServingService(settings, dataclasses.replace(serving_config, worker_index=worker_index))
    log.info("serving worker %d on http://%s:%d (Kafka %s)", worker_index, args.host, args.port,
             settings.bootstrap_servers)
    serve_app(make_app(service), args.host, args.port, reuse_port=args.workers > 1, loop=args.loop)


def run_from_args(args: argparse.Namespace) -> int:
    """Run serving until SIGTERM/SIGINT; returns the exit code."""
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    try:  # every option is read and checked once, by its dataclass, before any process starts
        settings = settings_from_args(args)
        serving_config = config_from_args(args, settings)
    except ValueError as exc:
        raise SystemExit(f"memento serve: {exc}") from None
    if args.workers == 1:
        _serve(args, settings, serving_config, 0)
        return 0
    logging.basicConfig(level=log_level(args),
                        format="%(asctime)s serving %(levelname)s %(message)s")
    code = run_workers(_serve, (args, settings, serving_config), args.workers)
    log.info("all %d serving workers stopped", args.workers)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memento serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
