"""The command line of ``memento bench stream``: its options (:func:`add_arguments`) and
:func:`main`, which also runs the trivial agent as ``python -m harness.stream_bench agent``
(a child process of the baseline phases)."""

from __future__ import annotations

import argparse
import sys

from harness.stream_bench.agents import _run_agent
from harness.stream_bench.phases import run

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=100_000, help="events per throughput phase")
    parser.add_argument("--users", type=int, default=2000, help="distinct users")
    parser.add_argument("--event-rate", type=float, default=2000.0,
                        help="event-time density of the throughput phases (events per event-time second)")
    parser.add_argument("--window", type=float, default=2.0, help="attribution window, event-time seconds")
    parser.add_argument("--lateness", type=float, default=0.5, help="allowed lateness, event-time seconds")
    parser.add_argument("--session-gap", type=float, default=3.0, help="session gap, event-time seconds (0: off)")
    parser.add_argument("--latency-rate", type=float, default=0.0,
                        help="events/s of the latency phase (default 0: half the one-worker rate measured)")
    parser.add_argument("--latency-duration", type=float, default=15.0, help="seconds of the latency phase")
    parser.add_argument("--profile", type=float, default=0.0,
                        help="py-spy the one-worker drain for this many seconds (0: no profile)")
    parser.add_argument("--engine", choices=("noida", "tansu"), default="noida",
                        help="embedded broker engine (ignored with --bootstrap-servers)")
    parser.add_argument("--bootstrap-servers", default=None, help="use this Kafka instead of an embedded broker")
    parser.add_argument("--item-dim", type=int, default=32, help="state and item dimension")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--work-dir", default=None, help="where to put logs and tables (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "agent":
        return _run_agent(argv[1:])
    parser = argparse.ArgumentParser(prog="memento bench stream", description=_description())
    add_arguments(parser)
    figures = run(parser.parse_args(argv))
    return 1 if figures.get("read_back_problems") else 0


def _description() -> str:
    """The first paragraph of the package's docstring (the bench in one sentence)."""
    from harness import stream_bench

    return stream_bench.__doc__.split("\n\n")[0]
