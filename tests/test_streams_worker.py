"""The Faust stream worker as a process on a real embedded broker (both engines)."""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaConsumer

from memento.broker import EmbeddedBroker
from memento.kafka_io import make_producer
from memento.processes import ProcessGroup, memento_command
from memento.schemas import Action, Recommendation, encode

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("engine", EmbeddedBroker.engines())
def test_worker_joins_attributes_and_dead_letters(engine, tmp_path):
    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker, ProcessGroup() as group:
        s = broker.settings(data_dir=str(tmp_path / "data"), window_s=60.0, allowed_lateness_s=0.0)
        group.start("worker", memento_command("worker", "--metrics-port", "0"), env=s.to_env(),
                    log_dir=tmp_path / "logs")
        producer = make_producer(s)
        d = s.item_dim
        expected = {}
        for i in range(20):
            user = f"u{i % 5}"
            rid = f"r{i}"
            recommendation = Recommendation(
                request_id=rid, user_id=user, item_id=str(i % 3), case_id="c", propensity=0.5, policy_version=0,
                ts=1000.0 + 10 * i, state=[0.0] * d, case_features=[0.0] * (2 * d + 1))
            if i % 4 == 3:  # the action arrives before the recommendation it answers
                producer.send(s.topics.actions, key=user, value=encode(Action(
                    f"e{i}", user, str(i % 3), "cart", 1005.0 + 10 * i, rid)))
                producer.send(s.topics.recommendations, key=user, value=encode(recommendation))
            else:
                producer.send(s.topics.recommendations, key=user, value=encode(recommendation))
                if i % 4 != 2:  # no reaction → reward 0
                    producer.send(s.topics.actions, key=user, value=encode(Action(
                        f"e{i}", user, str(i % 3), "click" if i % 4 == 0 else "purchase", 1005.0 + 10 * i, rid)))
            expected[rid] = {0: 1.0, 1: 5.0, 2: 0.0, 3: 3.0}[i % 4]
        producer.send(s.topics.actions, key="u1", value=b'{"event_id": "broken"')
        producer.send(s.topics.actions, key="u1", value=encode(Action("dup", "u1", "1", "click", 1001.0)))
        producer.send(s.topics.actions, key="u1", value=encode(Action("dup", "u1", "1", "click", 1001.0)))
        for u in range(5):  # advance every user's partition past all windows
            producer.send(s.topics.actions, key=f"u{u}", value=encode(Action(f"late{u}", f"u{u}", "z", "click", 5000.0)))
        producer.flush()

        consumer = KafkaConsumer(s.topics.transitions, s.topics.dead_letter, s.topics.cases,
                                 bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                                 consumer_timeout_ms=1000)
        transitions: dict[str, list[float]] = {}
        dead, cases = [], []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (len(transitions) < len(expected) or not dead):
            group.check()
            for m in consumer:
                body = json.loads(m.value)
                if m.topic == s.topics.transitions:
                    transitions.setdefault(body["transition_id"], []).append(body["reward"])
                elif m.topic == s.topics.dead_letter:
                    dead.append(body)
                else:
                    cases.append(body["case_id"])
        time.sleep(2)  # anything doubled would arrive now
        for m in consumer:
            if m.topic == s.topics.transitions:
                transitions.setdefault(json.loads(m.value)["transition_id"], []).append(None)
        consumer.close()

        assert {rid: rewards for rid, rewards in transitions.items()} == {rid: [r] for rid, r in expected.items()}
        assert len(dead) == 1 and "not valid JSON" in dead[0]["reason"]
        assert dead[0]["original"] == '{"event_id": "broken"' and dead[0]["source_topic"] == s.topics.actions
        # organic cases: one per distinct organic action (the duplicate is ignored), one per closed window
        assert sorted(c for c in cases if c.startswith("act:")) == sorted(["act:dup"] + [f"act:late{u}" for u in range(5)])
        assert sorted(c for c in cases if c.startswith("rec:")) == sorted(f"rec:{rid}" for rid in expected)
        assert group.stop_all()["worker"] == 0
