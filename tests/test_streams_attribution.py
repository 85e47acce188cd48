"""Reward attribution rules of the stream worker, without Kafka."""

from __future__ import annotations

import numpy as np
import pytest

from memento.config import RewardWeights
from memento.encoder import HistoryEntry, ItemEncoder, StateEncoder
from streams.attribution import RewardAttribution

D = 8


@pytest.fixture
def attr() -> RewardAttribution:
    return RewardAttribution(StateEncoder(ItemEncoder(D)), RewardWeights(), window_s=60.0,
                             allowed_lateness_s=10.0)


def rec(request_id: str, item: str, ts: float) -> dict:
    return {"request_id": request_id, "user_id": "u", "item_id": item, "case_id": "c1", "propensity": 0.25,
            "policy_version": 3, "ts": ts, "state": [0.1] * D, "case_features": [0.0] * (2 * D + 1)}


def test_reward_is_largest_weight_inside_window(attr):
    st = attr.new_state()
    attr.add_recommendation(st, rec("r1", "7", 100.0))
    attr.add_action(st, "e1", "7", "click", 110.0)
    attr.add_action(st, "e2", "7", "purchase", 150.0)
    attr.add_action(st, "e3", "7", "cart", 161.0)  # after the window end (160)
    attr.add_action(st, "e4", "8", "purchase", 120.0)  # another item
    (t, case), = attr.close_due(st, watermark=171.0, now=5.0)
    assert t.reward == 5.0 and t.transition_id == "r1" and t.propensity == 0.25
    assert case.case_id == "rec:r1" and case.outcome == 5.0 and case.item_id == "7"


def test_window_closes_only_after_lateness(attr):
    st = attr.new_state()
    attr.add_recommendation(st, rec("r1", "7", 100.0))
    assert attr.close_due(st, watermark=170.0, now=0.0) == []
    assert attr.next_close(st) == 170.0
    assert len(attr.close_due(st, watermark=170.5, now=0.0)) == 1
    assert attr.next_close(st) is None


def test_no_action_gives_zero_reward(attr):
    st = attr.new_state()
    attr.add_recommendation(st, rec("r1", "7", 100.0))
    (t, _), = attr.close_due(st, watermark=1000.0, now=0.0)
    assert t.reward == 0.0 and attr.stats.miss == 1


def test_action_before_recommendation_arrives_is_attributed(attr):
    """Out of order: the action (event time 120) is consumed before the recommendation (100)."""
    st = attr.new_state()
    attr.add_action(st, "e1", "7", "cart", 120.0)
    attr.add_recommendation(st, rec("r1", "7", 100.0))
    (t, _), = attr.close_due(st, watermark=500.0, now=0.0)
    assert t.reward == 3.0


def test_duplicates_are_idempotent(attr):
    st = attr.new_state()
    assert attr.add_recommendation(st, rec("r1", "7", 100.0)) == "pending"
    assert attr.add_recommendation(st, rec("r1", "7", 100.0)) == "duplicate"
    assert attr.add_action(st, "e1", "7", "click", 110.0) == "new"
    assert attr.add_action(st, "e1", "7", "click", 110.0) == "duplicate"
    assert len(st["history"]) == 1
    assert len(attr.close_due(st, watermark=500.0, now=0.0)) == 1
    # a replayed recommendation after its window closed must not open a second window
    assert attr.add_recommendation(st, rec("r1", "7", 100.0)) == "duplicate"
    assert attr.close_due(st, watermark=900.0, now=0.0) == []


def test_late_action_counted(attr):
    st = attr.new_state()
    assert attr.add_action(st, "e1", "7", "click", 100.0, watermark=200.0) == "late"
    assert attr.stats.late == 1


def test_next_state_uses_history_up_to_window_end(attr):
    st = attr.new_state()
    attr.add_recommendation(st, rec("r1", "7", 100.0))
    attr.add_action(st, "e1", "5", "click", 120.0)
    attr.add_action(st, "e2", "6", "click", 300.0)  # after the window: not in s′
    (t, _), = attr.close_due(st, watermark=500.0, now=0.0)
    expected = attr.encoder.encode([HistoryEntry("5", "click", 120.0)])
    assert np.allclose(t.next_state, expected)


def test_organic_case_uses_state_before_the_action(attr):
    st = attr.new_state()
    attr.add_action(st, "e1", "5", "click", 10.0)
    attr.add_action(st, "e2", "6", "cart", 20.0)
    case = attr.organic_case(st, "e2", "6", "cart", 20.0)
    assert case.case_id == "act:e2" and case.outcome == 3.0
    assert np.allclose(case.state, attr.encoder.encode([HistoryEntry("5", "click", 10.0)]))


def test_history_is_bounded_but_keeps_what_open_windows_need(attr):
    attr.history_len = 3
    st = attr.new_state()
    attr.add_recommendation(st, rec("r1", "7", 100.0))
    for i in range(10):
        attr.add_action(st, f"e{i}", "7" if i == 0 else "9", "purchase" if i == 0 else "click", 101.0 + i)
    assert len(st["history"]) == 10  # all inside the open window
    (t, _), = attr.close_due(st, watermark=1000.0, now=0.0)
    assert t.reward == 5.0
    attr.add_action(st, "e99", "9", "click", 2000.0)
    assert len(st["history"]) == 3
