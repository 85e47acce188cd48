"""memento.atomic: a failed replacement leaves the old file and no temporary file; a
successful one syncs the file and then its directory."""

from __future__ import annotations

import errno
import os

import pytest

from memento.atomic import atomic_file, write_atomic


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "snapshot.npz"
    write_atomic(path, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as fh:
            fh.write(b"half")
            raise RuntimeError("the writer failed midway")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["snapshot.npz"]


def test_the_file_and_then_its_directory_are_synced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_atomic(tmp_path / "manifest.json", b"{}")
    assert synced == [False, True]
