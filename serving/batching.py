"""Continuous micro-batching: requests that arrive while a batch computes form the next batch.

Serving's hot path (a FAISS search and a Q-network forward pass) costs much less per state when
states come in batches (figures in docs/benchmarks.md), so concurrent requests are answered together. :class:`MicroBatcher`
adds no timer and no waiting: the first request of an idle batcher schedules a batch for the
next turn of the event loop, and every request whose handler reaches :meth:`submit` before then
joins it. The batch runs on the event-loop thread; requests that arrive meanwhile wait in socket
buffers and make up the next batch. Under light load every batch has one request; under heavy
load batches grow up to ``max_batch`` and the cost per request falls.

The batch runs on the loop thread rather than a thread of its own: FAISS and torch release the
GIL, but on two cores shared with the HTTP work a batch thread gained no throughput, and one
thread keeps the ordering simple (a batch reads the policy once).

>>> import asyncio
>>> async def demo():
...     batcher = MicroBatcher(lambda xs: [x * x for x in xs], max_batch=8)
...     return await asyncio.gather(*(batcher.submit(i) for i in range(5)))
>>> asyncio.run(demo())
[0, 1, 4, 9, 16]
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Generic, Sequence, TypeVar

__all__ = ["MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Answers :meth:`submit` calls by running ``process`` over batches of them.

    Parameters
    ----------
    process
        ``process(items) -> results``, one result per item, in order. A result that is an
        exception instance is raised to that item's caller only; an exception raised by
        ``process`` itself goes to every caller of the batch.
    max_batch
        Largest batch; more waiting requests go in the batches after.
    on_batch
        Called after each batch with (size, seconds spent in ``process``),
        e.g. to record metrics.
    """

    def __init__(self, process: Callable[[Sequence[T]], Sequence[R | BaseException]], max_batch: int = 64,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.process = process
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._scheduled = False

    async def submit(self, item: T) -> R:
        """The result of ``process`` for ``item``, computed in a batch with concurrent calls."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run_batch, loop)
        return await future

    @property
    def waiting(self) -> int:
        """Requests queued for the next batch."""
        return len(self._pending)

    def _run_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
        if self._pending:  # the rest go on the next turn, after I/O has been served
            loop.call_soon(self._run_batch, loop)
        else:
            self._scheduled = False
        batch = [(item, f) for item, f in batch if not f.cancelled()]
        if not batch:
            return
        started = time.perf_counter()
        try:
            results = list(self.process([item for item, _ in batch]))
            error = None if len(results) == len(batch) else RuntimeError(
                f"batch process returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - goes to every caller of the batch
            results, error = [], exc
        seconds = time.perf_counter() - started
        for i, (_, future) in enumerate(batch):
            outcome = error if error is not None else results[i]
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
