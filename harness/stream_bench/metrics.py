"""What the bench reads from its processes' Prometheus endpoints (the worker's and the trivial
agent's export the same names): events consumed, partitions assigned."""

from __future__ import annotations

import time

from harness.stream_bench.events import PARTITIONS
from memento.exposition import Sample, metric_sum, scrape

__all__ = ["wait_until_assigned"]


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
