"""Small fakes, file helpers and per-test Kafka settings shared by test modules of several components."""

from __future__ import annotations

import csv
import uuid
from pathlib import Path

from memento.config import Settings, TopicNames
from memento.kafka_io import ensure_topics


class RecordingProducer:
    """Stands in for a Kafka producer where a test only needs what was sent: ``sent`` holds
    ``(topic, key, value)`` in order; ``flush`` does nothing."""

    def __init__(self):
        self.sent: list[tuple] = []

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))

    def flush(self, timeout=None):
        pass


def write_csv(path: Path, header, rows) -> Path:
    """Write ``header`` and ``rows`` as a CSV file at ``path``; returns ``path``."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def fresh_settings(broker, tmp_path: Path, **overrides) -> Settings:
    """Settings for ``broker`` (:class:`harness.broker.EmbeddedBroker`) with topic names unique
    to one test, created on it; data and checkpoints under ``tmp_path``, 8-dimensional items."""
    topics = TopicNames().prefixed(f"t{uuid.uuid4().hex[:8]}")
    settings = broker.settings(topics=topics, **{"data_dir": str(tmp_path / "data"),
                                                 "checkpoint_dir": str(tmp_path / "ckpt"), "item_dim": 8, **overrides})
    ensure_topics(settings)
    return settings
