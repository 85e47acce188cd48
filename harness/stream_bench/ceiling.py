"""The ceiling: a plain kafka-python consumer draining a backlog, counting messages without
decoding."""

from __future__ import annotations

import time


def _ceiling(settings, total: int) -> float:
    """Messages/s of a kafka-python consumer (no group, from the beginning) reading ``total``
    messages from the actions and recommendations topics of ``settings``, from the first
    message read to the last; raises :class:`RuntimeError` if it has not read them in 120 s."""
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
