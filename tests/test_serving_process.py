"""``memento serve`` as an OS process: several workers behind one port (SO_REUSEPORT), each
loading cases and the policy, and a graceful SIGTERM that flushes what was served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.broker import EmbeddedBroker, free_port
from memento.schemas import Recommendation, decode
from support.serving import announce, fresh_settings, http, make_cases, publish_cases, read_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("engine", EmbeddedBroker.engines())
def test_two_workers_one_port_and_graceful_sigterm(engine, tmp_path):
    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker:
        settings = fresh_settings(broker, tmp_path)
        port = free_port()
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT), "MEMENTO_LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "--port", str(port), "--workers", "2"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            publish_cases(settings, make_cases(settings, 12))
            announce(settings, 4)

            data = Path(settings.data_dir)

            def both_ready():
                # Both workers opened their banks, and connections (which land on either worker)
                # answered ready 30 times in a row: a worker not ready yet would have answered
                # one of them with probability 1 - 2**-30.
                if not ((data / "serving-bank").is_dir() and (data / "serving-bank-1").is_dir()):
                    return False
                try:
                    return all(http("GET", f"{url}/readyz")[0] == 200 for _ in range(30))
                except OSError:
                    return False

            wait_for(both_ready, timeout=60, interval=0.3, what="both workers ready")
            request_ids = set()
            for i in range(20):
                status, rec = http("POST", f"{url}/v1/recommend", {"user_id": f"u{i}"})
                assert status == 200 and rec["policy_version"] == 4
                request_ids.add(rec["request_id"])
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                pytest.fail(f"serving did not stop on SIGTERM:\n{out.decode()[-3000:]}")
        assert proc.returncode == 0, out.decode()[-3000:]
        records = read_topic(settings, settings.topics.recommendations,
                             lambda rs: request_ids <= {decode(Recommendation, r.value).request_id for r in rs})
        assert len(records) == 20
