"""``memento bench stream``: throughput and latency of the stream worker, against a trivial Faust
agent (the baseline) and a plain kafka-python consume loop (the ceiling).

One run, on one embedded broker (or ``--bootstrap-servers``), each phase on topics of its own:

1. **one worker** (``memento worker`` as a process, RocksDB store) started on a backlog of
   ``--events`` synthetic events. The rate is the slope of the worker's
   ``memento_stream_events_total`` from 10% to 90% of the backlog (:func:`sustained_rate`): no
   producer competes for the cores, start-up and tail are left out. Every phase is measured so.
2. **latency**, same worker and topics: events paced at ``--latency-rate`` (default: half the
   rate measured in 1) with event time = wall time at production. A transition's latency is the wall time at which a consumer reads it
   minus the production time of the event that made it emittable under the attribution rules
   (:func:`emission_times`): the first event that moved its partition's watermark past the
   window's close (and, with a session gap, past the hold time, or the user's next event).
3. **two workers** (one group, started together) on the same input as phase 1, produced once
   both hold partitions (noida stalls a rebalance among busy members); their transitions are
   compared with phase 1's. A group that has not drained the input within 5 times the
   one-worker drain time is recorded as ``two_workers_error`` and the run goes on.
4. **baseline**: a Faust agent that decodes and counts (:func:`trivial_app`), measured like 1.
5. **baseline with output**: the same agent, also sending per event as many records, of the
   same mean size and to topics of as many partitions, as the worker of phase 1 produced per
   input event while its rate was measured (changelog, transitions, cases, dead letters:
   :func:`measure_outputs`). The worker's rate against this one leaves out what Faust and
   producing through the broker cost, and measures the worker's own code.
6. **ceiling**: a kafka-python consumer drains the baseline's topics (a backlog of the same
   events), counting messages without decoding.

Figures go to ``--json``: the worker's at the top level, the trivial agent's under ``baseline``,
the producing one's under ``baseline_with_output``, kafka-python's under ``ceiling``, the
worker's rate over each agent's in ``ratio_to_baseline`` and ``ratio_to_baseline_with_output``;
latencies in keys ending ``_ms``, rates in keys ending ``_per_s``.
``os.getloadavg()`` is recorded at the start and the end: on a shared machine, compare runs only
at similar load.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> a = p.parse_args(["--events", "5000"])
>>> (a.events, a.window, a.session_gap, a.latency_rate)
(5000, 2.0, 3.0, 0.0)
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from memento.exposition import Sample, metric_sum, scrape
from memento.kafka_io import partition_of
from memento.measure import percentile

__all__ = ["add_arguments", "run", "main", "BenchEvents", "Produced", "emission_times", "sustained_span", "sustained_rate", "percentile",
           "trivial_app", "summarise_profile", "wait_until_assigned", "Output",
           "measure_outputs"]

PARTITIONS = 4


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


# -- events -----------------------------------------------------------------------------------
@dataclass
class Produced:
    """What the bench knows of one produced event (``ts`` is its event time)."""

    role: str  # "action" or "recommendation"
    partition: int
    user: str
    ts: float
    request_id: str | None


@dataclass
class BenchEvents:
    """Synthetic user moments: a recommendation, then (sometimes) the user's click or cart on it
    and (sometimes) an organic click elsewhere; about 2.15 events per moment.

    Parameters
    ----------
    users
        Number of distinct users, drawn uniformly.
    item_dim
        Size of the state vector carried by recommendations.
    prefix
        Prefix of request and event ids (unique per stream).
    seed
        Seeds the draws.

    >>> ev = BenchEvents(users=3, item_dim=4, prefix="x", seed=1)
    >>> batch = ev.moment(100.0)
    >>> [(role, p.user, p.ts) for role, _, _, p in batch][:1]
    [('recommendation', 'u0', 100.0)]
    >>> ev.produced[0].request_id
    'x-r0'
    """

    users: int
    item_dim: int
    prefix: str
    seed: int = 0
    produced: list[Produced] = field(default_factory=list)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._moment = 0
        self._event = 0

    def moment(self, ts: float) -> list[tuple[str, bytes, bytes, Produced]]:
        """One user moment at event time ``ts``: ``[(role, key, value, Produced)]``."""
        from memento.encoder import case_feature_dim
        from memento.schemas import Action, Recommendation, encode

        rng, d = self._rng, self.item_dim
        user = f"u{rng.randrange(self.users)}"
        key = user.encode()
        partition = partition_of(key, PARTITIONS)
        rid = f"{self.prefix}-r{self._moment}"
        self._moment += 1
        item = str(rng.randrange(200))
        rec = Recommendation(request_id=rid, user_id=user, item_id=item, case_id=f"c{item}",
                             propensity=0.1, policy_version=1, ts=ts,
                             state=[round(rng.random(), 4) for _ in range(d)],
                             case_features=[round(rng.random(), 4) for _ in range(case_feature_dim(d))])
        out = [("recommendation", encode(rec), None)]
        if rng.random() < 0.5:
            out.append(("action", encode(Action(self._next_event(), user, item, "click", ts, rid)), rid))
        if rng.random() < 0.15:
            out.append(("action", encode(Action(self._next_event(), user, item, "cart", ts, rid)), rid))
        if rng.random() < 0.5:
            other = str(rng.randrange(200))
            out.append(("action", encode(Action(self._next_event(), user, other, "click", ts)), None))
        batch = []
        for role, value, _ in out:
            produced = Produced(role, partition, user, ts, rid if role == "recommendation" else None)
            self.produced.append(produced)
            batch.append((role, key, value, produced))
        return batch

    def _next_event(self) -> str:
        self._event += 1
        return f"{self.prefix}-e{self._event}"


def emission_times(produced: Iterable[Produced], *, window_s: float, lateness_s: float,
                   session_gap_s: float) -> dict[str, float]:
    """For each recommendation, the event time of the first event that made its transition
    emittable under :mod:`streams.attribution`'s rules (recommendations never emittable within
    ``produced`` are left out). The watermark of a partition is the smallest over the two inputs
    of the largest event time produced there; event times must not decrease per input and
    partition.

    >>> P = Produced
    >>> evs = [P("recommendation", 0, "u", 0.0, "r"), P("action", 0, "x", 1.8, None),
    ...        P("recommendation", 0, "v", 2.5, "s"), P("action", 0, "v", 3.5, None),
    ...        P("recommendation", 0, "w", 4.0, "t")]
    >>> emission_times(evs, window_s=1.0, lateness_s=0.5, session_gap_s=0.0)  # watermark > 1.5
    {'r': 2.5}
    >>> emission_times(evs, window_s=1.0, lateness_s=0.5, session_gap_s=1.0)  # u idle: > 2.5
    {'r': 4.0}
    """
    inputs: dict[tuple[int, str], list[float]] = defaultdict(list)
    activity: dict[str, list[float]] = defaultdict(list)
    recs = []
    for ev in produced:
        inputs[(ev.partition, ev.role)].append(ev.ts)
        activity[ev.user].append(ev.ts)
        if ev.role == "recommendation":
            recs.append(ev)

    def crossing(partition: int, t: float) -> float:
        when = -math.inf
        for role in ("action", "recommendation"):
            times = inputs.get((partition, role), [])
            i = bisect.bisect_right(times, t)
            if i == len(times):
                return math.inf
            when = max(when, times[i])
        return when

    from streams.attribution import RewardWindow

    window = RewardWindow(window_s, lateness_s, session_gap_s)
    out = {}
    for rec in recs:
        when = crossing(rec.partition, window.close_time(rec.ts))
        if session_gap_s > 0:
            times = activity[rec.user]
            i = bisect.bisect_right(times, window.end(rec.ts))
            active = times[i] if i < len(times) and window.in_gap(rec.ts, times[i]) else math.inf
            when = max(when, min(active, crossing(rec.partition, window.hold_time(rec.ts))))
        if when < math.inf:
            out[rec.request_id] = when
    return out


# -- measurement helpers ----------------------------------------------------------------------
def sustained_span(samples: list[tuple[float, float]], total: int) -> tuple[float, float]:
    """The wall times at which a consumer draining a backlog of ``total`` events had processed
    10% and 90% of them (interpolated between ``(wall time, events processed)`` samples).

    >>> sustained_span([(0, 0), (1, 0), (2, 100), (4, 500), (6, 900), (7, 1000)], 1000)
    (2.0, 6.0)
    """
    def time_at(count: float) -> float:
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if c1 >= count > c0:
                return t0 + (t1 - t0) * (count - c0) / (c1 - c0)
        raise ValueError(f"sustained_span: no sample reached {count} events (last: {samples[-1]})")

    return time_at(0.1 * total), time_at(0.9 * total)


def sustained_rate(samples: list[tuple[float, float]], total: int) -> float:
    """Events/s of a consumer draining a backlog of ``total`` events: the slope over
    :func:`sustained_span` (80% of the events), which leaves out the start-up and the tail.

    >>> sustained_rate([(0, 0), (1, 0), (2, 100), (4, 500), (6, 900), (7, 1000)], 1000)
    200.0
    """
    start, end = sustained_span(samples, total)
    return 0.8 * total / (end - start)


def wait_until_assigned(group, topic: str, ports: list[int], timeout: float = 60.0) -> None:
    """Until the worker processes whose metrics are on ``ports`` together hold every partition of
    ``topic``, each some, for 1.5 s (a rebalance is over). ``group.check()`` runs on every round,
    so a process that died fails at once; raises :class:`TimeoutError` after ``timeout``."""
    deadline, since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        group.check()
        try:
            counts = [metric_sum(_scrape(p), "memento_stream_assigned_partitions", topic=topic) for p in ports]
        except OSError:  # metrics endpoint not up yet
            counts = [0.0]
        if sum(counts) == PARTITIONS and min(counts) > 0:
            since = since or time.monotonic()
            if time.monotonic() - since >= 1.5:
                return
        else:
            since = None
        time.sleep(0.2)
    raise TimeoutError(f"partitions of {topic} not assigned to {len(ports)} worker process(es) in {timeout:.0f}s")


def _scrape(port: int) -> list[Sample]:
    return scrape(f"http://127.0.0.1:{port}/metrics")


def _consumed(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        samples = _scrape(port)
        total += metric_sum(samples, "memento_stream_events_total", type="action")
        total += metric_sum(samples, "memento_stream_events_total", type="recommendation")
    return total


@dataclass(frozen=True)
class Output:
    """Records of one kind that the worker produces, as the producing trivial agent imitates
    them: ``per_event`` records per input event, of ``value_bytes`` bytes on average, to a topic
    of ``partitions`` partitions (``topic``: the worker's where measured, the agent's where sent).
    """

    role: str  # "changelog", "transitions", "cases", "dead_letter"
    topic: str
    partitions: int
    per_event: float
    value_bytes: int


def measure_outputs(settings, topics: dict[str, str], span: tuple[float, float], events: float,
                    quiet_s: float = 1.0, timeout: float = 60.0) -> list[Output]:
    """What the worker produced while it processed ``events`` input events in the wall-time
    ``span`` (the records whose producer timestamp falls in it), read back from its output
    topics (``role → topic``) until nothing new arrived for ``quiet_s`` since the last record
    (the end offsets are not used: Tansu's are wrong). Roles with no record in the span are left
    out."""
    from kafka import KafkaConsumer, TopicPartition

    from memento.kafka_io import client_kwargs, fetch_kwargs

    consumer = KafkaConsumer(**client_kwargs(settings), **fetch_kwargs(settings), enable_auto_commit=False,
                             group_id=None)
    try:
        partitions = {topic: sorted(consumer.partitions_for_topic(topic) or ()) for topic in topics.values()}
        consumer.assign([TopicPartition(t, p) for t, ps in partitions.items() for p in ps])
        consumer.seek_to_beginning()
        records: Counter = Counter()
        size: Counter = Counter()
        start, last = time.monotonic(), None  # quiet counts from the first record read
        while last is None or time.monotonic() - last < quiet_s:
            if time.monotonic() - start > timeout:
                if last is None:
                    break  # nothing at all
                raise RuntimeError(f"measure_outputs: {topics} still growing after {timeout:.0f}s")
            polled = consumer.poll(timeout_ms=100)
            if not polled:
                time.sleep(0.01)  # noida answers an empty fetch at once
            for tp, batch in polled.items():
                last = time.monotonic()
                inside = [m for m in batch if span[0] <= m.timestamp / 1000.0 <= span[1]]
                records[tp.topic] += len(inside)
                size[tp.topic] += sum(len(m.value or b"") for m in inside)
    finally:
        consumer.close()
    return [Output(role, topic, len(partitions[topic]), round(records[topic] / events, 4),
                   round(size[topic] / records[topic]))
            for role, topic in topics.items() if records[topic]]


# -- the trivial agent (baseline) ---------------------------------------------------------------
def trivial_app(settings, app_id: str, datadir: str, registry=None, outputs: Iterable["Output"] = ()):
    """A Faust app that decodes every action and recommendation and counts them (the baseline):
    the worker's consumer settings, its topics, none of its work. Exports the same
    ``memento_stream_events_total`` and ``memento_stream_assigned_partitions`` as the worker, in
    ``registry`` (a fresh one by default).

    With ``outputs`` (the baseline with output), it also sends, after each event and through the
    worker's producer settings, ``per_event`` records of ``value_bytes`` bytes keyed by the
    event's key to each output's ``topic`` (fractions carry over from event to event): what
    producing the worker's records through the broker costs, without the worker's work.

    >>> from memento.config import Settings
    >>> trivial_app(Settings(), "bench-agent", "/tmp/memento-doctest-agent").conf.id
    'bench-agent'
    """
    import faust
    from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge

    from memento.schemas import Action, Recommendation, decode
    from streams.app import faust_app_kwargs

    registry = CollectorRegistry() if registry is None else registry
    events = PCounter("memento_stream_events_total", "Events decoded by the trivial agent", ["type"],
                      registry=registry)
    assigned = Gauge("memento_stream_assigned_partitions", "Input partitions assigned", ["topic"],
                     registry=registry)
    t = settings.topics
    app = faust.App(app_id, store="memory://", datadir=datadir, **faust_app_kwargs(settings))
    source = app.topic(t.actions, t.recommendations, key_serializer="raw", value_serializer="raw")
    by_topic = {t.actions: (Action, events.labels("action")),
                t.recommendations: (Recommendation, events.labels("recommendation"))}

    sends = [[o.topic, o.per_event, b"x" * o.value_bytes, 0.0] for o in outputs]  # credit last

    @app.agent(source)
    async def count(stream):
        producer = app.producer
        async for event in stream.events():
            schema, counter = by_topic[event.message.topic]
            decode(schema, event.value)
            counter.inc()
            for send in sends:
                send[3] += send[1]
                while send[3] >= 1.0:
                    send[3] -= 1.0
                    await producer.send(send[0], event.message.key, send[2], partition=None,
                                        timestamp=None, headers=None)

    @app.timer(interval=1.0)
    async def report():
        tps = app.consumer.assignment()
        for topic in (t.actions, t.recommendations):
            assigned.labels(topic).set(sum(tp.topic == topic for tp in tps))

    return app


def _run_agent(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.stream_bench agent")
    p.add_argument("--app-id", required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--datadir", required=True)
    p.add_argument("--outputs", default="[]", help="JSON list of Output fields (what to send per event)")
    a = p.parse_args(argv)
    from faust import Worker
    from prometheus_client import CollectorRegistry, start_http_server

    from memento.config import Settings

    registry = CollectorRegistry()  # not the default one, where streams.app's metrics live
    start_http_server(a.metrics_port, addr="127.0.0.1", registry=registry)
    outputs = [Output(**o) for o in json.loads(a.outputs)]
    app = trivial_app(Settings.from_env(), a.app_id, a.datadir, registry=registry, outputs=outputs)
    worker = Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None  # as in streams.worker: no root logger at DEBUG
    worker.execute_from_commandline()
    return 0


# -- profile ----------------------------------------------------------------------------------
def summarise_profile(collapsed: str, top: int = 12) -> dict:
    """Summary of a py-spy ``--format raw`` profile (collapsed stacks ``frame;frame;... count``):
    the share of samples by the package of the innermost frame, and the functions with the
    largest self time.

    >>> s = summarise_profile("main (a.py:1);run (site-packages/faust/x.py:2) 3\\n"
    ...                       "main (a.py:1);loads (json/decoder.py:9) 1\\n")
    >>> s["self_share_by_package"]
    {'faust': 0.75, 'json': 0.25}
    """
    by_package: Counter = Counter()
    by_function: Counter = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        leaf = stack.split(";")[-1]
        total += n
        by_function[leaf] += n
        by_package[_package(leaf)] += n
    if not total:
        return {"samples": 0}
    return {"samples": total,
            "self_share_by_package": {k: round(v / total, 3) for k, v in by_package.most_common()},
            "top_self": [[f, round(v / total, 3)] for f, v in by_function.most_common(top)]}


def _package(frame: str) -> str:
    m = re.search(r"\((.*?):\d+\)", frame)
    path = m.group(1) if m else frame
    if "site-packages/" in path:
        return path.split("site-packages/")[1].split("/")[0].removesuffix(".py")
    for own in ("streams", "memento"):
        if f"{own}/" in path:
            return own
    parts = path.replace("\\", "/").split("/")
    return parts[-2] if len(parts) > 1 and parts[-2] not in ("", "lib") and not parts[-2].startswith("python") \
        else parts[-1].removesuffix(".py")


# -- phases -----------------------------------------------------------------------------------
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


class _TransitionReader(threading.Thread):
    """Reads a transitions topic from the beginning (or from its end as it is when made), noting
    when each record was first read."""

    def __init__(self, settings, from_end: bool = False):
        super().__init__(daemon=True, name="transition-reader")
        from kafka import KafkaConsumer, TopicPartition

        from memento.kafka_io import client_kwargs, fetch_kwargs

        self.consumer = KafkaConsumer(**client_kwargs(settings), **fetch_kwargs(settings), enable_auto_commit=False,
                                      group_id=None)
        topic = settings.topics.transitions
        parts = self.consumer.partitions_for_topic(topic) or set(range(PARTITIONS))
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        if from_end:
            self.consumer.seek_to_end()
            for tp in tps:
                self.consumer.position(tp)  # resolve the end offsets now, not at the first poll
        else:
            self.consumer.seek_to_beginning()
        self.seen: dict[str, tuple[float, float, bool]] = {}  # id → (read at, reward, done)
        self.created: dict[str, float] = {}  # id → the record's timestamp (set by the worker's producer)
        self.copies: Counter = Counter()
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            self._read()
        except BaseException as exc:  # reported by snapshot()
            self.error = exc

    def _read(self) -> None:
        while not self._halt.is_set():
            # a short blocking poll (not 0: kafka-python sends fetches only inside a poll that
            # may wait); on noida an empty fetch returns at once, so pause after one
            records = self.consumer.poll(timeout_ms=5)
            now = time.time()
            if not records:
                time.sleep(0.005)
                continue
            with self.lock:
                for batch in records.values():
                    for m in batch:
                        body = json.loads(m.value)
                        tid = body["transition_id"]
                        self.copies[tid] += 1
                        self.seen.setdefault(tid, (now, body["reward"], body["done"]))
                        self.created.setdefault(tid, m.timestamp / 1000.0)

    def snapshot(self) -> dict[str, tuple[float, float, bool]]:
        if self.error is not None:
            raise RuntimeError(f"transition reader failed: {self.error!r}") from self.error
        with self.lock:
            return dict(self.seen)

    def close(self) -> None:
        self._halt.set()
        self.join(5)
        self.consumer.close()


def _wait_for(reader: _TransitionReader, ids: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        seen = reader.snapshot()
        if ids <= set(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


class _Bench:
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


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(max(1, seconds))),
                             "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def run(args: argparse.Namespace) -> dict:
    """Run every phase; returns (and writes to ``--json``) the figures."""
    from streams.app import USERS_TABLE

    figures: dict = {"events": args.events, "users": args.users, "window_s": args.window,
                     "allowed_lateness_s": args.lateness, "session_gap_s": args.session_gap,
                     "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())}
    bench = _Bench(args)
    figures["broker"] = args.bootstrap_servers or args.engine
    try:
        batches, events = bench.events("t")
        total = sum(len(b) for b in batches)
        expected = emission_times(events.produced, window_s=args.window, lateness_s=args.lateness,
                                  session_gap_s=args.session_gap)

        # 1. one worker, draining a backlog
        one = _Phase(bench, "one")
        started = time.time()
        figures["produce_per_s"] = round(total / (one.produce(batches) - started), 1)
        (worker,) = one.start_workers(1)
        spies = []
        if args.profile > 0:
            rate = one.drain(total, at_tenth=lambda: spies.append(
                _profile(worker.pid, args.profile, bench.work / "profile.txt")))
        else:
            rate = one.drain(total)
        spy = spies[0] if spies else None
        figures["events_per_s"] = round(rate, 1)
        print(f"one worker: {rate:.0f} events/s (producer {figures['produce_per_s']:.0f}/s)", flush=True)
        if spy is not None:
            spy.wait(args.profile + 30)
            path = bench.work / "profile.txt"
            figures["profile"] = summarise_profile(path.read_text()) if path.exists() else {"error": "no output"}
            print(f"profile: {json.dumps(figures['profile'])}", flush=True)

        reader = _TransitionReader(one.settings)
        reader.start()
        one_seen = _wait_for(reader, set(expected), timeout=120)
        reader.close()
        one_result = {tid: one_seen[tid][1:] for tid in expected if tid in one_seen}
        figures["duplicate_transitions"] = sum(n - 1 for n in reader.copies.values())
        # what the worker produced per input event while its rate was measured: the producing
        # trivial agent (phase 5) sends as much
        t = one.settings.topics
        outputs = measure_outputs(one.settings, {
            "changelog": f"{one.app_id}-{USERS_TABLE}-changelog", "transitions": t.transitions,
            "cases": t.cases, "dead_letter": t.dead_letter}, one.span, 0.8 * total)
        figures["outputs_per_event"] = round(sum(o.per_event for o in outputs), 3)
        figures["outputs"] = {o.role: {"per_event": o.per_event, "value_bytes": o.value_bytes} for o in outputs}
        print(f"worker outputs per input event: {figures['outputs']}", flush=True)
        reader = _TransitionReader(one.settings, from_end=True)
        reader.start()

        # 2. latency, same worker and topics: event time = production time
        lat = BenchEvents(args.users, args.item_dim, "l", seed=args.seed + 1)
        topic = {"action": t.actions, "recommendation": t.recommendations}
        rate_target = args.latency_rate or max(50.0, figures["events_per_s"] / 2)
        sent, t0 = 0, time.time()
        while time.time() - t0 < args.latency_duration:
            delay = t0 + sent / rate_target - time.time()
            if delay > 0:
                time.sleep(delay)
            for role, key, value, p in lat.moment(time.time()):
                bench.producer.send(topic[role], key=key, value=value, partition=p.partition)
                sent += 1
        bench.producer.flush()
        phase_s = time.time() - t0
        allowed = emission_times([p for p in events.produced] + lat.produced, window_s=args.window,
                                 lateness_s=args.lateness, session_gap_s=args.session_gap)
        allowed = {tid: w for tid, w in allowed.items() if tid.startswith("l-")}
        seen = _wait_for(reader, set(allowed), timeout=30)
        reader.close()
        latencies = [(seen[tid][0] - w) * 1e3 for tid, w in allowed.items() if tid in seen]
        # split: emittable → sent by the worker (record timestamp), sent → read
        sent_ms = [(reader.created[tid] - w) * 1e3 for tid, w in allowed.items() if tid in reader.created]
        read_ms = [(seen[tid][0] - reader.created[tid]) * 1e3 for tid in allowed if tid in reader.created]
        figures["latency"] = {
            "to_send_p50_ms": round(percentile(sent_ms, 50), 1) if sent_ms else None,
            "send_to_read_p50_ms": round(percentile(read_ms, 50), 1) if read_ms else None,
            "rate_per_s": round(sent / phase_s, 1), "duration_s": round(phase_s, 1),
            "transitions": len(latencies), "missing": len(set(allowed) - set(seen)),
            "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
            "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
            "max_ms": round(max(latencies), 1) if latencies else None}
        figures["latency_p50_ms"] = figures["latency"]["p50_ms"]
        figures["latency_p99_ms"] = figures["latency"]["p99_ms"]
        print(f"latency at {figures['latency']['rate_per_s']:.0f} events/s: {figures['latency']}", flush=True)
        bench.group.stop_all()
        bench.group.processes.clear()

        # 3. two workers, same input as phase 1. A group can stall on a rebalance (noida,
        # docs/embedded-brokers.md): give it 5 times the one-worker drain time, then go on.
        two = _Phase(bench, "two")
        two.start_workers(2)
        figures["transitions_expected"] = len(expected)
        figures["one_worker_transitions"] = len(one_result)
        try:
            two.wait_assigned()  # noida stalls a rebalance among busy members: join while idle
            two.produce(batches)
            rate = two.drain(total, timeout=max(60.0, 5 * total / figures["events_per_s"]))
        except RuntimeError as exc:
            figures["two_workers_error"] = str(exc)
            figures["two_workers_shares"] = [_consumed([p]) for p in two.ports]
            print(f"two workers: {exc} (shares {figures['two_workers_shares']})", flush=True)
        else:
            figures["two_workers_events_per_s"] = round(rate, 1)
            figures["two_workers_shares"] = [_consumed([p]) for p in two.ports]
            reader = _TransitionReader(two.settings)
            reader.start()
            two_seen = _wait_for(reader, set(expected), timeout=120)
            reader.close()
            two_result = {tid: two_seen[tid][1:] for tid in expected if tid in two_seen}
            figures["two_workers_transitions"] = len(two_result)
            figures["two_workers_match_one"] = (bool(expected) and one_result == two_result
                                                and len(one_result) == len(expected))
            differ = sorted(tid for tid in expected if one_result.get(tid) != two_result.get(tid))
            figures["two_workers_differ"] = len(differ)  # (reward, done) of one worker, of two
            figures["two_workers_differ_examples"] = {tid: [one_result.get(tid), two_result.get(tid)]
                                                      for tid in differ[:5]}
            part = {p.request_id: p.partition for p in events.produced if p.role == "recommendation"}
            figures["two_workers_differ_partitions"] = dict(sorted(Counter(part[tid] for tid in differ).items()))
            if differ:  # (partition, one worker's, two workers', the rules' (reward, done))
                truth = _truth(batches, args, set(differ))
                (bench.work / "two_workers_differ.json").write_text(json.dumps(
                    {tid: [part[tid], one_result.get(tid), two_result.get(tid), truth.get(tid)]
                     for tid in differ}))
            print(f"two workers: {rate:.0f} events/s; transitions {len(two_result)}/{len(expected)}, "
                  f"same as one worker: {figures['two_workers_match_one']}", flush=True)
        bench.group.stop_all()
        bench.group.processes.clear()

        # 4. baseline: trivial agent
        base = _Phase(bench, "base")
        base.produce(batches)
        base.start_agent()
        rate = base.drain(total)
        figures["baseline"] = {"events_per_s": round(rate, 1)}
        print(f"baseline (trivial Faust agent): {rate:.0f} events/s", flush=True)
        bench.group.stop_all()
        bench.group.processes.clear()

        # 5. baseline with output: the trivial agent, sending what the worker sent
        floor = _Phase(bench, "floor")
        floor.produce(batches)
        floor.start_agent(outputs)
        rate = floor.drain(total)
        figures["baseline_with_output"] = {"events_per_s": round(rate, 1),
                                           "outputs_per_event": figures["outputs_per_event"]}
        print(f"baseline with output (trivial agent sending {figures['outputs_per_event']} records "
              f"per event): {rate:.0f} events/s", flush=True)
        bench.group.stop_all()
        bench.group.processes.clear()

        # 6. ceiling: kafka-python drains the baseline's topics
        figures["ceiling"] = {"events_per_s": round(_ceiling(base.settings, total), 1)}
        print(f"ceiling (kafka-python): {figures['ceiling']['events_per_s']:.0f} events/s", flush=True)
        for key, reference in (("ratio_to_baseline", "baseline"),
                               ("ratio_to_baseline_with_output", "baseline_with_output")):
            figures[key] = round(figures["events_per_s"] / figures[reference]["events_per_s"], 3)
            if "two_workers_events_per_s" in figures:
                figures[f"two_workers_{key}"] = round(
                    figures["two_workers_events_per_s"] / figures[reference]["events_per_s"], 3)
    finally:
        figures["loadavg_end"] = list(os.getloadavg())
        bench.close()
    # A bench that cannot read back what it must check has measured nothing: say so, and fail.
    problems = []
    if figures.get("one_worker_transitions") != figures.get("transitions_expected"):
        problems.append(f"one worker: read back {figures.get('one_worker_transitions')} of "
                        f"{figures.get('transitions_expected')} transitions")
    if "two_workers_transitions" in figures and figures["two_workers_transitions"] != figures["transitions_expected"]:
        problems.append(f"two workers: read back {figures['two_workers_transitions']} of "
                        f"{figures['transitions_expected']} transitions")
    figures["read_back_problems"] = problems
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    for problem in problems:
        print(f"memento bench stream: FAILED: {problem}", file=sys.stderr, flush=True)
    return figures


def _truth(batches, args, ids: set[str]) -> dict[str, list]:
    """(reward, done) of the recommendations ``ids`` from the rules applied to all the events
    (diagnostic: which of two differing runs is right)."""
    from memento.config import RewardWeights
    from memento.schemas import Action, Recommendation, decode

    weights, acts, times, recs = RewardWeights(), defaultdict(list), defaultdict(list), []
    for batch in batches:
        for role, _, value, p in batch:
            times[p.user].append(p.ts)
            if role == "action":
                a = decode(Action, value)
                acts[a.user_id].append((a.item_id, a.action, a.ts))
            elif p.request_id in ids:
                recs.append(decode(Recommendation, value))
    out = {}
    for r in recs:
        end = r.ts + args.window
        reward = max((weights.weight(k) for i, k, ts in acts[r.user_id] if i == r.item_id and r.ts <= ts <= end),
                     default=0.0)
        done = args.session_gap > 0 and not any(end < ts <= end + args.session_gap for ts in times[r.user_id])
        out[r.request_id] = [reward, done]
    return out


def _ceiling(settings, total: int) -> float:
    from kafka import KafkaConsumer

    from memento.kafka_io import client_kwargs, fetch_kwargs

    consumer = KafkaConsumer(settings.topics.actions, settings.topics.recommendations,
                             **client_kwargs(settings), **fetch_kwargs(settings), group_id=None,
                             auto_offset_reset="earliest",
                             enable_auto_commit=False)
    n, first, first_n = 0, None, 0
    deadline = time.monotonic() + 120
    try:
        while n < total and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=500)
            n += sum(len(batch) for batch in records.values())
            if first is None and n:
                first, first_n = time.time(), n
        last = time.time()
    finally:
        consumer.close()
    if n < total:
        raise RuntimeError(f"ceiling: read {n} of {total} events")
    return (n - first_n) / (last - first)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "agent":
        return _run_agent(argv[1:])
    parser = argparse.ArgumentParser(prog="memento bench stream", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    figures = run(parser.parse_args(argv))
    return 1 if figures.get("read_back_problems") else 0


if __name__ == "__main__":
    sys.exit(main())
