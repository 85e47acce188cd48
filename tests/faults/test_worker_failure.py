"""A stream-worker batch that fails, or an output the producer gives up on, must not be
committed: Faust's ``take_events`` acknowledges a batch even when the loop body raised, and its
commit path flushes the producer and commits whatever a failed send left behind. Before the fix
a failed batch was acknowledged (so committed) and, after one failed send, every later batch
raised and was acknowledged too: the worker black-holed its input until restarted."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.types.tuples import Message

from memento.config import Settings

pytestmark = pytest.mark.faults


def _worker(tmp_path):
    from streams.app import TransitionWorker

    worker = TransitionWorker(Settings(data_dir=str(tmp_path)), store="memory://")
    worker.exits = []
    worker._exit = worker.exits.append  # the real one ends the process (os._exit)
    return worker


def _event(offset: int) -> SimpleNamespace:
    return SimpleNamespace(message=Message("memento.actions", 0, offset, 0.0, 0, [], b"u", b"{}", None))


def test_a_failed_batch_is_never_acknowledged_and_ends_the_worker(tmp_path):
    worker = _worker(tmp_path)

    async def failing(events):
        raise RuntimeError("producer buffer closed")

    worker.handle_batch = failing
    events = [_event(i) for i in range(3)]
    with pytest.raises(RuntimeError):
        asyncio.run(worker.process_batch(events))
    assert len(worker.exits) == 1 and "3 events could not be processed" in worker.exits[0]
    acked = []
    consumer = SimpleNamespace(ack=acked.append)
    # what take_events' finally then does for each event: nothing reaches the consumer's commit list
    assert [e.message.ack(consumer) for e in events] == [False, False, False] and acked == []
    assert _event(9).message.ack(consumer) is True  # an ordinary event's last ack is final


def test_a_cancelled_batch_is_not_acknowledged_either(tmp_path):
    worker = _worker(tmp_path)

    async def cancelled(events):
        raise asyncio.CancelledError()

    worker.handle_batch = cancelled
    events = [_event(i) for i in range(2)]
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(worker.process_batch(events))
    assert worker.exits == [] and all(e.message.acked for e in events)


def test_an_undelivered_output_ends_the_worker(tmp_path):
    worker = _worker(tmp_path)

    async def delivery(fail: bool):
        fut = asyncio.get_running_loop().create_future()
        if fail:
            fut.set_exception(RuntimeError("MessageSizeTooLargeError"))
        else:
            fut.set_result(None)
        worker._on_delivery(fut)

    asyncio.run(delivery(False))
    assert worker.exits == []
    asyncio.run(delivery(True))
    assert len(worker.exits) == 1 and "could not be delivered" in worker.exits[0]
