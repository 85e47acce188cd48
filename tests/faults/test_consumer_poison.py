"""The stream worker and the learner meet the records that once escaped ``decode``: each is
dead-lettered with its reason and the next record is handled. Before the fix the
``RecursionError``, ``OverflowError`` and ``ValueError`` they raise left ``handle``."""

from __future__ import annotations

import dataclasses

import json
from collections import namedtuple

import pytest

from memento.config import Settings
from memento.schemas import DeadLetter, Transition, decode, encode

pytestmark = pytest.mark.faults

POISON = [b"[" * 5000 + b"]" * 5000,
          b'{"event_id": "e", "user_id": "u", "item_id": "i", "action": "click", "ts": 1' + b"0" * 400 + b"}",
          b'{"event_id": "e", "user_id": "u", "item_id": "i", "action": "click", "ts": ' + b"1" * 5000 + b"}"]
REASONS = ["nested too deeply", "'ts' must be a finite number", "4300 digits"]


def test_worker_dead_letters_each_poison_record(tmp_path):
    from streams.app import TransitionWorker

    worker = TransitionWorker(Settings(data_dir=str(tmp_path)), store="memory://")
    t = worker.settings.topics
    for offset, raw in enumerate(POISON):
        for topic in (t.actions, t.recommendations):
            worker.handle(topic, 0, offset, b"u", raw)
    letters = [decode(DeadLetter, value) for topic, _, value in worker._outbox if topic == t.dead_letter]
    assert len(letters) == 2 * len(POISON)
    for reason in REASONS[:1] + REASONS[2:]:
        assert sum(reason in d.reason for d in letters) == 2, (reason, [d.reason for d in letters])
    assert sum(REASONS[1] in d.reason for d in letters) == 1  # a Recommendation lacks the other fields first


def test_learner_dead_letters_each_poison_record_and_keeps_the_good_one(tmp_path):
    from learner.service import LearnerService, LearnerServiceConfig
    from learner.trainer import SoftQConfig

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=4, top_k=2)
    service = LearnerService(settings, SoftQConfig(top_k=2, hidden=8), LearnerServiceConfig(), metrics_port=None)
    from memory_store import CaseBank

    service.bank = CaseBank(None, dim=4)  # what start-up opens
    sent = []
    service.dead_letter = namedtuple("Writer", "send")(lambda *args: sent.append(args))
    Record = namedtuple("Record", "topic partition offset value")
    good = Transition(transition_id="t1", user_id="u", state=[1.0, 0, 0, 0], case_id="c1",
                      case_features=[0.5] * 9, item_id="i", propensity=0.5, reward=1.0,
                      next_state=[0, 1.0, 0, 0], done=True, policy_version=0, ts=1.0)
    transition_poison = [POISON[0], json.dumps({**json.loads(encode(good)), "reward": 1}).replace(
        '"reward": 1', '"reward": 1' + "0" * 400).encode()]
    records = [Record(settings.topics.transitions, 0, i, raw) for i, raw in enumerate(transition_poison)]
    records.append(Record(settings.topics.transitions, 0, 9, encode(good)))
    records += [Record(settings.topics.cases, 0, i, raw) for i, raw in enumerate(POISON)]
    assert service.handle(records) == 1  # the good transition
    assert [s[3][:40] for s in sent] == ["Transition: not valid JSON (nested too d",
                                         "Transition: field 'reward' must be a fin"]
    assert service.metrics.cases_rejected._value.get() == len(POISON)


def test_worker_dead_letters_records_that_would_grow_its_state(tmp_path):
    """A recommendation whose vectors do not have the configured dimensions, and ids longer than
    any consumer accepts, are refused before they reach a user's state (each one made every
    transition of that user, and its table value, as large as the sender liked)."""
    from memento.schemas import Action, Recommendation
    from streams.app import TransitionWorker

    worker = TransitionWorker(Settings(data_dir=str(tmp_path), item_dim=4), store="memory://")
    t = worker.settings.topics
    big = Recommendation(request_id="r1", user_id="u", item_id="i", case_id="c", propensity=0.5, policy_version=0,
                         ts=1.0, state=[0.0] * 100_000, case_features=[0.0] * 9)
    wrong = dataclasses.replace(big, state=[0.0] * 1000)
    long_id = Action(event_id="e" * 300, user_id="u", item_id="i", action="click", ts=1.0)
    worker.handle(t.recommendations, 0, 0, b"u", encode(big))
    worker.handle(t.recommendations, 0, 1, b"u", encode(wrong))
    worker.handle(t.actions, 0, 2, b"u", encode(long_id))
    letters = [decode(DeadLetter, value).reason for topic, _, value in worker._outbox if topic == t.dead_letter]
    assert letters == ["Recommendation: field 'state' holds more than 65536 numbers "
                       f"(original: first 65536 of {len(encode(big))} bytes)",
                       "Recommendation: fields 'state' and 'case_features' must have 4 and 9 values, got 1000 and 9",
                       "Action: field 'event_id' is 300 characters long, more than 256"]
