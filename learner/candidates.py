"""Turns stream transitions into replay rows by retrieving the candidate cases of s and s′.

The soft value of the TD target ranges over the top-K cases of s′ and the current policy's μ over
those of s, so each transition is stored with both candidate sets, retrieved from the case bank
(one batched search) when it arrives. The learner process and ``memento eval`` both call this.

>>> import numpy as np
>>> from memento.schemas import Case, Transition
>>> from memory_store import CaseBank
>>> bank = CaseBank(None, dim=2)
>>> _ = bank.add([Case("c1", [1.0, 0.0], "7", [1.0, 0.0], 1.0, 0.0)])
>>> t = Transition(transition_id="r1", user_id="u", state=[1.0, 0.0], case_id="c1",
...                case_features=[1.0, 0.0, 1.0, 0.0, 1.0], item_id="7", propensity=1.0,
...                reward=1.0, next_state=[0.0, 1.0], done=False, policy_version=0, ts=0.0)
>>> row = with_candidates([t], bank, top_k=2)[0]
>>> row.candidate_mask.tolist(), row.next_candidate_mask.tolist()
([True, False], [True, False])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from learner.storage import ReplayTransition
from memento.schemas import Transition

__all__ = ["with_candidates"]


def with_candidates(transitions: Sequence[Transition], bank, top_k: int) -> list[ReplayTransition]:
    """Replay rows for ``transitions``, with the ``top_k`` cases of ``bank`` nearest to each
    s and s′ (``bank`` is a ``memory_store.CaseBank``; only ``search_with_features`` is used)."""
    n = len(transitions)
    if n == 0:
        return []
    queries = np.asarray([t.state for t in transitions] + [t.next_state for t in transitions], np.float32)
    _, _, features, mask = bank.search_with_features(queries, top_k)
    return [ReplayTransition(
        t.transition_id, np.asarray(t.state, np.float32), np.asarray(t.case_features, np.float32),
        t.reward, t.done, t.propensity, np.asarray(t.next_state, np.float32),
        features[i], mask[i], features[n + i], mask[n + i]) for i, t in enumerate(transitions)]
