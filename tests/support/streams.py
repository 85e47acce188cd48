"""Helpers for the stream worker's integration tests: a scenario whose rewards and ``done`` flags
are known by construction, workers as processes, reading topics and metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


from harness.broker import free_port
from memento.config import Settings
from memento.kafka_io import make_consumer, make_producer, poll
from harness.processes import ManagedProcess, ProcessGroup, memento_command
from memento.schemas import Action, Recommendation, encode
from harness.stream_bench import wait_until_assigned
from support import common
from memento.exposition import Sample, metric_sum, scrape
from memento.kafka_io import partition_of

PARTITIONS = 4
# answer to recommendation i, by i % 4: (action, reward); None = no reaction
ANSWERS = {0: ("click", 1.0), 1: ("purchase", 5.0), 2: (None, 0.0), 3: ("cart", 3.0)}


fresh_settings = common.fresh_settings


@dataclass
class Scenario:
    """``n`` recommendations, 10 event-time seconds apart, round-robin over ``users`` users (so a
    user's recommendations are ``10 * users`` seconds apart, more than the window: their windows
    never overlap). Recommendation i is answered 5 s later on its item as ``ANSWERS[i % 4]`` says.
    With the session gap ``gap_s`` ≥ ``10 * users - window_s``, the user's next recommendation
    falls in the gap, so ``done`` is True exactly for each user's last recommendation (nothing
    of theirs follows). ``flush()`` moves every partition's watermark far past all windows.
    """

    n: int = 200
    users: int = 20
    window_s: float = 60.0
    d: int = 8
    t0: float = 1000.0

    @property
    def gap_s(self) -> float:
        return 10.0 * self.users

    def user(self, i: int) -> str:
        return f"u{i % self.users}"

    def rec(self, i: int) -> tuple[str, str, bytes]:
        r = Recommendation(request_id=f"r{i}", user_id=self.user(i), item_id=str(i % 5), case_id=f"c{i % 5}",
                           propensity=0.5, policy_version=1, ts=self.t0 + 10.0 * i,
                           state=[0.1 * (i % 7)] * self.d, case_features=[0.0] * (2 * self.d + 1))
        return ("recommendation", self.user(i), encode(r))

    def answer(self, i: int) -> list[tuple[str, str, bytes]]:
        action, _ = ANSWERS[i % 4]
        if action is None:
            return []
        a = Action(f"e{i}", self.user(i), str(i % 5), action, self.t0 + 10.0 * i + 5.0, f"r{i}")
        return [("action", self.user(i), encode(a))]

    def events(self, start: int, stop: int, *, skip_answers: range = range(0)) -> list[tuple[str, str, bytes]]:
        """Recommendations ``start..stop-1`` each followed by its answer (unless in ``skip_answers``)."""
        out = []
        for i in range(start, stop):
            out.append(self.rec(i))
            if i not in skip_answers:
                out.extend(self.answer(i))
        return out

    def organic(self, n: int, t0: float, t1: float) -> list[tuple[str, str, bytes]]:
        """``n`` actions of the scenario's users on items no recommendation names, at event times
        spread over [t0, t1): work for the worker that changes no reward and no ``done`` as long
        as [t0, t1) lies inside the window of no user's last recommendation."""
        return [("action", self.user(k), encode(Action(f"o{k}", self.user(k), f"o{k % 3}", "click",
                                                       t0 + (t1 - t0) * k / n)))
                for k in range(n)]

    def flush(self) -> list[tuple[str, str, bytes]]:
        """An action and a recommendation at event time 10⁶ on every partition (for users of
        their own, whose windows never close)."""
        out = []
        for p in range(PARTITIONS):
            user = next(f"flush{p}-{k}" for k in range(1000) if partition_of(f"flush{p}-{k}".encode(), PARTITIONS) == p)
            r = Recommendation(request_id=f"flush-{p}", user_id=user, item_id="x", case_id="c", propensity=0.5,
                               policy_version=1, ts=1e6, state=[0.0] * self.d, case_features=[0.0] * (2 * self.d + 1))
            out.append(("recommendation", user, encode(r)))
            out.append(("action", user, encode(Action(f"flush-e{p}", user, "x", "click", 1e6))))
        return out

    def expected(self) -> dict[str, tuple[float, bool]]:
        """Transition id → (reward, done)."""
        return {f"r{i}": (ANSWERS[i % 4][1], i >= self.n - self.users) for i in range(self.n)}


def produce(settings: Settings, events: list[tuple[str, str, bytes]]) -> None:
    """Send ``(role, user, value)`` events in order, each to its user's partition."""
    topic = {"action": settings.topics.actions, "recommendation": settings.topics.recommendations}
    producer = make_producer(settings)
    try:
        for role, user, value in events:
            producer.send(topic[role], key=user, value=value, partition=partition_of(user.encode(), PARTITIONS))
        producer.flush(30)
    finally:
        producer.close(5)


def start_worker(group: ProcessGroup, settings: Settings, tmp_path: Path, *, name: str, app_id: str,
                 worker_id: str = "0", extra: tuple[str, ...] = ()) -> tuple[ManagedProcess, int]:
    """``memento worker`` as a process with fast ticks (and ``extra`` arguments); returns it and
    its metrics port."""
    port = free_port()
    cmd = memento_command("worker", "--app-id", app_id, "--worker-id", worker_id, "--metrics-port", str(port),
                          "--tick-interval", "0.2", *extra)
    return group.start(name, cmd, env=settings.to_env(), log_dir=tmp_path / "logs"), port


def metrics(port: int) -> list[Sample]:
    """The samples the worker's metrics port serves now."""
    return scrape(f"http://127.0.0.1:{port}/metrics")


def metric(port: int, name: str, strict: bool = False, **labels) -> float:
    """Sum of the samples of ``name`` with ``labels`` (0 when the worker does not answer, unless
    ``strict``)."""
    try:
        samples = metrics(port)
    except OSError:
        if strict:
            raise
        return 0.0
    return metric_sum(samples, name, **labels)


def wait_ticks(port: int, ticks: int, timeout: float = 30.0, group: ProcessGroup | None = None) -> None:
    """Until the worker on ``port`` has handled ``ticks`` more of its own ticks than now. Each tick
    recomputes its partition's watermark and sends what that makes due, so whatever a wrong
    watermark would emit has been emitted once a few ticks per partition have gone by (a
    positive signal, instead of a fixed sleep before a "nothing more arrived" check)."""
    start = metric(port, "memento_stream_events_total", strict=True, type="tick")
    deadline = time.monotonic() + timeout
    while metric(port, "memento_stream_events_total", strict=True, type="tick") < start + ticks:
        assert time.monotonic() < deadline, f"the worker handled fewer than {ticks} ticks in {timeout:.0f} s"
        if group is not None:
            group.check()
        time.sleep(0.1)


def at_end(consumer, ends: dict) -> bool:
    """Whether ``consumer`` has read every partition up to ``ends`` (``consumer.end_offsets``)."""
    return all(consumer.position(tp) >= offset for tp, offset in ends.items())


def wait_assigned(group: ProcessGroup, settings: Settings, ports: list[int], timeout: float = 60.0) -> None:
    """Until the workers together hold every actions partition, each at least one, for 1.5 s."""
    wait_until_assigned(group, settings.topics.actions, ports, timeout)


def committed_offsets(settings: Settings, group_id: str, topic: str) -> dict[int, int | None]:
    """Partition → offset committed by consumer group ``group_id`` on ``topic``, None where the
    broker holds no commit (not 0: "nothing committed" is not "committed up to offset 0")."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers.split(","), group_id=group_id,
                             enable_auto_commit=False)  # never subscribes: does not join the group
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        consumer.close()


class TransitionLog:
    """Every transition on a topic, read from the beginning without a consumer group; with
    ``dead_letters``, the reasons of the dead-letter topic's records too (in ``dead``)."""

    def __init__(self, settings: Settings, topic: str | None = None, dead_letters: bool = False):
        self.settings = settings
        self.topic = topic or settings.topics.transitions
        topics = [self.topic] + ([settings.topics.dead_letter] if dead_letters else [])
        self.consumer = make_consumer(settings, topics, group_id=None)
        self.copies: dict[str, list[tuple[float, bool]]] = {}
        self.dead: list[str] = []

    def read(self, until, timeout: float, group: ProcessGroup | None = None) -> dict[str, list[tuple[float, bool]]]:
        """Read until ``until(copies)`` is true (or the timeout); returns id → [(reward, done)] per copy."""
        deadline = time.monotonic() + timeout
        while True:
            for batch in poll(self.consumer, self.settings, 200).values():
                for m in batch:
                    body = json.loads(m.value)
                    if m.topic == self.topic:
                        self.copies.setdefault(body["transition_id"], []).append((body["reward"], body["done"]))
                    else:
                        self.dead.append(body["reason"])
            if until(self.copies) or time.monotonic() > deadline:
                return self.copies
            if group is not None:
                group.check()

    def read_to_end(self, timeout: float = 30.0, group: ProcessGroup | None = None) -> dict[str, list[tuple[float, bool]]]:
        """Read everything the topics hold now (up to their end offsets at this call)."""
        self.read(lambda c: bool(self.consumer.assignment()), timeout=timeout, group=group)
        ends = self.consumer.end_offsets(list(self.consumer.assignment()))
        return self.read(lambda c: at_end(self.consumer, ends), timeout=timeout, group=group)

    def close(self) -> None:
        self.consumer.close()


def assert_exactly(copies: dict[str, list[tuple[float, bool]]], expected: dict[str, tuple[float, bool]]) -> int:
    """The distinct transition ids are exactly ``expected``'s and every copy of an id carries its
    expected (reward, done); returns the number of surplus copies (duplicates a consumer drops
    by id)."""
    assert set(copies) == set(expected), (f"missing {sorted(set(expected) - set(copies))[:10]}, "
                                          f"unexpected {sorted(set(copies) - set(expected))[:10]}")
    wrong = {tid: (c, expected[tid]) for tid, c in copies.items() if any(x != expected[tid] for x in c)}
    assert wrong == {}, f"wrong reward/done: {dict(list(wrong.items())[:10])}"
    return sum(len(c) - 1 for c in copies.values())
