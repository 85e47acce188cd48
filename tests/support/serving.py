"""Helpers for the serving tests: an in-process server on a free port, Kafka publishing and
reading, and polling with a deadline."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from aiohttp import web

from harness.broker import free_port
from memento.checkpoint import ANNOUNCEMENT_KEY, save_checkpoint
from memento.config import Settings
from memento.encoder import ItemEncoder
from memento.kafka_io import make_consumer, make_producer
from memento.qnet import QNetwork
from memento.schemas import Case, encode
from serving.app import ServingConfig, ServingService, make_app
from support import common


def fresh_settings(broker, tmp_path: Path, **overrides) -> Settings:
    """:func:`support.common.fresh_settings` with K = 4 candidates (small banks answer)."""
    return common.fresh_settings(broker, tmp_path, **{"top_k": 4, **overrides})


class ServerThread:
    """Runs :func:`serving.app.make_app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, settings: Settings, config: ServingConfig | None = None):
        self.service = ServingService(settings, config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        runner = web.AppRunner(make_app(self.service), access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(runner.cleanup())
            self.loop.close()

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(20)
        assert not self._thread.is_alive(), "server did not stop"


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON body or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, payload = err.code, err.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def make_cases(settings: Settings, n: int, seed: int = 0, prefix: str = "case") -> list[Case]:
    rng = np.random.default_rng(seed)
    items = ItemEncoder(settings.item_dim)
    cases = []
    for i in range(n):
        state = rng.normal(size=settings.item_dim).astype(np.float32)
        state /= np.linalg.norm(state)
        item_id = f"item{i % max(1, n // 2)}"
        cases.append(Case(case_id=f"{prefix}-{i}", state=state.tolist(), item_id=item_id,
                          item_vec=items.encode(item_id).tolist(), outcome=float(i % 3), ts=float(i)))
    return cases


def publish(settings: Settings, topic: str, messages: list[tuple[str | None, bytes]]) -> None:
    producer = make_producer(settings)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(10)
    finally:
        producer.close(5)


def publish_cases(settings: Settings, cases: list[Case]) -> None:
    publish(settings, settings.topics.cases, [(c.case_id, encode(c)) for c in cases])


def announce(settings: Settings, version: int, *, seed: int | None = None, state_dim: int | None = None,
             sha256: str | None = None):
    """Save a checkpoint of a fresh QNetwork and announce it; returns the announcement sent."""
    import dataclasses

    import torch

    torch.manual_seed(version if seed is None else seed)
    net = QNetwork(state_dim or settings.state_dim, hidden=16)
    ann = save_checkpoint(net, settings.checkpoint_dir, version=version, step=version * 10)
    if sha256 is not None:
        ann = dataclasses.replace(ann, sha256=sha256)
    publish(settings, settings.topics.checkpoints, [(ANNOUNCEMENT_KEY, encode(ann))])
    return ann


def send_announcement(settings: Settings, ann) -> None:
    publish(settings, settings.topics.checkpoints, [(ANNOUNCEMENT_KEY, encode(ann))])


def read_topic(settings: Settings, topic: str, until, timeout: float = 15.0) -> list:
    """Records of ``topic`` from the beginning until ``until(records)`` is true."""
    consumer = make_consumer(settings, [topic], group_id=None, from_beginning=True)
    records: list = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for part in consumer.poll(timeout_ms=200).values():
                records.extend(part)
            if until(records):
                return records
    finally:
        consumer.close()
    raise AssertionError(f"timed out reading {topic}: {len(records)} records")
