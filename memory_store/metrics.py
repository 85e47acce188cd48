"""Prometheus metrics of every open case bank, in the default registry.

Counters and the latency histogram are updated as work happens; per-shard gauges (cases, index
type, snapshot age, WAL size, adds/s) are read from the open banks at scrape time.

>>> from prometheus_client import generate_latest
>>> b"memento_casebank_search_seconds" in generate_latest()
True
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = ["ADDS", "EVICTIONS", "SEARCH_SECONDS", "SEARCHES", "SNAPSHOT_FAILURES", "register_bank"]

ADDS = Counter("memento_casebank_adds", "Cases newly added to the case bank", ["bank"])
EVICTIONS = Counter("memento_casebank_evictions", "Cases evicted from full shards", ["bank"])
SEARCHES = Counter("memento_casebank_search_queries", "Query vectors searched", ["bank"])
SNAPSHOT_FAILURES = Counter("memento_casebank_snapshot_failures", "Background snapshots that failed (disk full, "
                            "I/O error); the write-ahead log keeps every record and the next one tries again",
                            ["bank"])
SEARCH_SECONDS = Histogram(
    "memento_casebank_search_seconds", "Latency of one CaseBank.search call (all shards, merged)",
    ["bank"], buckets=(5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0))

_banks: "weakref.WeakSet" = weakref.WeakSet()
_banks_lock = threading.Lock()


def register_bank(bank) -> None:
    with _banks_lock:
        _banks.add(bank)


class _BankCollector:
    def collect(self):
        cases = GaugeMetricFamily("memento_casebank_cases", "Cases per shard", labels=["bank", "shard"])
        index_type = GaugeMetricFamily("memento_casebank_index_type",
                                       "1 for the index type a shard currently searches",
                                       labels=["bank", "shard", "type"])
        snapshot_age = GaugeMetricFamily("memento_casebank_snapshot_age_seconds",
                                         "Seconds since the shard's last snapshot", labels=["bank", "shard"])
        wal_bytes = GaugeMetricFamily("memento_casebank_wal_bytes", "Size of the shard's write-ahead log",
                                      labels=["bank", "shard"])
        wal_truncated = GaugeMetricFamily("memento_casebank_wal_truncated_bytes", "Bytes of a torn or "
                                          "corrupt log tail cut off when the shard was opened", labels=["bank", "shard"])
        wal_corrupt = GaugeMetricFamily("memento_casebank_wal_corrupt_bytes", "Bytes of corrupt records "
                                        "with valid records after them, skipped when the shard was opened",
                                        labels=["bank", "shard"])
        snapshot_corrupt = GaugeMetricFamily("memento_casebank_snapshot_set_aside", "1 when the shard's "
                                             "snapshot could not be read at open and was set aside",
                                             labels=["bank", "shard"])
        wal_failed = GaugeMetricFamily("memento_casebank_wal_failed", "1 once the shard's log refuses "
                                       "writes after a failed append or fsync (until reopened)",
                                       labels=["bank", "shard"])
        adds_rate = GaugeMetricFamily("memento_casebank_adds_per_second",
                                      "Cases added per second over the last window", labels=["bank"])
        with _banks_lock:
            banks = list(_banks)
        for bank in banks:
            try:
                stats = bank.stats()
            except RuntimeError:  # closed
                continue
            name = stats["name"]
            adds_rate.add_metric([name], stats["adds_per_s"])
            for shard in stats["shards"]:
                sid = str(shard["shard"])
                cases.add_metric([name, sid], shard["cases"])
                for kind in ("flat", "ivf", "hnsw"):
                    index_type.add_metric([name, sid, kind], 1.0 if shard["index_type"] == kind else 0.0)
                if shard["snapshot_age_s"] is not None:
                    snapshot_age.add_metric([name, sid], shard["snapshot_age_s"])
                wal_bytes.add_metric([name, sid], shard["wal_bytes"])
                wal_truncated.add_metric([name, sid], shard["wal_truncated_bytes"])
                wal_corrupt.add_metric([name, sid], shard["wal_corrupt_bytes"])
                snapshot_corrupt.add_metric([name, sid], 1.0 if shard.get("snapshot_error") else 0.0)
                wal_failed.add_metric([name, sid], 1.0 if shard.get("wal_failed") else 0.0)
        yield from (cases, index_type, snapshot_age, wal_bytes, wal_truncated, wal_corrupt, snapshot_corrupt,
                    wal_failed, adds_rate)


REGISTRY.register(_BankCollector())
