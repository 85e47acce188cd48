"""Serving over a real embedded Kafka-protocol broker: readiness, the /v1/recommend contract and
its Recommendation on Kafka, input validation, auth on /v1/feedback, malformed cases."""

from __future__ import annotations

import numpy as np
import pytest

from memento.encoder import HistoryEntry, ItemEncoder, StateEncoder
from memento.schemas import Action, DeadLetter, Recommendation, decode
from harness.broker import free_port
from serving.app import ServingConfig
from serving.auth import ApiTokens
from serving.policy import PolicyOptions
from support.serving import (ServerThread, announce, fresh_settings, http, make_cases, publish,
                             publish_cases, read_topic, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]



def test_readiness_contract_and_published_recommendation(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path)
    with ServerThread(settings) as server:
        assert http("GET", f"{server.url}/healthz")[0] == 200
        status, body = http("GET", f"{server.url}/readyz")
        assert status == 503 and body == {"ready": False, "policy_version": None, "cases": 0}
        status, body = http("POST", f"{server.url}/v1/recommend", {"user_id": "u1"})
        assert status == 503 and "not ready" in body["error"]

        # A policy alone is not enough.
        announce(settings, 0)
        wait_for(lambda: http("GET", f"{server.url}/readyz")[1]["policy_version"] == 0, what="policy v0")
        status, body = http("GET", f"{server.url}/readyz")
        assert status == 503 and body["ready"] is False and body["cases"] == 0

        cases = make_cases(settings, 20)
        publish_cases(settings, cases)
        status, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(
            http("GET", f"{server.url}/readyz")), what="ready")
        assert body["ready"] is True and body["policy_version"] == 0 and 1 <= body["cases"] <= 20
        # the cases topic has two partitions: they may land in more than one batch
        status, body = wait_for(lambda: (lambda r: r if r[1]["cases"] == 20 else None)(
            http("GET", f"{server.url}/readyz")), what="all 20 cases")
        assert status == 200 and body == {"ready": True, "policy_version": 0, "cases": 20}

        history = [{"item_id": "item3", "action": "cart", "ts": 5.0}]
        status, rec = http("POST", f"{server.url}/v1/recommend",
                           {"user_id": "u1", "ts": 10.0, "k": 3, "explain": True,
                            "context": {"recent_items": history}})
        assert status == 200, rec
        assert set(rec) == {"request_id", "user_id", "item_id", "items", "case_id", "propensity",
                            "policy_version", "ts", "candidates"}
        assert rec["user_id"] == "u1" and rec["ts"] == 10.0 and rec["policy_version"] == 0
        assert len(rec["items"]) == 3 and len(set(rec["items"])) == 3 and rec["items"][0] == rec["item_id"]
        by_id = {c.case_id: c for c in cases}
        assert by_id[rec["case_id"]].item_id == rec["item_id"]
        assert len(rec["candidates"]) == settings.top_k
        assert abs(sum(c["probability"] for c in rec["candidates"]) - 1.0) < 1e-6
        chosen = [c for c in rec["candidates"] if c["case_id"] == rec["case_id"]]
        assert len(chosen) == 1 and chosen[0]["probability"] == pytest.approx(rec["propensity"])
        assert min(c["probability"] for c in rec["candidates"]) >= PolicyOptions().min_prob - 1e-9
        sims = [c["similarity"] for c in rec["candidates"]]
        assert sims == sorted(sims, reverse=True)

        # The state is the encoder's state of the context history.
        expected_state = StateEncoder(ItemEncoder(settings.item_dim)).encode([HistoryEntry("item3", "cart", 5.0)])
        records = read_topic(settings, settings.topics.recommendations,
                             lambda rs: any(decode(Recommendation, r.value).request_id == rec["request_id"]
                                            for r in rs))
        published = [decode(Recommendation, r.value) for r in records]
        match = [(r, p) for r, p in zip(records, published) if p.request_id == rec["request_id"]]
        assert len(match) == 1
        record, pub = match[0]
        assert record.key == b"u1"
        assert pub.propensity == pytest.approx(rec["propensity"]) and pub.case_id == rec["case_id"]
        assert pub.item_id == rec["item_id"] and pub.policy_version == 0 and pub.ts == 10.0
        np.testing.assert_allclose(pub.state, expected_state, atol=1e-6)
        assert len(pub.case_features) == 2 * settings.item_dim + 1
        assert pub.served_at > 0

        status, case = http("GET", f"{server.url}/v1/cases/{rec['case_id']}")
        assert status == 200 and case["item_id"] == rec["item_id"]
        status, body = http("GET", f"{server.url}/v1/cases/nope")
        assert status == 404 and "nope" in body["error"]
        status, stats = http("GET", f"{server.url}/v1/stats")
        assert stats == {"policy_version": 0, "cases": 20, "cases_appended": 20, "reloads": 1,
                         "reload_failures": 0, "requests": 1}
        status, text = http("GET", f"{server.url}/metrics")
        assert status == 200 and 'memento_serving_request_seconds_count{endpoint="/v1/recommend"}' in text
        assert "memento_serving_policy_version 0.0" in text


BAD_REQUESTS = [
    (b"not json", 400, "JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"{}", 422, "'user_id'"),
    (b'{"user_id": ""}', 422, "'user_id'"),
    (b'{"user_id": 7}', 422, "'user_id'"),
    (b'{"user_id": "u", "k": 0}', 422, "'k'"),
    (b'{"user_id": "u", "k": 101}', 422, "'k'"),
    (b'{"user_id": "u", "k": true}', 422, "'k'"),
    (b'{"user_id": "u", "ts": "yesterday"}', 422, "'ts'"),
    (b'{"user_id": "u", "explain": "yes"}', 422, "'explain'"),
    (b'{"user_id": "u", "context": []}', 422, "'context'"),
    (b'{"user_id": "u", "context": {"recent_items": {}}}', 422, "'context.recent_items'"),
    (b'{"user_id": "u", "context": {"recent_items": [{"item_id": "i"}]}}', 422,
     "'context.recent_items[0].action'"),
    (b'{"user_id": "u", "context": {"recent_items": [{"item_id": "i", "action": "stare"}]}}', 422,
     "'context.recent_items[0].action'"),
]


def test_validation_auth_feedback_and_malformed_cases(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path)
    feed, rotated, admin = "feed-" + "f" * 16, "feed-new-" + "n" * 16, "admin-" + "a" * 16
    metrics_port = free_port()
    config = ServingConfig(options=PolicyOptions(top_k=settings.top_k), max_body_bytes=4096, bank_nprobe=3,
                           api_tokens=ApiTokens.parse(f"feedback:{feed}; feedback:{rotated}\ncases,admin:{admin}"),
                           metrics_port=metrics_port, metrics_host="127.0.0.1")
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with ServerThread(settings, config) as server:
        publish_cases(settings, make_cases(settings, 10))
        publish(settings, settings.topics.cases, [("bad-1", b"{broken"), ("bad-2", b'{"case_id": "x"}')])
        announce(settings, 1)
        wait_for(lambda: http("GET", f"{server.url}/readyz")[0] == 200, what="ready")
        assert server.service.bank.options.nprobe == 3  # --bank-nprobe reaches the bank

        for raw, status, field in BAD_REQUESTS:
            got, body = http("POST", f"{server.url}/v1/recommend", raw=raw)
            assert got == status and field in body["error"], (raw, got, body)
        got, body = http("POST", f"{server.url}/v1/recommend", raw=b'{"user_id": "' + b"x" * 5000 + b'"}')
        assert got == 413 and "4096" in body["error"]

        feedback = {"user_id": "u9", "item_id": "item2", "action": "purchase", "ts": 3.0, "request_id": "r1"}
        got, body = http("POST", f"{server.url}/v1/feedback", feedback)
        assert got == 401 and "Authorization" in body["error"]
        got, body = http("POST", f"{server.url}/v1/feedback", feedback, {"Authorization": "Bearer wrong"})
        assert got == 403 and "invalid bearer token" in body["error"]
        got, body = http("POST", f"{server.url}/v1/feedback", feedback, {"Authorization": f"Bearer {admin}"})
        assert got == 403 and "does not grant the 'feedback' scope" in body["error"]
        # two tokens hold the scope at once (rotation): the new one is accepted beside the old
        got, body = http("POST", f"{server.url}/v1/feedback", {**feedback, "action": "stare"},
                         {"Authorization": f"Bearer {rotated}"})
        assert got == 422
        # cases (a user's state vector) and stats need their scopes; recommend stays open (no token holds it)
        assert http("GET", f"{server.url}/v1/cases/case-0")[0] == 401
        assert http("GET", f"{server.url}/v1/cases/case-0", headers={"Authorization": f"Bearer {feed}"})[0] == 403
        assert http("GET", f"{server.url}/v1/cases/case-0", headers={"Authorization": f"Bearer {admin}"})[0] == 200
        assert http("GET", f"{server.url}/v1/stats")[0] == 401
        # metrics on their own port, not on the API's
        assert http("GET", f"{server.url}/metrics")[0] == 404
        auth = {"Authorization": f"Bearer {feed}"}
        got, body = http("POST", f"{server.url}/v1/feedback", {**feedback, "action": "stare"}, auth)
        assert got == 422 and "'action'" in body["error"]
        got, body = http("POST", f"{server.url}/v1/feedback", {"user_id": "u9"}, auth)
        assert got == 422 and "'item_id'" in body["error"]
        got, body = http("POST", f"{server.url}/v1/feedback", feedback, auth)
        assert got == 202 and body["event_id"]

        records = read_topic(settings, settings.topics.actions, lambda rs: len(rs) >= 1)
        assert len(records) == 1 and records[0].key == b"u9"
        action = decode(Action, records[0].value)
        assert (action.user_id, action.item_id, action.action, action.ts, action.request_id,
                action.event_id) == ("u9", "item2", "purchase", 3.0, "r1", body["event_id"])

        # The action comes back through the actions topic into u9's history and state.
        expected = StateEncoder(ItemEncoder(settings.item_dim)).encode([HistoryEntry("item2", "purchase", 3.0)])

        def state_of_u9(ts: float = 4.0):
            got, rec = http("POST", f"{server.url}/v1/recommend", {"user_id": "u9", "ts": ts})
            assert got == 200
            recs = read_topic(settings, settings.topics.recommendations,
                              lambda rs: any(decode(Recommendation, r.value).request_id == rec["request_id"]
                                             for r in rs))
            pub = [decode(Recommendation, r.value) for r in recs]
            return [p for p in pub if p.request_id == rec["request_id"]][0].state

        wait_for(lambda: np.allclose(state_of_u9(), expected, atol=1e-6), timeout=15, interval=0.2,
                 what="u9's action in its state")
        # An event time before the action does not see it.
        assert not np.any(state_of_u9(2.0))

        # Two malformed case messages were counted and dead-lettered; the good ones are in.
        status, stats = http("GET", f"{server.url}/v1/stats", headers={"Authorization": f"Bearer {admin}"})
        assert stats["cases"] == 10
        status, text = http("GET", metrics_url)
        assert f'memento_serving_malformed_messages_total{{topic="{settings.topics.cases}"}} 2.0' in text
        letters = read_topic(settings, settings.topics.dead_letter, lambda rs: len(rs) >= 2)
        reasons = [decode(DeadLetter, r.value).reason for r in letters]
        assert any("not valid JSON" in r for r in reasons) and any("missing field" in r for r in reasons)
        status, text = http("GET", metrics_url)
        assert 'memento_serving_requests_total{endpoint="/v1/feedback",status="401"} 1.0' in text


def test_no_token_configured_allows_feedback(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path)
    with ServerThread(settings) as server:
        wait_for(lambda: server.service.publisher is not None, what="Kafka connection")
        got, body = http("POST", f"{server.url}/v1/feedback",
                         {"user_id": "u1", "item_id": "i1", "action": "click"})
        assert got == 202
        status, doc = http("GET", f"{server.url}/openapi.json")
        assert status == 200 and "/v1/recommend" in doc["paths"]
