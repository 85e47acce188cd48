"""Write-ahead log of one shard: length- and CRC-framed records with group-committed fsync.

Record layout (little endian): ``payload_len u32 | crc32 u32 | lsn u64 | type u8 | payload``; the
CRC covers lsn, type and payload. A record is acknowledged once :meth:`WriteAheadLog.sync` returns
after it was appended. On open, :meth:`WriteAheadLog.replay` reads records in order. A torn tail
(the last record cut short by a crash) is truncated, with a warning naming the file, byte offset
and reason, so the next append continues a valid log. A corrupt record with valid records after
it (a bad sector, a flipped bit) is not a torn write: the replay skips to the next record whose
header and CRC check out and goes on, so only the damaged record is lost; it logs an error and
counts the skipped bytes (:attr:`WriteAheadLog.corrupt_bytes`).

>>> import tempfile, pathlib
>>> wal = WriteAheadLog(pathlib.Path(tempfile.mkdtemp()) / "wal.log")
>>> wal.sync(wal.append([(1, 1, b"hello")]))
>>> [(r.lsn, r.payload) for r in wal.replay()]
[(1, b'hello')]
>>> wal.close()
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["WriteAheadLog", "LogRecord", "HEADER"]

logger = logging.getLogger("memory_store.wal")

HEADER = struct.Struct("<IIQB")
MAX_RECORD_BYTES = 1 << 30


@dataclass(frozen=True)
class LogRecord:
    lsn: int
    kind: int
    payload: bytes


# fdatasync flushes the appended bytes and the file size (all a replay needs) but skips the
# modification time; platforms without it fall back to fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _crc(lsn: int, kind: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QB", lsn, kind))) & 0xFFFFFFFF


def _record_at(data: bytes, pos: int) -> LogRecord | str:
    """The record that starts at byte ``pos``, or why there is none."""
    if len(data) - pos < HEADER.size:
        return f"torn record header ({len(data) - pos} of {HEADER.size} bytes)"
    length, crc, lsn, kind = HEADER.unpack_from(data, pos)
    start = pos + HEADER.size
    if length > MAX_RECORD_BYTES or start + length > len(data):
        return f"torn record payload (lsn {lsn}: {len(data) - start} of {length} bytes present)"
    payload = data[start:start + length]
    if _crc(lsn, kind, payload) != crc:
        return f"CRC mismatch in record at lsn field {lsn}"
    return LogRecord(lsn, kind, payload)


def _next_record(data: bytes, pos: int, after_lsn: int) -> int | None:
    """The first byte offset from ``pos`` where a whole record with a valid CRC and an lsn above
    ``after_lsn`` starts (None when there is none)."""
    for p in range(pos, len(data) - HEADER.size + 1):
        record = _record_at(data, p)
        if isinstance(record, LogRecord) and record.lsn > after_lsn:
            return p
    return None


class WriteAheadLog:
    """Append-only record log of one shard.

    Parameters
    ----------
    path
        The log file; created if missing.
    fsync
        If True (default), :meth:`sync` makes appended records durable with ``os.fdatasync``; callers
        append a whole batch and sync once ("batched fsync"); concurrent syncs share one fsync.
        If False, :meth:`sync` only hands the bytes to the OS (survives a process kill, not a power loss).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if created and fsync:  # the new file's directory entry must survive a power loss too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._append_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._written = os.fstat(self._fd).st_size
        self._synced = self._written
        self.fsyncs = 0
        self.truncated_bytes = 0
        self.corrupt_bytes = 0   # skipped over corrupt records with valid ones after them
        self.failed: str | None = None  # why appends are refused until the log is reopened

    @property
    def size_bytes(self) -> int:
        return self._written

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def append(self, records: Sequence[tuple[int, int, bytes]]) -> int:
        """Append ``(lsn, kind, payload)`` records in one write; returns the end offset to sync to."""
        parts = []
        for lsn, kind, payload in records:
            if len(payload) > MAX_RECORD_BYTES:
                raise ValueError(f"WAL record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
            parts.append(HEADER.pack(len(payload), _crc(lsn, kind, payload), lsn, kind))
            parts.append(payload)
        data = b"".join(parts)
        with self._append_lock:
            self._check_usable()
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except BaseException as exc:
                # A partial write (ENOSPC, EIO) left bytes that are not a record: later records
                # appended after them would be cut off at the next replay. Roll back to the last
                # whole record, and refuse further appends until the log is reopened.
                self._fail(f"append failed: {exc!r}")
                try:
                    os.ftruncate(self._fd, self._written)
                except OSError as undo:
                    self._fail(f"append failed: {exc!r}; rolling back failed too: {undo!r}")
                raise
            self._written += len(data)
            return self._written

    def _fail(self, reason: str) -> None:
        self.failed = reason
        logger.error("WAL %s: %s; refusing further appends until it is reopened", self.path, reason)

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise OSError(f"WAL {self.path} refuses writes after an earlier failure ({self.failed}); reopen it")

    def sync(self, upto: int | None = None) -> None:
        """Make every record appended before ``upto`` (default: all) durable."""
        target = self._written if upto is None else upto
        if not self.fsync:
            return
        with self._sync_lock:
            if self._synced >= target:
                return
            end = self._written
            self._check_usable()
            try:
                _datasync(self._fd)
            except OSError as exc:  # after a failed fsync the page cache cannot be trusted either
                self._fail(f"fsync failed: {exc!r}")
                raise
            self.fsyncs += 1
            self._synced = max(self._synced, end)

    def replay(self) -> Iterator[LogRecord]:
        """Yield the valid records from the start; truncate a torn or corrupt tail (logged)."""
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        last_lsn = -1
        bad_reason = None
        while pos < len(data):
            record = _record_at(data, pos)
            if isinstance(record, LogRecord):
                yield record
                last_lsn = record.lsn
                pos += HEADER.size + len(record.payload)
                continue
            resume = _next_record(data, pos + 1, last_lsn)
            if resume is None:  # nothing valid after it: a torn tail
                bad_reason = record
                break
            logger.error("WAL %s: corrupt record at byte %d (%s) with valid records after it; skipping "
                         "%d bytes to the next one (that record is lost)", self.path, pos, record, resume - pos)
            self.corrupt_bytes += resume - pos
            pos = resume
        if bad_reason is not None:
            self.truncate_at(pos, bad_reason, len(data))

    def truncate_at(self, offset: int, reason: str, file_size: int) -> None:
        dropped = file_size - offset
        logger.warning("WAL %s: corrupt tail detected at byte %d (%s); truncating %d bytes to the "
                       "last good record", self.path, offset, reason, dropped)
        with self._append_lock:
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
            self._written = self._synced = offset
        self.truncated_bytes += dropped

    def drop_prefix(self, offset: int) -> None:
        """Drop the records before byte ``offset`` (a snapshot holds them), keeping later ones.

        The kept tail is written to a new file that atomically replaces the log, so a crash at any
        point leaves either the old log or the new one, never a mix."""
        with self._append_lock, self._sync_lock:
            if offset >= self._written:
                os.ftruncate(self._fd, 0)
                if self.fsync:
                    _datasync(self._fd)
                self._written = self._synced = 0
                return
            tail = os.pread(self._fd, self._written - offset, offset)
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            try:
                view = memoryview(tail)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
                os.replace(tmp, self.path)
                if self.fsync:
                    dir_fd = os.open(self.path.parent, os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(self._fd)
            self._fd = fd
            self._written = self._synced = len(tail)

    def reset(self) -> None:
        """Empty the log (after a snapshot has made its records redundant)."""
        with self._append_lock, self._sync_lock:
            os.ftruncate(self._fd, 0)
            if self.fsync:
                os.fsync(self._fd)
            self._written = self._synced = 0

    def close(self) -> None:
        if self._fd >= 0:
            try:
                if self.failed is None:
                    self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1
