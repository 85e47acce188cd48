"""``memento worker``: runs the Faust stream worker as a process.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> a = p.parse_args(["--session-gap", "0", "--app-id", "bench"])
>>> (a.session_gap, a.app_id, a.idle_timeout, a.batch_size, a.batch_within)
(0.0, 'bench', 5.0, 1000, 0.05)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from prometheus_client import start_http_server

from memento.config import add_settings_arguments, settings_from_args
from memento.kafka_io import ensure_topics, wait_for_broker
from memento.options import log_level

__all__ = ["add_arguments", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)
    parser.add_argument("--worker-id", default="0", help="distinguishes workers' local table stores")
    parser.add_argument("--app-id", default="memento-worker",
                        help="Faust app id: consumer group and changelog topic prefix (default memento-worker)")
    parser.add_argument("--store", default="rocksdb://", choices=["rocksdb://", "memory://"],
                        help="Faust table store (changelog-backed either way)")
    parser.add_argument("--metrics-port", type=int, default=9101,
                        help="Prometheus metrics port (0 = any free port, -1 = none; default 9101)")
    parser.add_argument("--tick-interval", type=float, default=0.5,
                        help="seconds between watermark ticks that close reward windows")
    parser.add_argument("--idle-timeout", type=float, default=5.0,
                        help="seconds after which an input partition that delivered nothing stops holding "
                             "the watermark back")
    parser.add_argument("--session-gap", type=float, default=None,
                        help="event-time seconds of inactivity that end a session (done); 0 disables "
                             "(env MEMENTO_SESSION_GAP_S, default 1800)")
    parser.add_argument("--max-windows-per-user", type=int, default=None,
                        help="most reward windows one user may have open or held; a recommendation beyond "
                             "them is dead-lettered (env MEMENTO_MAX_WINDOWS_PER_USER, default 100)")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="events processed per batch: each user's table entry is written once per batch")
    parser.add_argument("--batch-within", type=float, default=0.05,
                        help="seconds the worker waits for a batch to fill before processing what it has")
    parser.add_argument("--stall-timeout", type=float, default=300.0,
                        help="seconds the worker's own ticks may go unhandled while the broker accepts new ones "
                             "before it exits (status 70) to be restarted: a stuck consumer; 0 = never (default 300)")
    parser.add_argument("--no-tansu-safe-recovery", dest="tansu_safe_recovery", action="store_false",
                        help="embedded Tansu only: batch producer records normally (fast) at the price of "
                             "incomplete table recovery after a worker restart (docs/embedded-brokers.md)")


def run_from_args(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.session_gap is not None:
        settings = dataclasses.replace(settings, session_gap_s=args.session_gap)
    if args.max_windows_per_user is not None:
        settings = dataclasses.replace(settings, max_windows_per_user=args.max_windows_per_user)
    from faust import Worker

    from streams.app import TransitionWorker
    from streams.health import EXIT_CANNOT_DELIVER

    wait_for_broker(settings, timeout=60)
    ensure_topics(settings)
    if args.metrics_port >= 0:
        server, _ = start_http_server(args.metrics_port, addr="127.0.0.1" if settings.embedded_broker else "0.0.0.0")
        logging.getLogger(__name__).info("metrics on :%d/metrics", server.server_port)
    worker = TransitionWorker(settings, worker_id=args.worker_id, store=args.store, app_id=args.app_id,
                              tick_interval_s=args.tick_interval, idle_timeout_s=args.idle_timeout,
                              tansu_safe_recovery=args.tansu_safe_recovery, batch_size=args.batch_size,
                              batch_within_s=args.batch_within, stall_timeout_s=args.stall_timeout)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    faust_worker = Worker(worker.app, loglevel=log_level(args).lower(), quiet=True)
    # At log level warning or above Faust's progress spinner sets the root logger to DEBUG for
    # good, so that every aiokafka debug call builds a log record (a cost in docs/benchmarks.md).
    faust_worker.spinner = None
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        if not worker.stalled:
            raise
        logging.getLogger(__name__).info("stopped after a stall (Faust's exit status %s); exiting %d",
                                         exc.code, EXIT_CANNOT_DELIVER)
    return EXIT_CANNOT_DELIVER if worker.stalled else 0
