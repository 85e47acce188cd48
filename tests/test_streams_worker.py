"""The Faust stream worker as a process on a real embedded broker (both engines, one broker per
engine and module): joins, out-of-order, duplicate and late events, session ends, dead letters,
metrics."""

from __future__ import annotations

import json
import time

import pytest

from harness.broker import free_port
from memento.kafka_io import make_consumer, make_producer, poll
from harness.processes import ProcessGroup, memento_command
from memento.schemas import Action, Recommendation, encode
from support.streams import PARTITIONS, at_end, fresh_settings, metric, metrics, wait_ticks

pytestmark = pytest.mark.integration


def test_worker_joins_attributes_and_dead_letters(broker, tmp_path):
    s = fresh_settings(broker, tmp_path, window_s=60.0, allowed_lateness_s=0.0, session_gap_s=120.0)
    port = free_port()
    with ProcessGroup() as group:
        group.start("worker", memento_command("worker", "--metrics-port", str(port), "--app-id", f"w-{s.topics.actions}"),
                    env=s.to_env(), log_dir=tmp_path / "logs")
        producer = make_producer(s)
        d = s.item_dim
        expected, recs = {}, {}
        for i in range(20):
            user = f"u{i % 5}"
            rid = f"r{i}"
            recommendation = Recommendation(
                request_id=rid, user_id=user, item_id=str(i % 3), case_id="c", propensity=0.5, policy_version=0,
                ts=1000.0 + 10 * i, state=[0.0] * d, case_features=[0.0] * (2 * d + 1))
            recs[rid] = (user, encode(recommendation))
            if i % 4 == 3:  # the action arrives before the recommendation it answers
                producer.send(s.topics.actions, key=user, value=encode(Action(
                    f"e{i}", user, str(i % 3), "cart", 1005.0 + 10 * i, rid)))
                producer.send(s.topics.recommendations, key=user, value=encode(recommendation))
            else:
                producer.send(s.topics.recommendations, key=user, value=encode(recommendation))
                if i % 4 != 2:  # no reaction → reward 0
                    producer.send(s.topics.actions, key=user, value=encode(Action(
                        f"e{i}", user, str(i % 3), "click" if i % 4 == 0 else "purchase", 1005.0 + 10 * i, rid)))
            if i == 5:  # a duplicate recommendation while its window is open
                producer.send(s.topics.recommendations, key=user, value=encode(recommendation))
            # The user's next recommendation (10 later, 100 s) falls in the session gap (e, e + 120] after
            # the window end e = ts + 60 for i < 10; nothing of the user's follows the others.
            expected[rid] = ({0: 1.0, 1: 5.0, 2: 0.0, 3: 3.0}[i % 4], i >= 10)
        producer.send(s.topics.actions, key="u1", value=b'{"event_id": "broken"')
        # an organic action sent twice; 1150 is inside no window of the rewarded item and
        # inside the gap of r6 only (done=False anyway)
        producer.send(s.topics.actions, key="u1", value=encode(Action("dup", "u1", "z", "click", 1150.0)))
        producer.send(s.topics.actions, key="u1", value=encode(Action("dup", "u1", "z", "click", 1150.0)))
        for u in range(5):  # advance the actions past every window; the recommendations close by idleness
            producer.send(s.topics.actions, key=f"u{u}", value=encode(Action(f"adv{u}", f"u{u}", "z", "click", 5000.0)))
        producer.flush()

        consumer = make_consumer(s, [s.topics.transitions, s.topics.dead_letter, s.topics.cases], group_id=None)
        transitions: dict[str, list[tuple[float, bool]]] = {}
        dead, cases = [], []

        def read(until, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not until():
                group.check()
                for batch in poll(consumer, s, 200).values():
                    for m in batch:
                        body = json.loads(m.value)
                        if m.topic == s.topics.transitions:
                            transitions.setdefault(body["transition_id"], []).append((body["reward"], body["done"]))
                        elif m.topic == s.topics.dead_letter:
                            dead.append(body)
                        else:
                            cases.append(body["case_id"])

        read(lambda: len(transitions) >= len(expected) and dead, timeout=90)
        assert {rid: copies for rid, copies in transitions.items()} == {rid: [r] for rid, r in expected.items()}

        # Late: a purchase inside r2's window (reward 0, closed) and a replay of r0, after the
        # fact; then an organic marker action whose case shows the worker got past both.
        user2, _ = recs["r2"]
        producer.send(s.topics.actions, key=user2, value=encode(Action("late-p", user2, "2", "purchase", 1030.0, "r2")))
        producer.send(s.topics.recommendations, key=recs["r0"][0], value=recs["r0"][1])
        producer.send(s.topics.actions, key=user2, value=encode(Action("marker", user2, "z", "click", 5001.0)))
        producer.flush()
        read(lambda: "act:marker" in cases, timeout=30)
        assert "act:marker" in cases
        wait_ticks(port, 3 * PARTITIONS, group=group)  # anything wrongly reopened or doubled is emitted by then
        ends = consumer.end_offsets(list(consumer.assignment()))
        read(lambda: at_end(consumer, ends), timeout=30)
        assert at_end(consumer, ends), "the transitions topic was not read to its end"
        assert {rid: copies for rid, copies in transitions.items()} == {rid: [r] for rid, r in expected.items()}

        assert len(dead) == 1 and "not valid JSON" in dead[0]["reason"]
        assert dead[0]["original"] == '{"event_id": "broken"' and dead[0]["source_topic"] == s.topics.actions
        # organic cases: one per distinct organic action (the duplicate is ignored), one per closed window
        assert sorted(c for c in cases if c.startswith("act:")) == sorted(
            ["act:dup", "act:marker"] + [f"act:adv{u}" for u in range(5)])
        assert sorted(c for c in cases if c.startswith("rec:")) == sorted(f"rec:{rid}" for rid in expected)

        outcomes = {o: metric(port, "memento_stream_attribution_total", strict=True, outcome=o)
                    for o in ("hit", "miss", "late", "duplicate", "malformed")}
        assert outcomes == {"hit": 15, "miss": 5, "late": 1, "duplicate": 3, "malformed": 1}
        assert metric(port, "memento_stream_session_ends_total", strict=True) == 10
        assert metric(port, "memento_stream_open_windows", strict=True) == 0
        # consumer lag per input partition: every partition reported, nothing left behind
        deadline = time.monotonic() + 15
        while True:
            samples = [(lab["topic"], lab["partition"], v) for name, lab, v in metrics(port)
                       if name in ("memento_stream_consumer_lag", "memento_stream_consumer_read_lag")]
            if {(t, p) for t, p, _ in samples} == {(t, str(p)) for t in (s.topics.actions, s.topics.recommendations)
                                                   for p in range(4)} and all(v == 0 for *_, v in samples):
                break
            assert time.monotonic() < deadline, f"lag not reported or not 0: {samples}"
            time.sleep(0.5)
        consumer.close()
        producer.close(5)
        assert group.stop_all()["worker"] == 0
