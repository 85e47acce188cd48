"""Request ids: unique, 32 hex digits like a UUID's, without a system call per id.

``uuid.uuid4()`` reads 16 bytes from the kernel for every id; on a sandboxed host that system
call alone is a large share of a request (docs/benchmarks.md). :class:`RequestIds`
reads 8 random bytes once per process and appends a counter: ids never repeat within a process, and
two processes (serving workers, restarts) share a prefix with probability 2^-64.

>>> ids = RequestIds()
>>> a, b = ids.next(), ids.next()
>>> len(a) == 32 and a != b and a[:16] == b[:16]
True
"""

from __future__ import annotations

import itertools
import os

__all__ = ["RequestIds"]


class RequestIds:
    """A random 64-bit prefix and a 64-bit counter, as 32 hex digits. Make one per process
    (serving makes one per service): a forked copy would repeat its parent's ids."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        """A new id (thread-safe: ``itertools.count`` is atomic under the GIL)."""
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"
