"""The bench's synthetic events (:class:`BenchEvents`), what it remembers of each
(:class:`Produced`), and when the attribution rules make each recommendation's transition
emittable (:func:`emission_times`)."""

from __future__ import annotations

import bisect
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from memento.kafka_io import partition_of

__all__ = ["PARTITIONS", "Produced", "BenchEvents", "emission_times"]

PARTITIONS = 4  # of every input topic of the bench


@dataclass
class Produced:
    """What the bench knows of one produced event (``ts`` is its event time)."""

    role: str  # "action" or "recommendation"
    partition: int
    user: str
    ts: float
    request_id: str | None


@dataclass
class BenchEvents:
    """Synthetic user moments: a recommendation, then (sometimes) the user's click or cart on it
    and (sometimes) an organic click elsewhere; about 2.15 events per moment.

    Parameters
    ----------
    users
        Number of distinct users, drawn uniformly.
    item_dim
        Size of the state vector carried by recommendations.
    prefix
        Prefix of request and event ids (unique per stream).
    seed
        Seeds the draws.

    >>> ev = BenchEvents(users=3, item_dim=4, prefix="x", seed=1)
    >>> batch = ev.moment(100.0)
    >>> [(role, p.user, p.ts) for role, _, _, p in batch][:1]
    [('recommendation', 'u0', 100.0)]
    >>> ev.produced[0].request_id
    'x-r0'
    """

    users: int
    item_dim: int
    prefix: str
    seed: int = 0
    produced: list[Produced] = field(default_factory=list)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._moment = 0
        self._event = 0

    def moment(self, ts: float) -> list[tuple[str, bytes, bytes, Produced]]:
        """One user moment at event time ``ts``: ``[(role, key, value, Produced)]``."""
        from memento.encoder import case_feature_dim
        from memento.schemas import Action, Recommendation, encode

        rng, d = self._rng, self.item_dim
        user = f"u{rng.randrange(self.users)}"
        key = user.encode()
        partition = partition_of(key, PARTITIONS)
        rid = f"{self.prefix}-r{self._moment}"
        self._moment += 1
        item = str(rng.randrange(200))
        rec = Recommendation(request_id=rid, user_id=user, item_id=item, case_id=f"c{item}",
                             propensity=0.1, policy_version=1, ts=ts,
                             state=[round(rng.random(), 4) for _ in range(d)],
                             case_features=[round(rng.random(), 4) for _ in range(case_feature_dim(d))])
        out = [("recommendation", encode(rec), None)]
        if rng.random() < 0.5:
            out.append(("action", encode(Action(self._next_event(), user, item, "click", ts, rid)), rid))
        if rng.random() < 0.15:
            out.append(("action", encode(Action(self._next_event(), user, item, "cart", ts, rid)), rid))
        if rng.random() < 0.5:
            other = str(rng.randrange(200))
            out.append(("action", encode(Action(self._next_event(), user, other, "click", ts)), None))
        batch = []
        for role, value, _ in out:
            produced = Produced(role, partition, user, ts, rid if role == "recommendation" else None)
            self.produced.append(produced)
            batch.append((role, key, value, produced))
        return batch

    def _next_event(self) -> str:
        self._event += 1
        return f"{self.prefix}-e{self._event}"


def emission_times(produced: Iterable[Produced], *, window_s: float, lateness_s: float,
                   session_gap_s: float) -> dict[str, float]:
    """For each recommendation, the event time of the first event that made its transition
    emittable under :mod:`streams.attribution`'s rules (recommendations never emittable within
    ``produced`` are left out). The watermark of a partition is the smallest over the two inputs
    of the largest event time produced there; event times must not decrease per input and
    partition.

    >>> P = Produced
    >>> evs = [P("recommendation", 0, "u", 0.0, "r"), P("action", 0, "x", 1.8, None),
    ...        P("recommendation", 0, "v", 2.5, "s"), P("action", 0, "v", 3.5, None),
    ...        P("recommendation", 0, "w", 4.0, "t")]
    >>> emission_times(evs, window_s=1.0, lateness_s=0.5, session_gap_s=0.0)  # watermark > 1.5
    {'r': 2.5}
    >>> emission_times(evs, window_s=1.0, lateness_s=0.5, session_gap_s=1.0)  # u idle: > 2.5
    {'r': 4.0}
    """
    inputs: dict[tuple[int, str], list[float]] = defaultdict(list)
    activity: dict[str, list[float]] = defaultdict(list)
    recs = []
    for ev in produced:
        inputs[(ev.partition, ev.role)].append(ev.ts)
        activity[ev.user].append(ev.ts)
        if ev.role == "recommendation":
            recs.append(ev)

    def crossing(partition: int, t: float) -> float:
        when = -math.inf
        for role in ("action", "recommendation"):
            times = inputs.get((partition, role), [])
            i = bisect.bisect_right(times, t)
            if i == len(times):
                return math.inf
            when = max(when, times[i])
        return when

    from streams.attribution import RewardWindow

    window = RewardWindow(window_s, lateness_s, session_gap_s)
    out = {}
    for rec in recs:
        when = crossing(rec.partition, window.close_time(rec.ts))
        if session_gap_s > 0:
            times = activity[rec.user]
            i = bisect.bisect_right(times, window.end(rec.ts))
            active = times[i] if i < len(times) and window.in_gap(rec.ts, times[i]) else math.inf
            when = max(when, min(active, crossing(rec.partition, window.hold_time(rec.ts))))
        if when < math.inf:
            out[rec.request_id] = when
    return out
