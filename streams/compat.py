"""Every place the stream worker reaches into Faust's or aiokafka's internals, in one module.

Faust (faust-streaming 0.15.3, pinned) has no public accessor for what the worker needs to be
correct: the offsets its consumer holds as committed and as read, when a partition's high
watermark was last answered, the result of a commit (it records a refused commit as done), and
the event whose partition a table write goes to. Each is one small function here, so an upgrade
of Faust is checked against this file alone.
"""

from __future__ import annotations

import weakref
from typing import Any, Awaitable, Callable, Iterable, Mapping

from faust.streams import _current_event
from faust.types import TP, EventT

__all__ = ["committed_offset", "read_offset", "fetch_answered_ms", "on_commit_result", "set_current_event",
           "mark_acknowledged", "set_producer_buffer", "without_write_ahead_log"]


def committed_offset(consumer, tp: TP) -> int | None:
    """The offset Faust's consumer records as committed for ``tp`` (None: none)."""
    return consumer._committed_offset.get(tp)


def read_offset(consumer, tp: TP) -> int | None:
    """The offset of the last message of ``tp`` Faust's consumer handed to the stream."""
    return consumer._read_offset.get(tp)


def fetch_answered_ms(consumer, tp: TP) -> float | None:
    """Wall time (ms) of the latest fetch answer for ``tp``, which set its high watermark
    (aiokafka's ``last_poll_timestamp``). Raises AttributeError under a consumer driver that is
    not aiokafka's thread."""
    return consumer._thread._ensure_consumer().last_poll_timestamp(tp)


def on_commit_result(consumer, callback: Callable[[Mapping[TP, int], dict[TP, int | None], bool], None]) -> None:
    """Call ``callback(offsets, committed_before, done)`` after each commit the consumer makes:
    Faust's ``_commit_offsets`` updates its committed offsets whatever the broker answered, so
    ``done`` (the broker's answer) is the only way to know a commit was refused."""
    commit_offsets: Callable[..., Awaitable[bool]] = consumer._commit_offsets

    async def _commit_offsets(offsets, start_new_transaction: bool = True) -> bool:
        before = {tp: committed_offset(consumer, tp) for tp in offsets}
        done = await commit_offsets(offsets, start_new_transaction=start_new_transaction)
        callback(offsets, before, done)
        return done

    consumer._commit_offsets = _commit_offsets


def set_current_event(event: EventT) -> None:
    """Make ``event`` the stream's current event: a table's reads and writes go to its partition
    (Faust takes the partition from a context variable the stream sets per event)."""
    _current_event.set(weakref.ref(event))


def mark_acknowledged(events: Iterable[EventT]) -> None:
    """Mark events as acknowledged already, so that their offsets never reach the consumer's
    commit list (Faust's ``take_events`` acknowledges a batch even when its body raised)."""
    for event in events:
        event.message.acked = True


def set_producer_buffer(app: Any, max_messages: int) -> None:
    """How many records Faust's producer buffer queues before the stream waits for it to drain."""
    app.producer.buffer.max_messages = max_messages


def without_write_ahead_log(table: Any) -> bool:
    """Open ``table``'s RocksDB databases (one per partition, opened when first used) without
    RocksDB's write-ahead log; False, changing nothing, for a store that is not RocksDB.

    The changelog topic is the table's log already: a worker restarted after a crash reads the
    changelog from the offset its database holds as persisted (Faust writes that offset into the
    same database as the values), so whatever the database lost with its unflushed memtable is
    read again from the changelog, as it is for a fresh store. RocksDB flushes the memtable when
    a database is closed. Without the log a write costs a memtable insert instead of a write
    to the log file too; Faust writes twice per table update (the value, then the changelog
    offset once the record is acknowledged)."""
    options = getattr(table.data, "rocksdb_options", None)
    if options is None or not getattr(options, "use_rocksdict", False):
        return False
    import rocksdict

    open_db = options.open

    def open_without_wal(path, *, read_only: bool = False):
        db = open_db(path, read_only=read_only)
        write_options = rocksdict.WriteOptions()
        write_options.disable_wal = True
        db.set_write_options(write_options)
        return db

    options.open = open_without_wal
    return True
