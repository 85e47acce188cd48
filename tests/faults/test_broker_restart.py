"""The broker stopped and started again in the middle of a run (noida: it keeps its data on disk;
Tansu's embedded storage is in memory, so a restart there is a new, empty cluster). The worker
rides out the outage: every transition of the input before, during and after it comes out, with
its reward, and the worker is still running."""

from __future__ import annotations

import time

import pytest

from memento.broker import EmbeddedBroker
from memento.processes import ProcessGroup
from test_streams_support import (Scenario, TransitionLog, assert_exactly, fresh_settings, produce, start_worker,
                                  wait_assigned)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


def test_worker_rides_out_a_broker_restart(tmp_path):
    sc = Scenario(n=120, users=12)
    with EmbeddedBroker("noida", 0, str(tmp_path / "broker")) as broker:
        s = fresh_settings(broker, tmp_path, window_s=sc.window_s, allowed_lateness_s=0.0, session_gap_s=sc.gap_s)
        with ProcessGroup() as group:
            worker, port = start_worker(group, s, tmp_path, name="worker", app_id=f"w-{s.topics.actions}")
            wait_assigned(group, s, [port])
            produce(s, sc.events(0, 60))
            log = TransitionLog(s)
            assert len(log.read(lambda c: len(c) >= 30, timeout=60, group=group)) >= 30
            log.close()

            broker.stop()
            time.sleep(5.0)  # the worker's connections fail meanwhile
            group.check()
            broker.start()   # same port, same data directory

            produce(s, sc.events(60, sc.n) + sc.flush())
            log = TransitionLog(s)
            copies = log.read(lambda c: set(sc.expected()) <= set(c), timeout=120, group=group)
            log.close()
            group.check()
    duplicates = assert_exactly({t: c for t, c in copies.items() if t in sc.expected()}, sc.expected())
    print(f"{duplicates} surplus copies after the broker restart")
