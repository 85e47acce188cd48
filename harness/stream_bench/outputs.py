"""What the worker produces per input event (:class:`Output`, :func:`measure_outputs`): the
producing trivial agent of the baseline with output sends as much."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

__all__ = ["Output", "measure_outputs"]


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
                    quiet_s: float = 1.0, timeout: float = 60.0, frame_guard: int | None = None) -> list[Output]:
    """What the worker produced while it processed ``events`` input events in the wall-time
    ``span`` (the records whose producer timestamp falls in it), read back from its output
    topics (``role → topic``), one partition at a time, each until nothing new arrived for
    ``quiet_s`` since its last record (the end offsets are not used: Tansu's are wrong). Roles
    with no record in the span are left out.

    One partition at a time because noida answers a fetch with everything from the offset to
    the end of every partition asked for (docs/embedded-brokers.md): after 200,000 input events
    the worker's changelog alone made a 1.4 GB answer, over the 1 GiB frame guard of
    :func:`memento.kafka_io.fetch_kwargs`, and the read got nothing. ``frame_guard`` replaces
    that guard (bytes; a test makes it small)."""
    from kafka import KafkaConsumer, TopicPartition

    from memento.kafka_io import client_kwargs, fetch_kwargs

    fetch = fetch_kwargs(settings)
    if frame_guard is not None:
        fetch["receive_message_max_bytes"] = frame_guard
    consumer = KafkaConsumer(**client_kwargs(settings), **fetch, enable_auto_commit=False, group_id=None)
    records: Counter = Counter()
    size: Counter = Counter()
    try:
        partitions = {topic: sorted(consumer.partitions_for_topic(topic) or ()) for topic in topics.values()}
        for topic, numbers in partitions.items():
            for number in numbers:
                tp = TopicPartition(topic, number)
                consumer.assign([tp])
                consumer.seek_to_beginning(tp)
                start, last = time.monotonic(), None  # quiet counts from the first record read
                while last is None or time.monotonic() - last < quiet_s:
                    if time.monotonic() - start > timeout:
                        if last is None:
                            break  # nothing at all
                        raise RuntimeError(f"measure_outputs: {tp} still growing after {timeout:.0f}s")
                    polled = consumer.poll(timeout_ms=100)
                    if not polled:
                        time.sleep(0.01)  # noida answers an empty fetch at once
                    for batch in polled.values():
                        last = time.monotonic()
                        inside = [m for m in batch if span[0] <= m.timestamp / 1000.0 <= span[1]]
                        records[topic] += len(inside)
                        size[topic] += sum(len(m.value or b"") for m in inside)
    finally:
        consumer.close()
    return [Output(role, topic, len(partitions[topic]), round(records[topic] / events, 4),
                   round(size[topic] / records[topic]))
            for role, topic in topics.items() if records[topic]]
