"""The ``memento`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from memento.config import settings_from_args
from memento.options import log_level

__all__ = ["main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_GLOBAL_OPTIONS_WITH_VALUE = ("--log-level",)  # the words after these are not the command

# subcommand → (module with add_arguments/run_from_args, help)
COMMANDS = {
    "worker": ("streams.worker", "run the Faust stream worker (transitions, cases)"),
    "learner": ("learner.service", "run the soft-Q learner (replay buffer, checkpoints)"),
    "serve": ("serving.cli", "run the HTTP recommendation server"),
    "replay": ("evaluation.replay", "play users (synthetic or Tmall) against serving and Kafka"),
    "demo": ("cli.demo", "start everything on an embedded broker and replay users"),
    "eval": ("evaluation.cli", "compare retrieval policies in-process (simulator or logs)"),
}

# ``memento bench NAME`` → module with add_arguments/run(args) -> dict of figures
BENCHMARKS = {
    "memory": ("harness.memory_bench", "case bank: adds/s, search latency, recall vs faiss.IndexFlatIP"),
    "serving": ("harness.serving_bench", "HTTP serving: latency at fixed rates and flat out, reload visibility"),
    "stream": ("harness.stream_bench", "stream worker: events/s (1 and 2 workers), latency, vs trivial Faust agent and kafka-python"),
    "learner": ("harness.learner_bench", "soft-Q learner: transitions/s into the replay buffer, updates/s vs a bare torch loop"),
}


def _bench(args: argparse.Namespace) -> int:
    importlib.import_module(args.bench_module).run(args)
    return 0


def _broker(args: argparse.Namespace) -> int:
    from harness.broker import BrokerError, EmbeddedBroker

    broker = EmbeddedBroker(args.engine, args.port, args.broker_dir)
    if args.action == "start":
        try:
            print(broker.start(settings_from_args(args)))
        except (BrokerError, TimeoutError) as exc:
            print(f"memento broker start: {exc}", file=sys.stderr)
            return 1
    elif args.action == "stop":
        print("stopped" if broker.stop() else "no broker recorded as running in " + args.broker_dir)
    else:
        state = broker.status()
        if state is None:
            print("no broker started from " + args.broker_dir)
            return 1
        print(f"{state['engine']} pid={state['pid']} bootstrap={state['bootstrap']} "
              f"{'running' if state['running'] else 'not running'}")
        return 0 if state["running"] else 1
    return 0


def _invoked(argv: list[str]) -> tuple[str | None, str | None]:
    """The command and bench name ``argv`` asks for (None where it names none)."""
    words, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _GLOBAL_OPTIONS_WITH_VALUE:
            skip = True
        elif not a.startswith("-"):
            words.append(a)
    command = words[0] if words else None
    return command, (words[1] if command == "bench" and len(words) > 1 else None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command. With ``argv``, only the module of the command it invokes
    is imported (``memento --help`` and ``memento broker status`` import neither torch nor
    faiss; tests/test_cli_light.py); the others are listed with their help but take no
    arguments of their own."""
    load_all = argv is None
    command, bench_name = _invoked(argv or [])

    parser = argparse.ArgumentParser(prog="memento", description=__doc__)
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=log_level(),
                        help="log level of the command (env MEMENTO_LOG_LEVEL; default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    broker = sub.add_parser("broker", help="start/stop/status an embedded Kafka-protocol broker")
    broker.add_argument("action", choices=["start", "stop", "status"])
    broker.add_argument("--engine", choices=["noida", "tansu"], default="noida")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--data-dir", dest="broker_dir", default=".memento/broker")
    broker.set_defaults(handler=_broker)
    bench = sub.add_parser("bench", help="benchmarks that print figures against a baseline")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text)
        p.set_defaults(handler=_bench, bench_module=module)
        if load_all or (command == "bench" and bench_name == name):
            _add_arguments(p, module)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(module=module)
        if load_all or command == name:
            _add_arguments(p, module)
    return parser


def _add_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        importlib.import_module(module).add_arguments(parser)
    except (ImportError, AttributeError) as exc:
        parser.set_defaults(import_error=exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if getattr(args, "import_error", None):
        print(f"memento {args.command}: unavailable ({args.import_error})", file=sys.stderr)
        return 2
    if hasattr(args, "handler"):
        return args.handler(args)
    return int(importlib.import_module(args.module).run_from_args(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
