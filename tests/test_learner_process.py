"""`python -m learner.service` as its own OS process against a real embedded broker."""

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
from test_learner_service import D, K, N_TRANSITIONS, _produce

ROOT = Path(__file__).resolve().parents[1]


def _wait_for_log(log_path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log_path.read_text(errors="replace"))
        if match:
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the learner log:\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", EmbeddedBroker.engines())
def test_learner_process_trains_publishes_and_stops_on_sigterm(tmp_path: Path, engine: str):
    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker:
        settings = broker.settings(item_dim=D, top_k=K)
        _produce(settings, np.random.default_rng(1))
        env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        log_path = tmp_path / "learner.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "learner.service", "--data-dir", str(tmp_path / "data"),
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-port", "0", "--hidden", "16",
                 "--batch-size", "32", "--learning-starts", "32", "--publish-every", "100",
                 "--publish-min-interval-s", "0", "--log-every-s", "1"],
                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            port = int(_wait_for_log(log_path, r"metrics on :(\d+)/metrics", proc, 30).group(1))
            _wait_for_log(log_path, r"published policy v2 ", proc, 60)
            _wait_for_log(log_path, r"transitions %d .*steps/s .*loss" % (N_TRANSITIONS + 1), proc, 30)
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            assert "memento_learner_checkpoint_version 2.0" in scrape or \
                "memento_learner_checkpoint_version 3.0" in scrape
            assert "memento_casebank" in scrape          # the bank replica's metrics are served too
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log = log_path.read_text()
        assert "learner stopped at policy v" in log and "Traceback" not in log
        assert sorted(p.name for p in (tmp_path / "data" / "learner" / "replay").iterdir()) == [
            "sampler.json", "sampler.npz", "storage.json", "storage.npz", "writer.json", "writer.npz"]
