"""The broker stopped and started again mid-stream, under a running stream worker (noida, whose
data survives a restart).

Before the fix the worker sometimes rejoined its group after the restart and then hung in
Faust's ``_on_partitions_assigned`` for good: its lag stopped falling, nothing said so, and the
windows of everything produced after the restart never closed. Now the worker's own ticks are a
heartbeat through the broker: when the broker accepts new ticks and none comes back for
``--stall-timeout`` seconds, the worker exits with status 70 and the orchestrator (this test)
starts it again. Either way every expected transition arrives, each with its reward and
``done`` (at least once: duplicates are dropped by id downstream)."""

from __future__ import annotations

import time

import pytest

from harness.broker import EmbeddedBroker
from harness.processes import ProcessGroup
from support.streams import (Scenario, TransitionLog, assert_exactly, fresh_settings, produce, start_worker,
                             wait_assigned)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

STALL_TIMEOUT_S = 15


def test_broker_restart_mid_stream_loses_no_transition(tmp_path):
    sc = Scenario(n=160, users=16)
    with EmbeddedBroker("noida", 0, str(tmp_path / "broker")) as broker:
        s = fresh_settings(broker, tmp_path, window_s=sc.window_s, allowed_lateness_s=0.0, session_gap_s=sc.gap_s)
        app_id = f"w-{s.topics.actions}"
        extra = ("--stall-timeout", str(STALL_TIMEOUT_S))
        expected = sc.expected()
        log = TransitionLog(s)
        restarts = []
        with ProcessGroup() as group:
            worker, _ = start_worker(group, s, tmp_path, name="worker-0", app_id=app_id, extra=extra)
            wait_assigned(group, s, [_port_of(worker)])
            produce(s, sc.events(0, 80))
            assert len(log.read(lambda c: len(c) >= 40, timeout=60, group=group)) >= 40, "too few before the restart"

            broker.stop()
            time.sleep(1.0)
            broker.start(s)
            log.close()
            log = TransitionLog(s)
            produce(s, sc.events(80, sc.n) + sc.flush())

            deadline = time.monotonic() + 150
            while not set(expected) <= set(log.read(lambda c: set(expected) <= set(c), timeout=2)):
                assert time.monotonic() < deadline, (
                    f"{len(set(expected) - set(log.copies))} transitions missing "
                    f"({sorted(set(expected) - set(log.copies), key=lambda t: int(t[1:]))[:20]}...); worker restarts: "
                    f"{restarts}; worker metrics: {_worker_state(worker)}")
                if not worker.alive():   # the orchestrator's job: start it again
                    restarts.append(worker.popen.returncode)
                    group.processes.remove(worker)
                    worker, _ = start_worker(group, s, tmp_path, name=f"worker-{len(restarts)}", app_id=app_id,
                                             extra=extra)
            time.sleep(1.0)  # let any duplicate arrive
            copies = log.read(lambda c: False, timeout=0.5)
            log.close()
    assert all(code == 70 for code in restarts), f"the worker ended otherwise than by the stall check: {restarts}"
    duplicates = assert_exactly(copies, expected)
    print(f"broker restart: worker exits {restarts}, {duplicates} surplus copies")


def _worker_state(worker) -> dict:
    port = _port_of(worker)
    from support.streams import metrics
    return {f"{n}{lab}": v for n, lab, v in metrics(port) if n.startswith("memento_stream_") and (
        "lag" in n or "events" in n or "transitions" in n or "watermark" in n)}


def _port_of(worker) -> int:
    args = worker.popen.args
    return int(args[args.index("--metrics-port") + 1])
