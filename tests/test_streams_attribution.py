"""Reward attribution rules of the stream worker, without Kafka."""

from __future__ import annotations

import time

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


# -- session ends: done when the user has no event in (window end, window end + gap] ------------

@pytest.fixture
def gap() -> RewardAttribution:
    """window 60, lateness 10, session gap 100: rec at 100 → window end 160, gap (160, 260],
    reward fixed at watermark > 170, done=True decided at watermark > 270."""
    return RewardAttribution(StateEncoder(ItemEncoder(D)), RewardWeights(), window_s=60.0,
                             allowed_lateness_s=10.0, session_gap_s=100.0)


def test_inactive_user_window_is_held_then_done(gap):
    st = gap.new_state()
    gap.add_recommendation(st, rec("r1", "7", 100.0))
    gap.add_action(st, "e1", "7", "cart", 150.0)
    assert gap.close_due(st, watermark=200.0, now=0.0) == []  # closed, held for the gap
    assert gap.next_close(st) == 270.0 and len(st["held"]) == 1 and st["pending"] == []
    assert gap.close_due(st, watermark=270.0, now=0.0) == []  # not past e + g + lateness yet
    (t, case), = gap.close_due(st, watermark=270.5, now=0.0)
    assert (t.transition_id, t.reward, t.done) == ("r1", 3.0, True) and case.outcome == 3.0
    assert gap.stats.session_end == 1 and gap.next_close(st) is None


def test_event_in_gap_known_at_close_emits_at_once_not_done(gap):
    st = gap.new_state()
    gap.add_recommendation(st, rec("r1", "7", 100.0))
    gap.add_action(st, "e1", "8", "click", 200.0)  # in (160, 260]
    (t, _), = gap.close_due(st, watermark=170.5, now=0.0)
    assert (t.reward, t.done) == (0.0, False) and gap.stats.session_end == 0


def test_event_in_gap_after_close_releases_held_window_not_done(gap):
    st = gap.new_state()
    gap.add_recommendation(st, rec("r1", "7", 100.0))
    assert gap.close_due(st, watermark=180.0, now=0.0) == []
    assert gap.add_action(st, "e1", "8", "click", 259.0) == "new"
    assert gap.next_close(st) == 170.0  # due at once
    (t, _), = gap.close_due(st, watermark=180.0, now=0.0)
    assert (t.reward, t.done) == (0.0, False)


def test_recommendation_counts_as_activity(gap):
    """The user's next request (a recommendation) in the gap continues the session, also when
    its own window closes in the same call."""
    st = gap.new_state()
    gap.add_recommendation(st, rec("r1", "7", 100.0))
    gap.add_recommendation(st, rec("r2", "7", 200.0))  # 200 ∈ (160, 260]; its own gap is (260, 360]
    out = gap.close_due(st, watermark=1000.0, now=0.0)
    assert [(t.transition_id, t.done) for t, _ in out] == [("r1", False), ("r2", True)]


def test_gap_bounds_are_open_then_closed(gap):
    """(e, e + g]: an event exactly at the window end does not continue the session, one exactly
    at e + g does."""
    at_end, at_gap_end = gap.new_state(), gap.new_state()
    for st, ts in ((at_end, 160.0), (at_gap_end, 260.0)):
        gap.add_recommendation(st, rec("r1", "7", 100.0))
        gap.add_action(st, "e1", "8", "click", ts)
    assert [t.done for t, _ in gap.close_due(at_end, watermark=1000.0, now=0.0)] == [True]
    assert [t.done for t, _ in gap.close_due(at_gap_end, watermark=1000.0, now=0.0)] == [False]


def test_reward_is_fixed_when_window_closes_not_when_emitted(gap):
    """An action inside the window that arrives while the window is held (after its close) does
    not change the reward: the result does not depend on the gap."""
    st = gap.new_state()
    gap.add_recommendation(st, rec("r1", "7", 100.0))
    gap.close_due(st, watermark=171.0, now=0.0)
    gap.add_action(st, "e1", "7", "purchase", 150.0, watermark=171.0)
    (t, _), = gap.close_due(st, watermark=300.0, now=0.0)
    assert (t.reward, t.done) == (0.0, True)


def test_held_window_is_idempotent(gap):
    st = gap.new_state()
    gap.add_recommendation(st, rec("r1", "7", 100.0))
    gap.close_due(st, watermark=180.0, now=0.0)
    assert gap.add_recommendation(st, rec("r1", "7", 100.0)) == "duplicate"
    assert len(gap.close_due(st, watermark=300.0, now=0.0)) == 1
    assert gap.add_recommendation(st, rec("r1", "7", 100.0)) == "duplicate"
    assert gap.close_due(st, watermark=900.0, now=0.0) == []


def test_same_result_whatever_the_arrival_order():
    """Events arriving out of order, each before the watermark (the largest event time seen)
    passes the close or hold time that it matters to, give the transitions of event-time order."""
    events = [("rec", "r1", "7", 100.0), ("act", "e1", "7", "click", 105.0), ("rec", "r2", "9", 150.0),
              ("act", "e2", "9", "purchase", 200.0), ("rec", "r3", "5", 325.0), ("act", "e3", "5", "click", 330.0)]

    def run(order):
        attr = RewardAttribution(StateEncoder(ItemEncoder(D)), RewardWeights(), window_s=60.0,
                                 allowed_lateness_s=10.0, session_gap_s=100.0)
        st, out, wm = attr.new_state(), [], float("-inf")
        for ev in order:
            if ev[0] == "rec":
                attr.add_recommendation(st, rec(ev[1], ev[2], ev[3]))
            else:
                assert attr.add_action(st, ev[1], ev[2], ev[3], ev[4], watermark=wm) == "new"
            wm = max(wm, ev[-1])
            out += attr.close_due(st, wm, now=0.0)
        out += attr.close_due(st, float("inf"), now=0.0)
        return sorted((t.transition_id, t.reward, t.done) for t, _ in out)

    # r1: click in its window, e2 (200) in its gap (160, 260]; r2: purchase, nothing in
    # (210, 310]; r3: click, nothing after
    expected = [("r1", 1.0, False), ("r2", 5.0, True), ("r3", 1.0, True)]
    assert run(events) == expected
    assert run([events[i] for i in (1, 0, 2, 3, 5, 4)]) == expected  # actions before their recommendations
    assert run([events[i] for i in (0, 1, 3, 2, 4, 5)]) == expected  # r2 after its answer, 50 s late


def test_gap_zero_disables_session_ends(attr):
    st = attr.new_state()
    attr.add_recommendation(st, rec("r1", "7", 100.0))
    (t, _), = attr.close_due(st, watermark=170.5, now=0.0)
    assert t.done is False and st["held"] == []


def test_state_without_held_list_still_works(gap):
    """States written before session ends existed have no ``held`` list."""
    st = {"history": [], "pending": [], "closed": [], "seen": []}
    gap.add_recommendation(st, rec("r1", "7", 100.0))
    assert gap.close_due(st, watermark=180.0, now=0.0) == [] and gap.next_close(st) == 270.0


def test_negative_settings_are_rejected():
    with pytest.raises(ValueError, match="session_gap_s"):
        RewardAttribution(StateEncoder(ItemEncoder(D)), RewardWeights(), session_gap_s=-1.0)


# -- the worker's watermark: idle inputs ------------------------------------------------------
class _Consumer:
    """What the worker asks Faust's consumer: high watermarks and committed offsets."""

    def __init__(self, highwater: dict, committed: dict | None = None):
        self.highwaters = highwater
        self._committed_offset = committed or {}

    def highwater(self, tp):
        if tp not in self.highwaters:
            raise AssertionError(f"{tp} is not assigned")
        return self.highwaters[tp]


def _worker(tmp_path, **kwargs):
    from memento.config import Settings
    from streams.app import TransitionWorker

    return TransitionWorker(Settings(data_dir=str(tmp_path)), store="memory://", **kwargs)


def test_a_silent_input_with_unread_messages_still_holds_the_watermark(tmp_path):
    """A backlog that Faust has not fetched for a while (one input starved by the other) is not
    idleness: closing windows on the other input's time alone decided session ends and rewards
    before their events were read (seen on Tansu in `memento bench stream`)."""
    worker = _worker(tmp_path, idle_timeout_s=0.0)  # every input counts as silent at once
    unread = {"action": 0, "recommendation": 5}
    worker._unread = lambda source, partition: unread[source]
    worker.watermarks.advance("action", 0, 100.0, time.monotonic())
    worker.watermarks.advance("recommendation", 0, 50.0, time.monotonic())
    assert worker.watermark(0) == 50.0  # the recommendations' backlog holds it back
    unread["recommendation"] = 1  # at most a commit marker left: caught up
    assert worker.watermark(0) == 100.0  # both idle: the largest time counts

    fresh = _worker(tmp_path / "fresh", idle_timeout_s=0.0)
    unread = {"action": 0, "recommendation": 3}
    fresh._unread = lambda source, partition: unread[source]
    fresh.watermarks.advance("action", 1, 10.0, time.monotonic())
    assert fresh.watermark(1) is None  # an input not heard from yet, with messages waiting
    unread["recommendation"] = 0
    assert fresh.watermark(1) == 10.0


def test_unread_counts_from_the_last_handled_offset_or_the_committed_one(tmp_path):
    from faust.types import TP

    worker = _worker(tmp_path)
    t = worker.settings.topics
    worker.app.consumer = _Consumer({TP(t.actions, 0): 10, TP(t.recommendations, 0): None,
                                     TP(t.actions, 1): 8}, committed={TP(t.actions, 1): 5})
    assert worker._unread("action", 0) is None  # nothing handled, nothing committed
    worker.handle(t.actions, 0, 7, b"u", b"{broken")  # a dead letter is handled too
    assert worker._unread("action", 0) == 2
    assert worker._unread("action", 1) == 3  # from the committed offset
    assert worker._unread("recommendation", 0) is None  # no fetch answered yet
    assert worker._unread("recommendation", 3) is None  # not assigned


def test_a_high_watermark_older_than_the_last_message_handled_says_nothing(tmp_path, monkeypatch):
    """Faust stops fetching a partition whose buffer is full: its last high watermark then
    predates messages handled since, and must not make the input look caught up."""
    from faust.types import TP

    worker = _worker(tmp_path)
    t = worker.settings.topics
    worker.app.consumer = _Consumer({TP(t.actions, 0): 8, TP(t.recommendations, 0): 0})
    answered = {"ms": None}
    monkeypatch.setattr("streams.compat.fetch_answered_ms", lambda consumer, tp: answered["ms"])
    assert worker._caught_up("recommendation", 0)  # nothing handled, nothing known: as before
    worker.handle(t.actions, 0, 7, b"u", b"{broken")
    assert worker._unread("action", 0) is None and not worker._caught_up("action", 0)
    answered["ms"] = (time.time() - 60) * 1000  # answered before the message was handled
    assert worker._unread("action", 0) is None and not worker._caught_up("action", 0)
    answered["ms"] = (time.time() + 1) * 1000  # answered since: 8 - (7 + 1) = 0 unread
    assert worker._unread("action", 0) == 0 and worker._caught_up("action", 0)


def test_a_refused_commit_does_not_count_as_committed(tmp_path):
    """Faust records a commit as done even when the broker refused it; the worker's view (and
    so its lag gauge) keeps the offset committed before until a commit succeeds, and counts
    the refusal."""
    import asyncio

    from faust.types import TP
    from streams.health import consumer_lags
    from streams.metrics import COMMIT_REFUSALS

    worker = _worker(tmp_path)
    tp = TP(worker.settings.topics.actions, 0)
    consumer = _Consumer({tp: 20}, committed={tp: 5})
    answers = [False, False, True]

    async def commit_offsets(offsets, start_new_transaction=True):
        consumer._committed_offset.update(offsets)  # what Faust does, whatever the broker said
        return answers.pop(0)

    consumer._commit_offsets = commit_offsets
    worker.app.consumer = consumer
    worker._watch_commits(consumer)
    refusals = COMMIT_REFUSALS._value.get()
    assert not asyncio.run(consumer._commit_offsets({tp: 12}))
    assert not asyncio.run(consumer._commit_offsets({tp: 14}))
    assert consumer._committed_offset[tp] == 14 and worker.committed_offset(tp) == 5
    assert COMMIT_REFUSALS._value.get() == refusals + 2
    assert consumer_lags([tp], consumer.highwater, worker.committed_offset, lambda tp: 19)[tuple(tp)] == (15, 0)
    assert asyncio.run(consumer._commit_offsets({tp: 20}))
    assert worker.committed_offset(tp) == 20


@pytest.mark.parametrize("decay,max_len", [(0.85, 30), (0.5, 7), (1.0, 100)])
def test_row_state_encoder_matches_state_encoder_bit_for_bit(decay, max_len):
    """The worker's encoder (:class:`memento.encoder.RowStateEncoder`) gives StateEncoder's
    states exactly, ties in event time (and their order) included."""
    from memento.encoder import ItemMeta
    from memento.encoder import RowStateEncoder

    actions = ["click", "collect", "cart", "purchase", "alipay-like"]
    catalogue = {str(i): ItemMeta(str(i), category=f"{i % 5}-{i % 3}", brand=f"b{i % 7}", title=f"t{i % 11} x")
                 for i in range(40)}
    items = ItemEncoder(16, catalogue)  # items 40-199: from their id alone; 200 items outgrow the first 64 rows
    reference = StateEncoder(items, decay=decay, max_len=max_len)
    rows_encoder = RowStateEncoder(items, decay=decay, max_len=max_len)
    rng = np.random.default_rng(7)
    for _ in range(300):
        length = int(rng.integers(0, 60))
        ts = np.sort(rng.integers(0, max(1, length // 2 + 1), length)).astype(float)  # few times: ties
        rows = [[str(int(rng.integers(0, 200))), actions[int(rng.integers(0, len(actions)))], float(t), f"e{k}"]
                for k, t in enumerate(ts)]
        history = [HistoryEntry(*row) for row in rows]
        until, before = float(rng.integers(0, 40)), float(rng.integers(0, 40))
        for got, want in ((rows_encoder.encode_rows(rows), reference.encode(history)),
                          (rows_encoder.encode_rows(rows, until=until), reference.encode(history, until=until)),
                          (rows_encoder.encode_rows(rows, before=before),
                           reference.encode([h for h in history if h.ts < before]))):
            assert got.dtype == want.dtype and np.array_equal(got, want)


def test_row_state_encoder_in_the_attribution_gives_the_same_cases_and_transitions():
    from memento.schemas import encode
    from memento.encoder import RowStateEncoder

    items = ItemEncoder(8)
    out = []
    for encoder in (StateEncoder(items), RowStateEncoder(items)):
        attr = RewardAttribution(encoder, RewardWeights(), window_s=60, allowed_lateness_s=0)
        st = attr.new_state()
        rng = np.random.default_rng(3)
        cases = []
        for i in range(40):
            attr.add_action(st, f"e{i}", str(int(rng.integers(0, 9))), "click", float(i))
            cases.append(encode(attr.organic_case(st, f"e{i}", "3", "click", float(i))))
        rec = {"request_id": "r1", "user_id": "u", "item_id": "3", "case_id": "c", "propensity": 0.5,
               "policy_version": 1, "ts": 20.0, "state": [0.0] * 8, "case_features": [0.0] * 17}
        attr.add_recommendation(st, rec)
        out.append((cases, [(encode(t), encode(c)) for t, c in attr.close_due(st, watermark=100.0, now=0.0)]))
    assert out[0] == out[1] and out[0][1]
