"""LearnerService against a real embedded Kafka-protocol broker (noida and tansu)."""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from learner.service import LearnerService, LearnerServiceConfig
from learner.trainer import SoftQConfig
from harness.broker import EmbeddedBroker
from memento.checkpoint import load_checkpoint, sha256_bytes
from memento.encoder import case_feature_vector
from memento.kafka_io import client_kwargs, make_producer
from memento.schemas import Case, CheckpointAnnouncement, DeadLetter, Transition, decode, encode

D, K = 8, 4
N_CASES, N_TRANSITIONS = 40, 300


def _unit(rng, n):
    v = rng.normal(size=(n, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _produce(settings, rng) -> None:
    states, items = _unit(rng, N_CASES), _unit(rng, N_CASES)
    cases = [Case(f"case-{i}", states[i].tolist(), f"item-{i}", items[i].tolist(), float(i % 2), float(i))
             for i in range(N_CASES)]
    s, s_next = _unit(rng, N_TRANSITIONS), _unit(rng, N_TRANSITIONS)
    producer = make_producer(settings)
    for case in cases:
        producer.send(settings.topics.cases, key=case.case_id, value=encode(case))
    producer.flush()
    for i in range(N_TRANSITIONS):
        c = cases[rng.integers(N_CASES)]
        t = Transition(f"req-{i}", f"user-{i % 7}", s[i].tolist(), c.case_id,
                       case_feature_vector(c.state, c.item_vec, c.outcome).tolist(), c.item_id, 0.25,
                       float(c.outcome * rng.random()), s_next[i].tolist(), bool(i % 10 == 9), 0, float(i))
        producer.send(settings.topics.transitions, key=t.user_id, value=encode(t))
        if i == 0:  # the same transition again (a redelivery) and a malformed one
            producer.send(settings.topics.transitions, key=t.user_id, value=encode(t))
            producer.send(settings.topics.transitions, key="bad", value=b'{"transition_id": "x", "reward": 1}')
            short = dataclasses.replace(t, transition_id="req-short", state=t.state[:-1])
            producer.send(settings.topics.transitions, key="bad", value=encode(short))
    producer.flush()
    producer.close()


def _read_topic(settings, topic: str, cls, want: int, timeout: float) -> list:
    consumer = KafkaConsumer(**client_kwargs(settings), auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                out.extend(decode(cls, r.value) for r in recs)
    finally:
        consumer.close()
    return out


def _wait(predicate, timeout: float, what: str, running: "_Running") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if running.error is not None:
            raise AssertionError(f"learner failed while waiting for {what}") from running.error
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Running:
    def __init__(self, service: LearnerService):
        self.service, self.stop = service, threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.service.run(self.stop)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "learner did not stop within 30 s"
        if self.error:
            raise self.error


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", EmbeddedBroker.engines())
def test_learner_service_publishes_increasing_verified_checkpoints(tmp_path: Path, engine: str):
    config = SoftQConfig(top_k=K, hidden=16, batch_size=32, seed=0)
    options = LearnerServiceConfig(buffer_capacity=1000, learning_starts=32, publish_every=60,
                                   publish_min_interval_s=0.0, log_every_s=1.0)
    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker:
        settings = broker.settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"),
                                   item_dim=D, top_k=K)
        _produce(settings, np.random.default_rng(0))

        service = LearnerService(settings, config, options, metrics_port=0)
        with _Running(service) as running:
            _wait(lambda: service.transitions_consumed >= N_TRANSITIONS + 1, 60, "all transitions", running)
            _wait(lambda: service.learner.steps >= N_TRANSITIONS - options.learning_starts, 30, "updates",
                  running)
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics").read().decode()
        assert service.duplicates == 1 and service.dead_letters == 2
        assert len(service.buffer) == N_TRANSITIONS
        assert f"memento_learner_transitions_total {N_TRANSITIONS + 1}.0" in scrape
        assert "memento_learner_duplicate_transitions_total 1.0" in scrape
        assert "memento_learner_skipped_updates_total 0.0" in scrape
        # 32 updates start at transition 32, one per transition after that: ≥ 268 updates, ≥ 4 versions
        first_run = _read_topic(settings, settings.topics.checkpoints, CheckpointAnnouncement, 5, 20)
        assert [a.version for a in first_run] == list(range(len(first_run))) and len(first_run) >= 5
        for ann in first_run:
            assert sha256_bytes(Path(ann.path).read_bytes()) == ann.sha256
            net = load_checkpoint(ann.path, ann.sha256, expect_state_dim=D)
            assert net.hidden == 16
        assert first_run[-1].step > first_run[1].step > first_run[0].step == 0

        dead = _read_topic(settings, settings.topics.dead_letter, DeadLetter, 2, 10)
        reasons = sorted(d.reason for d in dead)
        assert len(dead) == 2 and all(d.source_topic == settings.topics.transitions for d in dead)
        assert "missing field 'user_id'" in reasons[1]
        assert f"field 'state' has {D - 1} values, expected {D}" in reasons[0]

        # a restart resumes: buffer, optimiser and bank restored, versions keep increasing
        steps_before = service.learner.steps
        restarted = LearnerService(settings, config, options, metrics_port=None)
        with _Running(restarted) as running:
            _wait(restarted.ready.is_set, 30, "the restarted learner's first announcement", running)
            time.sleep(0.5)
        assert len(restarted.buffer) == N_TRANSITIONS and restarted.learner.steps == steps_before
        assert restarted.transitions_consumed == 0            # offsets were committed
        assert len(restarted.bank) == N_CASES                 # the cases topic is re-read: a no-op here
        assert restarted.published[0].version == first_run[-1].version + 1
        everything = _read_topic(settings, settings.topics.checkpoints, CheckpointAnnouncement,
                                 len(first_run) + 1, 20)
        versions = [a.version for a in everything]
        assert versions == sorted(set(versions)) and versions[-1] == restarted.version
