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


def _stall_worker(tmp_path, timeout: float):
    from streams.app import TransitionWorker

    worker = TransitionWorker(Settings(data_dir=str(tmp_path)), store="memory://", stall_timeout_s=timeout)
    worker.stops = []
    worker._stop_stalled = worker.stops.append  # the real one signals the process to stop
    return worker


def test_a_worker_whose_own_ticks_stop_coming_back_stops_to_be_restarted(tmp_path):
    worker = _stall_worker(tmp_path, 60.0)
    worker._tick_seen_at, worker._tick_delivered_at = 100.0, 150.0
    assert worker.check_stalled() is False and worker.stops == []
    worker._tick_delivered_at = 161.0          # the broker accepted ticks for 61 s, none came back
    assert worker.check_stalled() is True and "ticks came back" in worker.stops[0]
    restoring = _stall_worker(tmp_path / "r", 60.0)
    restoring._tick_seen_at, restoring._tick_delivered_at = 100.0, 161.0
    restoring.app.in_recovery = True           # restoring tables takes long: not a stall
    assert restoring.check_stalled() is False and restoring.stops == []
    off = _stall_worker(tmp_path / "off", 0.0)
    off._tick_seen_at, off._tick_delivered_at = 100.0, 10_000.0
    assert off.check_stalled() is False


def test_a_worker_that_stops_reading_input_it_knows_of_stops_to_be_restarted(tmp_path, monkeypatch):
    """What a broker restart did on noida: ticks went on, the input partitions' unread records were
    never read (their read lag stayed, the read position did not move)."""
    import streams.app as app_module

    worker = _stall_worker(tmp_path, 5.0)
    clock = [1000.0]
    monkeypatch.setattr(app_module.time, "monotonic", lambda: clock[0])
    worker._read_position = lambda key: 41
    lags = {("memento.recommendations", 2): (0, 71)}   # (committed lag, read lag)
    assert worker.check_stalled(lags) is False
    clock[0] += 4.0
    assert worker.check_stalled(lags) is False
    worker._read_position = lambda key: 42             # it read one: the clock starts again
    clock[0] += 4.0
    assert worker.check_stalled(lags) is False
    clock[0] += 5.5
    assert worker.check_stalled(lags) is True and "hold unread records" in worker.stops[0]
    assert worker.check_stalled({("memento.recommendations", 2): (0, 0)}) is False   # caught up
