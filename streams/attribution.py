"""Reward attribution: joins a user's served recommendations with their later actions.

This module is the stream worker's logic without Faust, so that it can be tested directly and
reused by the in-process evaluation. A user's stream state is a JSON-able dict (it lives in a
changelog-backed Faust table)::

    {"history": [[item_id, action, ts, event_id], ...],   # event-time ordered
     "pending": [recommendation dicts],                    # windows still open
     "held": [recommendation dicts + reward, next_state,  # reward fixed, waiting for the
              active],                                     #   session-gap decision (done)
     "closed": [request ids recently closed],              # for idempotence
     "seen": [event ids recently seen]}

Rules, all in event time:

* A recommendation at time t opens a window [t, t + window]. Its reward is the largest
  :class:`~memento.config.RewardWeights` weight among the user's actions on the recommended
  item inside the window, 0 if none.
* Actions and recommendations may arrive in any order; the reward is computed from the
  history when the window closes, so an action that arrived before its recommendation counts.
* A window closes once the partition's watermark (largest event time seen) passes
  ``t + window + allowed_lateness``. Actions older than ``watermark - window - lateness``
  arrive too late to change any closed window: they are counted as late (and still update
  the user's history).
* Duplicate actions (same event id) and duplicate recommendations (same request id) are
  ignored, so replaying a partition changes nothing.
* Session end (``session_gap_s`` = g > 0): with the window end e = t + window, the transition
  has ``done=True`` when the user has **no event** (action or recommendation) with event time in
  (e, e + g], and ``done=False`` when they have one. The reward and s′ are fixed when the window
  closes (watermark > e + lateness, as above); the transition is then emitted at once if such an
  event is already known, and otherwise held until one arrives (→ ``done=False``) or the
  watermark passes e + g + lateness (→ ``done=True``), whichever comes first. g = 0 disables
  session ends: every transition has ``done=False`` and is emitted when its window closes.

>>> from memento.config import RewardWeights
>>> from memento.encoder import ItemEncoder, StateEncoder
>>> attr = RewardAttribution(StateEncoder(ItemEncoder(8)), RewardWeights(), window_s=60, allowed_lateness_s=0)
>>> st = attr.new_state()
>>> rec = {"request_id": "r1", "user_id": "u", "item_id": "7", "case_id": "c", "propensity": 0.5,
...        "policy_version": 1, "ts": 100.0, "state": [0.0] * 8, "case_features": [0.0] * 17}
>>> attr.add_recommendation(st, rec)
'pending'
>>> attr.add_action(st, "e1", "7", "cart", 130.0)
'new'
>>> [(t.reward, t.done) for t, _ in attr.close_due(st, watermark=200.0, now=0.0)]
[(3.0, False)]

With a session gap of 100 s, the same window (end 160) waits for the gap (160, 260]:

>>> attr = RewardAttribution(StateEncoder(ItemEncoder(8)), RewardWeights(), window_s=60, allowed_lateness_s=0,
...                          session_gap_s=100)
>>> st = attr.new_state(); _ = attr.add_recommendation(st, rec); _ = attr.add_action(st, "e1", "7", "cart", 130.0)
>>> attr.close_due(st, watermark=200.0, now=0.0), attr.next_close(st)
([], 260.0)
>>> [(t.reward, t.done) for t, _ in attr.close_due(st, watermark=260.5, now=0.0)]
[(3.0, True)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from memento.config import RewardWeights
from memento.encoder import HistoryEntry, StateEncoder
from memento.schemas import ORGANIC_CASE_SOURCE, Case, Recommendation, Transition, as_packed, organic_case_id, pack_vector, unpack_vector

__all__ = ["RewardAttribution", "RewardWindow", "AttributionStats"]

_MAX_HISTORY = 1000
_MAX_REMEMBERED_IDS = 200


@dataclass
class AttributionStats:
    """Outcome counts since the :class:`RewardAttribution` was made (``session_end``: transitions
    emitted with ``done=True``)."""

    hit: int = 0
    miss: int = 0
    late: int = 0
    duplicate: int = 0
    session_end: int = 0


@dataclass(frozen=True)
class RewardWindow:
    """The reward window rule, in event time: a recommendation at ``t`` is credited with the
    actions on its item at times in ``[t, t + window_s]``; its window closes when the watermark
    passes ``t + window_s + allowed_lateness_s``; with a session gap g, the user's session goes on
    when they have an event in ``(t + window_s, t + window_s + g]``. The one statement of the rule
    (the stream worker, the replay's reward tracker and the stream bench's oracle all use it).

    >>> w = RewardWindow(60.0, allowed_lateness_s=5.0, session_gap_s=100.0)
    >>> w.covers(10.0, 70.0), w.covers(10.0, 70.5), w.close_time(10.0), w.hold_time(10.0), w.in_gap(10.0, 170.0)
    (True, False, 75.0, 175.0, True)
    """

    window_s: float
    allowed_lateness_s: float = 0.0
    session_gap_s: float = 0.0

    def end(self, rec_ts: float) -> float:
        """The last event time whose actions count for a recommendation made at ``rec_ts``."""
        return rec_ts + self.window_s

    def covers(self, rec_ts: float, ts: float) -> bool:
        """Whether an action at ``ts`` falls in the window of a recommendation made at ``rec_ts``."""
        return rec_ts <= ts <= rec_ts + self.window_s

    def close_time(self, rec_ts: float) -> float:
        """Watermark at which the window closes: its reward and s′ are fixed then."""
        return rec_ts + self.window_s + self.allowed_lateness_s

    def hold_time(self, rec_ts: float) -> float:
        """Watermark after which a closed window with no user event in its session gap is done."""
        return rec_ts + self.window_s + self.session_gap_s + self.allowed_lateness_s

    def in_gap(self, rec_ts: float, ts: float) -> bool:
        """Whether an event at ``ts`` continues the session after the window (``done=False``)."""
        end = rec_ts + self.window_s
        return end < ts <= end + self.session_gap_s


class RewardAttribution:
    """Attribution rules over one user's stream state.

    Parameters
    ----------
    encoder
        The shared state encoder (computes s′ at the end of the window).
    rewards
        Reward weight per action.
    window_s
        Attribution window after a recommendation, event-time seconds.
    allowed_lateness_s
        Extra event time a window stays open for late events.
    history_len
        Number of recent actions kept for the state, beyond those a pending window needs.
    session_gap_s
        Event-time inactivity after a window's end that ends the user's session (``done``);
        0 (the default here) disables session ends.
    max_windows
        Most windows (pending and held) one user may have: a recommendation beyond them is
        refused (``over_cap``), so that no user's state grows without bound (the stream worker
        passes ``Settings.max_windows_per_user``); None: no cap (the in-process evaluation,
        which has no table value to bound).
    """

    def __init__(self, encoder: StateEncoder, rewards: RewardWeights, *, window_s: float = 600.0,
                 allowed_lateness_s: float = 60.0, history_len: int = 30, session_gap_s: float = 0.0,
                 max_windows: int | None = None):
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"RewardAttribution: max_windows must be >= 1, got {max_windows}")
        self.max_windows = max_windows
        for name, value in (("window_s", window_s), ("allowed_lateness_s", allowed_lateness_s),
                            ("session_gap_s", session_gap_s)):
            if not value >= 0:
                raise ValueError(f"RewardAttribution: {name} must be >= 0, got {value}")
        self.encoder = encoder
        self.rewards = rewards
        self.window_s = window_s
        self.allowed_lateness_s = allowed_lateness_s
        self.history_len = history_len
        self.session_gap_s = session_gap_s
        self.window = RewardWindow(window_s, allowed_lateness_s, session_gap_s)
        self.stats = AttributionStats()

    @staticmethod
    def new_state() -> dict[str, Any]:
        return {"history": [], "pending": [], "held": [], "closed": [], "seen": []}

    def close_time(self, rec_ts: float) -> float:
        """Watermark at which the window of a recommendation made at ``rec_ts`` closes: its reward
        and s′ are fixed then. Without a session gap the transition is emitted then too; with
        one it may be held longer (:meth:`hold_time`, :meth:`next_close`)."""
        return self.window.close_time(rec_ts)

    def hold_time(self, rec_ts: float) -> float:
        """Watermark after which a held window is emitted with ``done=True`` (no user event in
        its session gap)."""
        return self.window.hold_time(rec_ts)

    def history(self, state: dict[str, Any]) -> list[HistoryEntry]:
        return [HistoryEntry(h[0], h[1], h[2], h[3] if len(h) > 3 else "") for h in state["history"]]

    def add_action(self, state: dict[str, Any], event_id: str, item_id: str, action: str, ts: float,
                   watermark: float | None = None) -> str:
        """Record an action; returns ``new``, ``duplicate`` or ``late``."""
        if event_id in state["seen"]:
            self.stats.duplicate += 1
            return "duplicate"
        state["seen"].append(event_id)
        del state["seen"][:-_MAX_REMEMBERED_IDS]
        history = state["history"]
        history.append([item_id, action, ts, event_id])
        if len(history) > 1 and history[-2][2] > ts:
            history.sort(key=lambda h: h[2])
        self._mark_active(state, ts)
        self._prune(state)
        if watermark is not None and self.window.close_time(ts) < watermark:
            self.stats.late += 1
            return "late"
        return "new"

    def add_recommendation(self, state: dict[str, Any], rec: dict[str, Any]) -> str:
        """Open a window for a served recommendation; returns ``pending``, ``duplicate`` or
        ``over_cap`` (the user already has ``max_windows`` windows; nothing changes)."""
        rid = rec["request_id"]
        held = state.setdefault("held", [])
        if rid in state["closed"] or any(p["request_id"] == rid for p in state["pending"]) \
                or any(h["request_id"] == rid for h in held):
            self.stats.duplicate += 1
            return "duplicate"
        if self.max_windows is not None and len(state["pending"]) + len(held) >= self.max_windows:
            return "over_cap"
        state["pending"].append(rec)
        self._mark_active(state, rec["ts"])
        return "pending"

    def _mark_active(self, state: dict[str, Any], ts: float) -> None:
        for h in state.get("held", ()):
            if not h["active"] and self.window.in_gap(h["ts"], ts):
                h["active"] = True

    def next_close(self, state: dict[str, Any]) -> float | None:
        """Watermark after which :meth:`close_due` has something to emit for this user (None when
        nothing is open). A held window whose session is known to go on reports its (passed)
        close time, so that it is emitted at the next call."""
        times = [self.close_time(p["ts"]) for p in state["pending"]]
        times += [self.close_time(h["ts"]) if h["active"] else self.hold_time(h["ts"])
                  for h in state.get("held", ())]
        return min(times, default=None)

    def state_before(self, state: dict[str, Any], ts: float) -> np.ndarray:
        """The user's state from actions strictly before ``ts``."""
        return self.encoder.encode_rows(state["history"], before=ts)

    def close_due(self, state: dict[str, Any], watermark: float, now: float,
                  packed: bool = False) -> list[tuple[Transition, Case]]:
        """Close every window whose close time the watermark has passed and emit every transition
        that is due (all of them without a session gap; with one, those whose ``done`` is
        decided), oldest recommendation first. With ``packed``, the vectors of the transitions
        and cases are :func:`~memento.schemas.pack_vector` text, as the stream worker sends them
        (:func:`~memento.schemas.encode` writes them as they are)."""
        held = state.setdefault("held", [])
        due = [p for p in state["pending"] if self.close_time(p["ts"]) < watermark]
        if not due and not held:
            return []
        if due:
            held.extend([self._fix(state, rec) for rec in due])
            state["pending"] = [p for p in state["pending"] if self.close_time(p["ts"]) >= watermark]
        ready = [h for h in held if self.session_gap_s == 0 or h["active"] or self.hold_time(h["ts"]) < watermark]
        if not ready:
            return []
        emitted = {h["request_id"] for h in ready}
        state["held"] = [h for h in held if h["request_id"] not in emitted]
        out = [self._emit(state, h, now, packed) for h in sorted(ready, key=lambda h: h["ts"])]
        self._prune(state)
        return out

    def _fix(self, state: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
        """The window's reward and s′, from the history as it is when the window closes, and
        whether a user event is already known in its session gap."""
        start, end = rec["ts"], self.window.end(rec["ts"])
        weights = [self.rewards.weight(h[1]) for h in state["history"]
                   if h[0] == rec["item_id"] and self.window.covers(start, h[2])]
        next_state = self.encoder.encode_rows(state["history"], until=end)
        active = self.session_gap_s > 0 and (
            any(self.window.in_gap(start, h[2]) for h in state["history"])
            or any(self.window.in_gap(start, p["ts"]) for p in state["pending"])
            or any(self.window.in_gap(start, h["ts"]) for h in state["held"]))
        return {**rec, "reward": max(weights, default=0.0), "next_state": pack_vector(next_state), "active": active}

    def _emit(self, state: dict[str, Any], held: dict[str, Any], now: float,
              packed: bool = False) -> tuple[Transition, Case]:
        rec, reward = held, held["reward"]  # a held window is its recommendation dict + results
        done = self.session_gap_s > 0 and not held["active"]
        if reward > 0:
            self.stats.hit += 1
        else:
            self.stats.miss += 1
        self.stats.session_end += done
        state["closed"].append(rec["request_id"])
        del state["closed"][:-_MAX_REMEMBERED_IDS]
        vector = as_packed if packed else _unpack
        state_vec = vector(rec["state"])
        transition = Transition(
            transition_id=rec["request_id"], user_id=rec["user_id"], state=state_vec,
            case_id=rec["case_id"], case_features=vector(rec["case_features"]), item_id=rec["item_id"],
            propensity=rec["propensity"], reward=reward, next_state=vector(held["next_state"]),
            done=done, policy_version=rec["policy_version"], ts=rec["ts"], closed_at=now,
            prior=rec.get("prior"))  # windows kept before priors were recorded have none
        case = Case(case_id=f"rec:{rec['request_id']}", state=state_vec, item_id=rec["item_id"],
                    item_vec=vector(self.encoder.items.encode(rec["item_id"])),
                    outcome=reward, ts=rec["ts"], source="recommendation")
        return transition, case

    def organic_case(self, state: dict[str, Any], event_id: str, item_id: str, action: str, ts: float,
                     packed: bool = False) -> Case:
        """A case from an action the user took on their own: (state before it, item, its weight);
        with ``packed``, its vectors as :func:`~memento.schemas.pack_vector` text."""
        vector = as_packed if packed else _unpack
        return Case(case_id=organic_case_id(event_id), state=vector(self.state_before(state, ts)),
                    item_id=item_id, item_vec=vector(self.encoder.items.encode(item_id)),
                    outcome=self.rewards.weight(action), ts=ts, source=ORGANIC_CASE_SOURCE)

    def _prune(self, state: dict[str, Any]) -> None:
        history = state["history"]
        oldest_needed = min((p["ts"] for p in state["pending"]), default=None)
        keep_from = max(0, len(history) - self.history_len)
        if oldest_needed is not None:
            while keep_from > 0 and history[keep_from - 1][2] >= oldest_needed:
                keep_from -= 1
        keep_from = max(keep_from, len(history) - _MAX_HISTORY)
        if keep_from:
            del history[:keep_from]

    @staticmethod
    def recommendation_dict(rec: Recommendation) -> dict[str, Any]:
        """The compact form kept in the user's open windows (vectors as base64 float32; a
        recommendation decoded with ``packed=True`` has them so already)."""
        return {"request_id": rec.request_id, "user_id": rec.user_id, "item_id": rec.item_id,
                "case_id": rec.case_id, "propensity": rec.propensity,
                "policy_version": rec.policy_version, "ts": rec.ts, "state": as_packed(rec.state),
                "case_features": as_packed(rec.case_features), "prior": rec.prior}


def _unpack(packed) -> list[float]:
    """A vector kept in a user's state: packed (:func:`memento.schemas.pack_vector`), or a list
    in states written by an older worker (or an array)."""
    if isinstance(packed, str):
        return unpack_vector(packed)
    return [float(x) for x in packed]
