"""A case bank process killed with SIGKILL in the middle of appends loses no acknowledged case."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from memory_store import CaseBank

DIM = 8

WRITER = r"""
import sys
import numpy as np
from memento.schemas import Case
from memory_store import CaseBank

path, batch, mode, start = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
bank = CaseBank(path, 8, num_shards=3, switch_threshold=500, snapshot_wal_bytes=200_000)
rng = np.random.default_rng(0)
while True:
    states = rng.standard_normal((batch, 8))
    if mode == "cases":
        bank.add([Case(f"c{start + i}", s.tolist(), "item", s.tolist(), 1.0, 0.0)
                  for i, s in enumerate(states)])
    else:
        bank.add_arrays([f"c{start + i}" for i in range(batch)], states, "item", states, 1.0, 0.0)
    start += batch
    print(start, flush=True)  # every case below `start` is acknowledged
"""


@pytest.mark.integration
@pytest.mark.parametrize("batch, mode", [(1, "cases"), (97, "cases"), (997, "arrays")])
def test_sigkill_mid_append_keeps_every_acknowledged_case(tmp_path, batch, mode):
    path = tmp_path / "bank"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    acknowledged = 0
    for round_ in range(2):  # the second round restarts on the recovered bank and crashes again
        # It continues after the last acknowledged id, not after len(bank): the batch that was
        # being appended at the kill may have reached some shards and not others, so the bank
        # can hold a few ids above the acknowledged ones and miss others (never acknowledged).
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(batch), mode, str(acknowledged)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            target = acknowledged + (300 if batch == 1 else 3000 if batch < 500 else 30000)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    pytest.fail(f"writer exited early: {proc.stderr.read()[-2000:]}")
                acknowledged = int(line)
                if acknowledged >= target:
                    break
            proc.send_signal(signal.SIGKILL)  # it is appending its next batch right now
        finally:
            proc.kill()
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        assert acknowledged >= target, "writer too slow"
        with CaseBank(path, DIM, num_shards=3) as bank:
            missing = [i for i in range(acknowledged) if f"c{i}" not in bank]
            assert not missing, f"round {round_}: {len(missing)} acknowledged cases lost, e.g. {missing[:5]}"
            assert len(bank) >= acknowledged
