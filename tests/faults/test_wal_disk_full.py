"""A disk that fills up in the middle of a WAL append. Before the fix the partial record stayed
in the file and later records were appended after it: they were acknowledged (synced), and the
next replay stopped at the partial record and cut them off."""

from __future__ import annotations

import errno
import os

import pytest

from memory_store import wal as wal_module
from memory_store.wal import WriteAheadLog

pytestmark = pytest.mark.faults


def test_a_failed_append_is_rolled_back_and_the_log_refuses_writes_until_reopened(tmp_path, monkeypatch):
    path = tmp_path / "wal.log"
    log = WriteAheadLog(path)
    log.sync(log.append([(1, 1, b"acknowledged before")]))
    real_write = os.write

    def disk_full(fd, data):  # half the bytes make it to disk, then ENOSPC
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_module.os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        log.append([(2, 1, b"x" * 1000)])
    monkeypatch.setattr(wal_module.os, "write", real_write)
    assert os.path.getsize(path) == log.size_bytes  # the partial record is gone
    with pytest.raises(OSError, match="refuses writes"):  # no later record is acknowledged on top of it
        log.append([(3, 1, b"after")])
    log.close()

    reopened = WriteAheadLog(path)
    assert [(r.lsn, r.payload) for r in reopened.replay()] == [(1, b"acknowledged before")]
    reopened.sync(reopened.append([(3, 1, b"after")]))
    reopened.close()
    assert [r.lsn for r in WriteAheadLog(path).replay()] == [1, 3]


def test_a_failing_snapshot_keeps_the_background_loop_alive(tmp_path, monkeypatch):
    """The bank's snapshot loop used to die on the first OSError (a full disk): the logs then
    grew without bound, unnoticed. Now a failure is logged and counted, and the loop tries again."""
    import time

    import numpy as np

    from memory_store import CaseBank, metrics
    from memory_store import shard as shard_module

    bank = CaseBank(tmp_path / "bank", 4, num_shards=1, snapshot_interval_s=0.05, name="snapfail")
    failures = {"left": 2}
    real = shard_module.Shard._snapshot

    def flaky(self):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(shard_module.Shard, "_snapshot", flaky)
    rng = np.random.default_rng(0)
    states = rng.standard_normal((5, 4))
    bank.add_arrays([f"c{i}" for i in range(5)], states, "item", states, 1.0, 0.0)
    deadline = time.monotonic() + 20
    while bank.stats()["shards"][0]["wal_bytes"] > 0:  # emptied by the first snapshot that succeeds
        assert time.monotonic() < deadline, "the snapshot loop stopped"
        time.sleep(0.05)
    assert metrics.SNAPSHOT_FAILURES.labels("snapfail")._value.get() == 2
    bank.close()


def test_a_corrupt_record_mid_log_loses_only_itself(tmp_path):
    """A flipped byte inside a record with valid records after it is not a torn tail. Before the
    fix the replay stopped there and truncated the file: every later acknowledged record was
    silently gone. Now only the damaged record is skipped (counted); a torn tail is still cut."""
    path = tmp_path / "wal.log"
    log = WriteAheadLog(path)
    for lsn in (1, 2, 3):
        log.sync(log.append([(lsn, 1, f"record {lsn} ".encode() * 20)]))
    log.close()
    data = bytearray(path.read_bytes())
    second = len(data) // 3 + 40  # inside record 2's payload
    data[second] ^= 0xFF
    data += b"\x07\x00\x00"  # and a torn tail after record 3
    path.write_bytes(bytes(data))

    reopened = WriteAheadLog(path)
    assert [r.lsn for r in reopened.replay()] == [1, 3]
    record = len(data[:-3]) // 3
    assert reopened.corrupt_bytes == record and reopened.truncated_bytes == 3
    reopened.sync(reopened.append([(4, 1, b"next")]))
    reopened.close()
    assert [r.lsn for r in WriteAheadLog(path).replay()] == [1, 3, 4]


def test_a_corrupt_snapshot_no_longer_makes_the_bank_unopenable(tmp_path):
    """Before the fix a snapshot that failed to load (bit rot, a truncated copy) raised from the
    shard's constructor: the bank, so serving or the learner, could not start again. Now it is
    set aside, the shard opens from its log, and the metric says so."""
    import numpy as np

    from memory_store import CaseBank

    path = tmp_path / "bank"
    rng = np.random.default_rng(0)
    with CaseBank(path, 4, num_shards=1, snapshot_on_close=False) as bank:
        states = rng.standard_normal((10, 4))
        bank.add_arrays([f"old{i}" for i in range(10)], states, "item", states, 1.0, 0.0)
        bank.snapshot()
        more = rng.standard_normal((3, 4))
        bank.add_arrays([f"new{i}" for i in range(3)], more, "item", more, 1.0, 0.0)  # in the log only
    snapshot = next(path.rglob("snapshot.npz"))
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # truncated
    with CaseBank(path, 4, num_shards=1) as bank:
        assert sorted(c for c in [f"new{i}" for i in range(3)] if c in bank) == ["new0", "new1", "new2"]
        assert "old0" not in bank  # until added again (serving re-reads the cases topic)
        shard = bank.stats()["shards"][0]
        assert shard["snapshot_error"] and "snapshot.npz.corrupt" in shard["snapshot_error"]
        states = rng.standard_normal((10, 4))
        bank.add_arrays([f"old{i}" for i in range(10)], states, "item", states, 1.0, 0.0)
        assert len(bank) == 13
    assert (snapshot.parent / "snapshot.npz.corrupt").exists()
