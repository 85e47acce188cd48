"""What the attribution rules give, computed directly from all the events: the diagnostic of
two runs whose transitions differ."""

from __future__ import annotations

from collections import defaultdict


def _truth(batches, args, ids: set[str]) -> dict[str, list]:
    """(reward, done) of the recommendations ``ids`` from the rules applied to all the events
    (diagnostic: which of two differing runs is right)."""
    from memento.config import RewardWeights
    from memento.schemas import Action, Recommendation, decode

    weights, acts, times, recs = RewardWeights(), defaultdict(list), defaultdict(list), []
    for batch in batches:
        for role, _, value, p in batch:
            times[p.user].append(p.ts)
            if role == "action":
                a = decode(Action, value)
                acts[a.user_id].append((a.item_id, a.action, a.ts))
            elif p.request_id in ids:
                recs.append(decode(Recommendation, value))
    out = {}
    for r in recs:
        end = r.ts + args.window
        reward = max((weights.weight(k) for i, k, ts in acts[r.user_id] if i == r.item_id and r.ts <= ts <= end),
                     default=0.0)
        done = args.session_gap > 0 and not any(end < ts <= end + args.session_gap for ts in times[r.user_id])
        out[r.request_id] = [reward, done]
    return out
