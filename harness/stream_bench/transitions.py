"""Reading back the transitions a phase's workers emitted (:class:`_TransitionReader`), and
waiting until the expected ones are in (:func:`_wait_for`)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from harness.stream_bench.events import PARTITIONS


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
