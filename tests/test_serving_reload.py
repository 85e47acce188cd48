"""Hot reload over a real embedded broker: a swap under concurrent requests fails none of them
and the new version becomes visible quickly; corrupt or mismatched checkpoints are rejected
while the previous policy keeps answering."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pickle
import re
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from support.serving import (ServerThread, announce, fresh_settings, http, make_cases, publish_cases,
                             send_announcement, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]



async def _load(url: str, stop_at: float, concurrency: int, log: list) -> None:
    async with aiohttp.ClientSession() as session:
        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                try:
                    async with session.post(f"{url}/v1/recommend", json={"user_id": f"u{i}-{n % 5}"}) as resp:
                        body = await resp.json()
                        log.append((time.time(), resp.status, body.get("policy_version")))
                except aiohttp.ClientError as exc:
                    log.append((time.time(), repr(exc), None))

        await asyncio.gather(*(client(i) for i in range(concurrency)))


def test_swap_under_concurrent_load(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path)
    with ServerThread(settings) as server:
        publish_cases(settings, make_cases(settings, 200))
        # Cases alone are not enough for readiness.
        wait_for(lambda: http("GET", f"{server.url}/readyz")[1]["cases"] == 200, what="cases")
        assert http("GET", f"{server.url}/readyz")[0] == 503
        announce(settings, 1)
        wait_for(lambda: http("GET", f"{server.url}/readyz")[0] == 200, what="ready")

        log: list = []
        announced: dict[int, float] = {}

        async def scenario():
            stop_at = time.monotonic() + 5.0
            load = asyncio.create_task(_load(server.url, stop_at, concurrency=8, log=log))
            for version in (2, 3):
                await asyncio.sleep(1.2)
                announced[version] = time.time()
                await asyncio.get_running_loop().run_in_executor(None, announce, settings, version)
            await load

        asyncio.run(scenario())
        statuses = [status for _, status, _ in log]
        assert len(log) > 100, f"only {len(log)} requests completed"
        assert all(s == 200 for s in statuses), {s for s in statuses if s != 200}
        versions = [v for _, _, v in log]
        assert {1, 2, 3} <= set(versions)
        first_v3 = min(t for t, _, v in log if v == 3)
        assert first_v3 - announced[3] < 2.0
        # Once a request has seen v3, none started later sees an older version.
        after = [v for t, _, v in log if t > first_v3 + 0.2]
        assert after and all(v == 3 for v in after)
        status, stats = http("GET", f"{server.url}/v1/stats")
        assert stats["reloads"] == 3 and stats["reload_failures"] == 0 and stats["policy_version"] == 3
        # Every recommend went through the micro-batcher (the readiness probes do not recommend).
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        batched = float(re.search(r"^memento_serving_batch_size_sum ([0-9.e+]+)$", metrics, re.M).group(1))
        batches = float(re.search(r"^memento_serving_batch_size_count ([0-9.e+]+)$", metrics, re.M).group(1))
        assert batched == stats["requests"] >= len(log) and 0 < batches <= batched
        print(f"{len(log)} requests, v3 visible {first_v3 - announced[3]:.3f}s after its announcement")


def test_corrupt_checkpoints_rejected_old_version_keeps_serving(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path)
    with ServerThread(settings) as server:
        publish_cases(settings, make_cases(settings, 30))
        announce(settings, 1)
        wait_for(lambda: http("GET", f"{server.url}/readyz")[0] == 200, what="ready")

        def failures() -> int:
            return http("GET", f"{server.url}/v1/stats")[1]["reload_failures"]

        def still_serving_v1() -> None:
            status, rec = http("POST", f"{server.url}/v1/recommend", {"user_id": "u"})
            assert status == 200 and rec["policy_version"] == 1

        # 1. Announced sha256 does not match the file.
        announce(settings, 2, sha256="0" * 64)
        wait_for(lambda: failures() == 1, what="bad sha256 rejected")
        still_serving_v1()

        # 2. A pickle (not safetensors) with a correct sha256.
        good = announce(settings, 3, sha256="f" * 64)  # rejected too; reused for its fields
        wait_for(lambda: failures() == 2, what="second rejection")
        pickled = Path(settings.checkpoint_dir) / "policy-v000004.pt"
        pickled.write_bytes(pickle.dumps({"mlp.0.weight": [[0.0]]}))
        send_announcement(settings, dataclasses.replace(
            good, version=4, path=str(pickled), sha256=hashlib.sha256(pickled.read_bytes()).hexdigest(), data=None))
        wait_for(lambda: failures() == 3, what="pickle rejected")
        still_serving_v1()

        # 3. A valid safetensors policy of the wrong dimension.
        announce(settings, 5, state_dim=settings.state_dim * 2)
        wait_for(lambda: failures() == 4, what="shape mismatch rejected")
        still_serving_v1()

        # 4. A missing file.
        send_announcement(settings, dataclasses.replace(good, version=6, path=str(tmp_path / "gone.safetensors"),
                                                        data=None))
        wait_for(lambda: failures() == 5, what="missing file rejected")
        still_serving_v1()

        status, text = http("GET", f"{server.url}/metrics")
        assert "memento_serving_reload_failures_total 5.0" in text
        assert "memento_serving_policy_version 1.0" in text

        # The follower is still alive: a good checkpoint after the bad ones is taken.
        announce(settings, 7)
        wait_for(lambda: http("POST", f"{server.url}/v1/recommend", {"user_id": "u"})[1]["policy_version"] == 7,
                 what="v7 served")
        status, stats = http("GET", f"{server.url}/v1/stats")
        assert stats["reloads"] == 2 and stats["reload_failures"] == 5


def test_serving_needs_no_volume_shared_with_the_learner(broker, tmp_path):
    """A checkpoint of the learner's default size (hidden 128, 4,096 item buckets: 240 kB at this state size)
    travels through the broker inside its announcement; serving's checkpoint directory never
    holds the file, and the version is served."""
    import torch

    from learner.trainer import SoftQConfig
    from memento.checkpoint import save_checkpoint
    from memento.qnet import QNetwork

    settings = fresh_settings(broker, tmp_path)
    learner_dir = tmp_path / "learner-volume"
    config = SoftQConfig()
    torch.manual_seed(0)
    net = QNetwork(settings.state_dim, hidden=config.hidden, item_buckets=config.item_buckets)
    with ServerThread(settings) as server:
        publish_cases(settings, make_cases(settings, 50))
        ann = save_checkpoint(net, learner_dir, version=1, step=1)
        assert ann.data is not None and Path(ann.path).stat().st_size > 200_000
        send_announcement(settings, ann)
        wait_for(lambda: http("GET", f"{server.url}/readyz")[0] == 200, what="ready")
        assert http("POST", f"{server.url}/v1/recommend", {"user_id": "u"})[1]["policy_version"] == 1
        assert not any(Path(settings.checkpoint_dir).glob("*.safetensors"))
