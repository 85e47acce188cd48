"""Where the phases run: the bench (:class:`_Bench`: broker, producer, process group, work
directory, the events) and one phase on it (:class:`_Phase`: topics of its own, its worker or
agent processes, producing to them and measuring their drain)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from harness.stream_bench.events import BenchEvents, Produced
from harness.stream_bench.metrics import _consumed, wait_until_assigned
from harness.stream_bench.outputs import Output
from harness.stream_bench.rates import sustained_rate, sustained_span


class _Bench:
    """The embedded broker (or ``--bootstrap-servers``), the producer, the process group and the
    work directory that every phase shares."""

    def __init__(self, args: argparse.Namespace):
        from memento.config import Settings
        from memento.kafka_io import make_producer
        from harness.processes import ProcessGroup

        self.args = args
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="memento-bench-stream-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.stamp = f"{int(time.time())}"
        self.broker = None
        if args.bootstrap_servers:
            self.base = Settings.from_env(bootstrap_servers=args.bootstrap_servers)
        else:
            from harness.broker import EmbeddedBroker

            self.broker = EmbeddedBroker(args.engine, 0, str(self.work / "broker"))
            self.broker.start()
            self.base = self.broker.settings()
        self.group = ProcessGroup()
        self.producer = make_producer(self.base, linger_ms=5, batch_size=256 * 1024)

    def events(self, prefix: str) -> tuple[list, BenchEvents]:
        a = self.args
        ev = BenchEvents(a.users, a.item_dim, prefix, seed=a.seed)
        # event times end an hour before now: none lies ahead of the worker's clock (max_future_skew_s)
        t0, batches, n = time.time() - 3600.0 - a.events / a.event_rate, [], 0
        while n < a.events:
            batch = ev.moment(t0 + n / a.event_rate)
            batches.append(batch)
            n += len(batch)
        return batches, ev

    def close(self) -> None:
        self.producer.close(5)
        self.group.stop_all()
        if self.broker is not None:
            self.broker.stop()


class _Phase:
    """Consumer processes on topics of their own, and the bench's producer."""

    def __init__(self, bench: "_Bench", name: str):
        from memento.config import TopicNames
        from memento.kafka_io import ensure_topics

        self.bench, self.name = bench, name
        self.app_id = self.prefix = prefix = f"bench-{bench.stamp}-{name}"
        self.settings = dataclasses.replace(
            bench.base, topics=TopicNames().prefixed(prefix), data_dir=str(bench.work / name),
            item_dim=bench.args.item_dim, window_s=bench.args.window, allowed_lateness_s=bench.args.lateness,
            session_gap_s=bench.args.session_gap)
        ensure_topics(self.settings)
        self.ports: list[int] = []

    def start_workers(self, n: int) -> list:
        from harness.broker import free_port
        from harness.processes import memento_command

        procs = []
        for i in range(n):
            port = free_port()
            cmd = memento_command("worker", "--app-id", self.app_id,
                                  "--worker-id", f"w{i}", "--metrics-port", str(port))
            if self.settings.embedded_broker == "tansu":
                cmd.append("--no-tansu-safe-recovery")
            procs.append(self.bench.group.start(f"{self.name}-w{i}", cmd, env={**self.settings.to_env(), "MEMENTO_LOG_LEVEL": os.environ.get(
                                                    "MEMENTO_BENCH_WORKER_LOGLEVEL", "warning")},
                                                log_dir=self.bench.work / "logs"))
            self.ports.append(port)
        return procs

    def start_agent(self, outputs: Iterable["Output"] = ()):
        """The trivial agent (:func:`trivial_app`); with ``outputs``, sending them to topics of
        this phase (``<prefix>.out.<role>``, with the worker's partition counts)."""
        from harness.broker import free_port
        from memento.kafka_io import ensure_topics

        outputs = [dataclasses.replace(o, topic=f"{self.prefix}.out.{o.role}") for o in outputs]
        if outputs:
            ensure_topics(self.settings, specs={o.topic: o.partitions for o in outputs})
        port = free_port()
        (self.bench.work / self.name).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "harness.stream_bench", "agent", "--app-id", self.app_id,
               "--metrics-port", str(port), "--datadir", str(self.bench.work / self.name / "agent"),
               "--outputs", json.dumps([dataclasses.asdict(o) for o in outputs])]
        proc = self.bench.group.start(f"{self.name}-agent", cmd, env=self.settings.to_env(),
                                      log_dir=self.bench.work / "logs")
        self.ports.append(port)
        return proc

    def produce(self, batches: list[list[tuple[str, bytes, bytes, Produced]]]) -> float:
        """Send pre-made events flat out; returns the wall time when the last was acknowledged."""
        t = self.settings.topics
        topic = {"action": t.actions, "recommendation": t.recommendations}
        producer = self.bench.producer
        for batch in batches:
            for role, key, value, p in batch:
                producer.send(topic[role], key=key, value=value, partition=p.partition)
        producer.flush()
        return time.time()

    def wait_assigned(self, timeout: float = 60.0) -> None:
        """Until every process holds some of the actions partitions and together all of them,
        for 1.5 s (a rebalance is over)."""
        wait_until_assigned(self.bench.group, self.settings.topics.actions, self.ports, timeout)

    def drain(self, total: int, timeout: float = 600.0, at_tenth: Callable[[], None] | None = None) -> float:
        """Sample the processes' progress (from their start) until ``total`` events are consumed;
        returns :func:`sustained_rate` and keeps :func:`sustained_span` in ``span``. ``at_tenth``
        is called once a tenth is consumed."""
        samples = [(time.time(), 0.0)]
        deadline = time.monotonic() + timeout
        while samples[-1][1] < total:
            if at_tenth is not None and samples[-1][1] >= total / 10:
                at_tenth()
                at_tenth = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {samples[-1][1]:.0f} of {total} events consumed in {timeout:.0f}s")
            self.bench.group.check()
            time.sleep(0.25)
            try:
                samples.append((time.time(), _consumed(self.ports)))
            except OSError:  # metrics endpoint not up yet
                pass
        self.span = sustained_span(samples, total)
        return sustained_rate(samples, total)
