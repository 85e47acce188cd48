"""A consumer with a large backlog on noida. noida answers one fetch with the whole backlog of a
partition, whatever the fetch limits ask; kafka-python refuses an answer over its 100 MB frame
guard (``InvalidReceiveError: Invalid frame length``), reconnects and asks again, forever.
Before the fix such a consumer (the stream bench's reader, a restarted learner) read nothing."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer

from harness.broker import EmbeddedBroker
from memento.kafka_io import make_consumer

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(180)]


def test_a_consumer_reads_a_backlog_larger_than_the_frame_guard(tmp_path):
    n, blob = 1100, b"x" * 100_000  # 110 MB in one partition
    with EmbeddedBroker("noida", 0, str(tmp_path / "broker")) as broker:
        settings = broker.settings()
        producer = KafkaProducer(bootstrap_servers=[broker.bootstrap], max_request_size=2_000_000,
                                 linger_ms=50, batch_size=1_000_000)
        for _ in range(n):
            producer.send(settings.topics.transitions, blob, partition=0)
        producer.flush()
        producer.close()
        consumer = make_consumer(settings, [settings.topics.transitions], group_id=None)
        read, deadline = 0, time.monotonic() + 90
        while read < n and time.monotonic() < deadline:
            read += sum(len(records) for records in consumer.poll(timeout_ms=500).values())
        consumer.close()
    assert read == n
