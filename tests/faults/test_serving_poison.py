"""Poison records on serving's topics and bodies, and a dead background thread, on a real
embedded broker (both engines).

Before the fix, a record that made the JSON parser or a number check raise anything but
``SchemaError`` (a 5,000-deep array: ``RecursionError``; a 400-digit number: ``OverflowError``;
a 5,000-digit integer: ``ValueError``) stopped the cases follower for good while ``/healthz``
said ok, and a checkpoint whose ``config`` had an unknown key stopped the checkpoint follower
(``TypeError``); over HTTP the same bodies were uncounted 500s.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save as st_save

from memento.checkpoint import checkpoint_file_name, sha256_bytes
from memento.qnet import QNetwork
from memento.schemas import CheckpointAnnouncement, DeadLetter, decode, encode
from serving.app import ServingConfig
from serving.policy import PolicyOptions
from support.serving import (ServerThread, announce, fresh_settings, http, make_cases, publish,
                             publish_cases, read_topic, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(180)]

DEEP = b"[" * 5000 + b"]" * 5000
WIDE_NUMBER = b"1" + b"0" * 400
LONG_INTEGER = b"1" * 5000


def _case_with(outcome: bytes, settings) -> bytes:
    case = json.loads(encode(make_cases(settings, 1, prefix="poison")[0]))
    text = json.dumps(case).replace(f'"outcome": {json.dumps(case["outcome"])}', '"outcome": OUTCOME')
    return text.replace("OUTCOME", outcome.decode()).encode()


def _checkpoint_with_unknown_key(settings, version: int) -> CheckpointAnnouncement:
    net = QNetwork(settings.state_dim, hidden=16)
    config = {**net.config(), "bogus_option": 1}
    data = st_save({k: v.contiguous() for k, v in net.state_dict().items()},
                   metadata={"version": str(version), "step": "0", "config": json.dumps(config)})
    path = f"{settings.checkpoint_dir}/{checkpoint_file_name(version)}"
    with open(path, "wb") as fh:
        fh.write(data)
    return CheckpointAnnouncement(version=version, path=path, sha256=sha256_bytes(data), created_at=0.0,
                                  step=0, state_dim=settings.state_dim, item_dim=settings.item_dim)


def test_poison_records_and_bodies_are_refused_one_by_one(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path)
    import os
    os.makedirs(settings.checkpoint_dir, exist_ok=True)
    config = ServingConfig(options=PolicyOptions(top_k=settings.top_k))
    with ServerThread(settings, config) as server:
        poison = [DEEP, _case_with(WIDE_NUMBER, settings), _case_with(LONG_INTEGER, settings)]
        # both partitions of the cases topic get poison first, then the good cases
        publish(settings, settings.topics.cases, [(key, raw) for raw in poison for key in ("a", "b")])
        publish_cases(settings, make_cases(settings, 10))
        bad = _checkpoint_with_unknown_key(settings, 1)
        publish(settings, settings.topics.checkpoints, [("policy", encode(bad)), ("policy", DEEP)])
        wait_for(lambda: server.service.followers and server.service.followers[-1].records_seen >= 2,
                 what="the checkpoint follower read both announcements")
        good = announce(settings, 2)

        wait_for(lambda: http("GET", f"{server.url}/readyz")[1].get("cases") == 10, what="the 10 good cases")
        wait_for(lambda: http("GET", f"{server.url}/readyz")[1].get("policy_version") == 2, what="version 2")
        assert http("GET", f"{server.url}/healthz") == (200, {"ok": True})
        letters = read_topic(settings, settings.topics.dead_letter, lambda rs: len(rs) >= 6)
        reasons = sorted(decode(DeadLetter, r.value).reason for r in letters)
        assert len(reasons) == 6, reasons
        assert sum("nested too deeply" in r for r in reasons) == 2
        assert sum("'outcome' must be a finite number" in r for r in reasons) == 2
        assert sum("4300 digits" in r for r in reasons) == 2
        assert server.service.followers[-1].rejected.keys() == {1}
        assert "bogus_option" in server.service.followers[-1].rejected[1]
        assert good.version == server.service._current_version()

        # the same poison over HTTP: 4xx naming the problem, counted; then a normal answer
        for raw, status, words in [(DEEP, 400, "nested too deeply"),
                                   (b'{"user_id": "u1", "ts": ' + WIDE_NUMBER + b"}", 422, "'ts' must be a finite"),
                                   (b'{"user_id": "u1", "k": ' + LONG_INTEGER + b"}", 400, "4300 digits")]:
            got, body = http("POST", f"{server.url}/v1/recommend", raw=raw)
            assert (got, words in body.get("error", "")) == (status, True), (raw[:40], got, body)
        assert http("POST", f"{server.url}/v1/recommend", {"user_id": "u1", "ts": 1.0})[0] == 200
        text = http("GET", f"{server.url}/metrics")[1]
        assert 'memento_serving_requests_total{endpoint="/v1/recommend",status="400"} 2.0' in text
        assert 'memento_serving_requests_total{endpoint="/v1/recommend",status="422"} 1.0' in text
        assert 'status="500"' not in text


def test_a_dead_follower_fails_healthz(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path)
    with ServerThread(settings) as server:
        wait_for(lambda: server.service.started.is_set(), what="start-up")
        assert http("GET", f"{server.url}/healthz") == (200, {"ok": True})
        assert 'memento_serving_thread_alive{thread="follow-' in http("GET", f"{server.url}/metrics")[1]
        cases = next(f for f in server.service.followers if f.topic == settings.topics.cases)
        cases.error = RuntimeError("injected")
        cases._stop_event.set()  # the thread ends as it would on an unexpected error
        cases.join(10)
        status, body = http("GET", f"{server.url}/healthz")
        assert status == 503 and body["ok"] is False
        assert any(f"thread follow-{settings.topics.cases} is dead" in p and "injected" in p for p in body["problems"])
        text = http("GET", f"{server.url}/metrics")[1]
        assert f'memento_serving_thread_alive{{thread="follow-{settings.topics.cases}"}} 0.0' in text
