"""The learner killed with SIGKILL before its first state save, then restarted with an empty
(torn) ``learner.pt`` and without its checkpoint directory, on a real embedded broker (both
engines). Before the fix: offsets were committed after every poll, so the restarted learner
never saw again the transitions the killed one had only in memory (its buffer stayed empty);
the empty state file crashed it at start-up (``EOFError``), every time; and without the
checkpoint files it published version 0 again, which serving ignores below the version it serves.
(SIGKILL on Tansu only: see below.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from harness.broker import EmbeddedBroker
from test_learner_process import _wait_for_log
from test_learner_service import D, K, N_TRANSITIONS, _produce

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def _start(tmp_path: Path, settings, name: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "learner.service", "--data-dir", str(tmp_path / "data"),
             "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-port", "0", "--hidden", "16",
             "--batch-size", "32", "--learning-starts", "32", "--publish-every", "50",
             "--publish-min-interval-s", "0", "--log-every-s", "0.5", "--state-save-interval-s", "3600"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, log_path


def _buffer_size(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return float(re.search(r"^memento_learner_buffer_size (\S+)$", text, re.M).group(1))


# noida never lets a new member into a group whose previous member was SIGKILLed (measured: not
# within 90 s; docs/embedded-brokers.md), so the SIGKILL case runs on Tansu, which expires it.
@pytest.mark.parametrize("engine", ["tansu"])
def test_learner_killed_before_saving_loses_nothing_and_restarts_on_a_torn_state(tmp_path: Path, engine: str):
    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker:
        settings = broker.settings(item_dim=D, top_k=K)
        _produce(settings, np.random.default_rng(2))
        first, log1 = _start(tmp_path, settings, "first")
        try:
            port = int(_wait_for_log(log1, r"metrics on :(\d+)/metrics", first, 30).group(1))
            deadline = time.monotonic() + 60
            while _buffer_size(port) < N_TRANSITIONS:
                assert time.monotonic() < deadline, "the first learner did not take in every transition"
                time.sleep(0.2)
            last = max(int(v) for v in re.findall(r"published policy v(\d+) ", log1.read_text()))
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        assert not (tmp_path / "data" / "learner" / "replay").exists()  # it never saved
        (tmp_path / "data" / "learner").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "learner" / "learner.pt").write_bytes(b"")  # a torn state file
        for path in (tmp_path / "ckpt").iterdir():                        # the checkpoint files are lost
            path.unlink()

        second, log2 = _start(tmp_path, settings, "second")
        try:
            port = int(_wait_for_log(log2, r"metrics on :(\d+)/metrics", second, 30).group(1))
            version = int(_wait_for_log(log2, r"published policy v(\d+) ", second, 30).group(1))
            deadline = time.monotonic() + 60
            while _buffer_size(port) < N_TRANSITIONS:
                assert time.monotonic() < deadline, f"the restarted learner has {_buffer_size(port)} transitions"
                time.sleep(0.2)
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
        finally:
            if second.poll() is None:
                second.kill()
    log = log2.read_text()
    assert version == last + 1, (version, last)
    assert "not restoring the learner state" in log and "Traceback" not in log


@pytest.mark.parametrize("engine", EmbeddedBroker.engines())
def test_a_lost_bank_directory_is_refilled_from_the_cases_topic(tmp_path: Path, engine: str):
    """The learner's case bank is a replica of the cases topic. Before the fix its group's
    committed offsets covered the cases topic too, so a bank directory lost (or a snapshot set
    aside as unreadable) stayed empty after a restart: every candidate set came from nothing."""
    import shutil
    import threading

    from learner.service import LearnerService, LearnerServiceConfig
    from learner.trainer import SoftQConfig
    from test_learner_service import N_CASES

    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker:
        settings = broker.settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"),
                                   item_dim=D, top_k=K)
        _produce(settings, np.random.default_rng(3))
        config = SoftQConfig(top_k=K, hidden=16, batch_size=32, seed=0)
        options = LearnerServiceConfig(buffer_capacity=1000, learning_starts=32, publish_every=1000,
                                       publish_min_interval_s=0.0)
        for round_ in range(2):
            service = LearnerService(settings, config, options, metrics_port=None)
            stop = threading.Event()
            thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
            thread.start()
            deadline = time.monotonic() + 60
            while not (service.bank is not None and len(service.bank) == N_CASES
                       and service.transitions_consumed + len(service.buffer) >= N_TRANSITIONS):
                assert time.monotonic() < deadline and thread.is_alive(), \
                    f"round {round_}: bank {len(service.bank) if service.bank else None} of {N_CASES} cases"
                time.sleep(0.1)
            stop.set()
            thread.join(30)
            shutil.rmtree(tmp_path / "data" / "learner-bank")  # lost before the second start
