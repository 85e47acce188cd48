"""Small fakes and file helpers shared by test modules of several components. (No tests here.)"""

from __future__ import annotations

import csv
from pathlib import Path


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
