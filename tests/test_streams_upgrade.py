"""A rolling upgrade of the stream worker: the table's changelog holds user states as the workers
before 2026-12-03 wrote them (compact JSON; the oldest with their vectors as JSON lists), and a
worker of today, starting with an empty store, restores them and closes their windows with the
right rewards. Today's worker writes states as MessagePack (:func:`streams.app.encode_state`)."""

from __future__ import annotations

import json

import msgspec
import pytest

from harness.processes import ProcessGroup
from memento.config import RewardWeights
from memento.encoder import ItemEncoder, StateEncoder
from memento.kafka_io import ensure_topics, make_producer, partition_of
from memento.schemas import Recommendation, decode, unpack_vector
from streams.app import USERS_TABLE, decode_state, encode_state
from streams.attribution import RewardAttribution
from support.streams import (ANSWERS, PARTITIONS, Scenario, TransitionLog, assert_exactly, fresh_settings, produce,
                             start_worker, wait_assigned)


def _old_states(sc: Scenario, settings, recs: range, lists_for: set[str]) -> dict[str, dict]:
    """The states an older worker held after the recommendations ``recs`` (no answer yet): one
    open window per user; the users of ``lists_for`` with their vectors as JSON lists (states
    written before vectors were packed)."""
    attribution = RewardAttribution(StateEncoder(ItemEncoder(sc.d)), RewardWeights(), window_s=sc.window_s,
                                     allowed_lateness_s=0.0, session_gap_s=sc.gap_s)
    states: dict[str, dict] = {}
    for i in recs:
        _, user, value = sc.rec(i)
        state = states.setdefault(user, attribution.new_state())
        assert attribution.add_recommendation(state, RewardAttribution.recommendation_dict(
            decode(Recommendation, value))) == "pending"
        state["p"] = partition_of(user.encode(), PARTITIONS)
    for user in lists_for:
        for window in states[user]["pending"]:
            window["state"] = unpack_vector(window["state"])
            window["case_features"] = unpack_vector(window["case_features"])
    return states


def test_state_codec_reads_the_older_workers_json_and_refuses_anything_else():
    state = {"history": [["7", "click", 1796310303.2355635, "e1"]], "pending": [{"state": "AACAPw==", "ts": 1.5}],
             "held": [], "closed": ["r1"], "seen": ["e1"], "p": 3}
    assert decode_state(json.dumps(state, separators=(",", ":")).encode()) == state  # written before 2026-12-03
    assert decode_state(json.dumps(state, indent=1).encode()) == state
    assert decode_state(encode_state(state)) == state
    assert decode_state(None) is None
    with pytest.raises(TypeError, match="unsupported"):
        encode_state({"history": [object()]})
    for raw in (b"\x93\x01\x02\x03", encode_state(state)[:-3], b"\x80\x05\x95"):   # a list, cut short, a pickle
        with pytest.raises(msgspec.DecodeError):
            decode_state(raw)


@pytest.mark.integration
def test_worker_restores_json_states_from_the_changelog(noida, tmp_path):
    """Recommendations 20–39 are open windows in states that an older worker wrote to the
    changelog (users u0–u4 in the oldest form); today's worker, with an empty store, gets their
    answers and recommendations 40–59 with theirs: every transition of 20–59 comes out once with
    its reward and ``done``."""
    sc = Scenario(n=60, users=20)
    s = fresh_settings(noida, tmp_path, window_s=sc.window_s, allowed_lateness_s=0.0, session_gap_s=sc.gap_s)
    app_id = f"w-{s.topics.actions}"
    changelog = f"{app_id}-{USERS_TABLE}-changelog"
    ensure_topics(s, {changelog: PARTITIONS})
    states = _old_states(sc, s, range(20, 40), lists_for={f"u{k}" for k in range(5)})
    producer = make_producer(s)
    try:
        for user, state in states.items():  # as the older worker wrote them: key as Faust's JSON, value raw
            producer.send(changelog, key=json.dumps(user).encode(), value=json.dumps(state, separators=(",", ":")).encode(),
                          partition=state["p"])
        producer.flush(30)
    finally:
        producer.close(5)

    log = TransitionLog(s)
    with ProcessGroup() as group:
        _, port = start_worker(group, s, tmp_path, name="worker", app_id=app_id)
        wait_assigned(group, s, [port])
        produce(s, [a for i in range(20, 40) for a in sc.answer(i)] + sc.events(40, 60) + sc.flush())
        expected = {f"r{i}": (ANSWERS[i % 4][1], i >= 40) for i in range(20, 60)}
        log.read(lambda c: set(expected) <= set(c), timeout=60, group=group)
        copies = log.read_to_end(group=group)
        log.close()
        assert group.stop_all()["worker"] == 0
    assert_exactly(copies, expected)
