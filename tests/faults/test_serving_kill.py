"""``memento serve`` killed with SIGKILL while cases stream in, then started again on the same
data directory (both engines). The restarted process opens its case bank from the write-ahead
log (a torn tail at most), re-reads the cases topic, and serves every case, the ones added after
the kill included; nothing it had acknowledged is missing from its bank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.broker import EmbeddedBroker, free_port
from support.serving import announce, fresh_settings, http, make_cases, publish_cases, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def _serve(settings, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT), "MEMENTO_LOG_LEVEL": "WARNING"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "serving.cli", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("engine", EmbeddedBroker.engines())
def test_serving_killed_mid_stream_comes_back_with_every_case(engine, tmp_path):
    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker:
        settings = fresh_settings(broker, tmp_path)
        port, log_path = free_port(), tmp_path / "serve.log"
        url = f"http://127.0.0.1:{port}"
        cases = make_cases(settings, 600)
        announce(settings, 1)
        proc = _serve(settings, port, log_path)
        try:
            publish_cases(settings, cases[:300])
            wait_for(lambda: _cases(url) >= 100, timeout=60, interval=0.1, what="cases arriving")
            proc.send_signal(signal.SIGKILL)  # while the rest may still be being appended
            proc.wait(10)
            publish_cases(settings, cases[300:])
            proc = _serve(settings, port, log_path)
            # ready means the policy is loaded too (its follower may come after the cases')
            wait_for(lambda: _readyz(url) == (200, {"ready": True, "policy_version": 1, "cases": 600}),
                     timeout=90, interval=0.3, what="ready with v1 and all 600 cases after the restart")
            assert http("GET", f"{url}/healthz") == (200, {"ok": True})
            status, rec = http("POST", f"{url}/v1/recommend", {"user_id": "u1"})
            assert status == 200 and rec["policy_version"] == 1
        finally:
            proc.kill()
            proc.wait(10)


def _readyz(url: str):
    try:
        return http("GET", f"{url}/readyz")
    except OSError:
        return None


def _cases(url: str) -> int:
    try:
        status, body = http("GET", f"{url}/readyz")
    except OSError:
        return -1
    return body.get("cases", -1)
