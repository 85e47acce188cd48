"""Replacing a file atomically and durably: one definition for every file the system rewrites
(checkpoints, the learner's state, the case bank's manifest and snapshots).

A reader sees either the old file or the new one, never a torn mix, and after a crash or a
power loss the new one is there only if it was completely written: the data goes to a
temporary file beside the target, which is synced, renamed over the target, and then the
directory is synced so that the rename itself is durable. On any error (a full disk) the
temporary file is removed and the target is left as it was.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "state.json"
>>> write_atomic(path, b'{"v": 1}'); path.read_bytes()
b'{"v": 1}'
>>> with atomic_file(path) as fh:
...     _ = fh.write(b'{"v": 2}')
>>> path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
(b'{"v": 2}', ['state.json'])
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["atomic_file", "write_atomic", "sync_directory"]


def sync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory, so that renames and creations inside it survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; when the block ends without an
    error, the content replaces ``path`` durably (see the module's docstring)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably."""
    with atomic_file(path) as fh:
        fh.write(data)
