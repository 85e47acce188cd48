"""The user's own memory: their recent cases as candidates, and their recent items for the prior.

Every action a user takes on their own becomes a case of the bank, (state before it, item, its
weight), named by :func:`memento.schemas.organic_case_id` of the action's event id
(:meth:`streams.attribution.RewardAttribution.organic_case`). The ``top_k`` nearest cases of a
state are mostly other users' (states like s), so the cases that say what this user did
recently may not be among them. Users come back to what they just had (on the Tmall sample,
a fifth of the actions are on an item among the user's ten most recent), so the policy's
candidates are the nearest cases *and* the user's own newest cases, one per distinct item, and
the retrieval prior may rank the user's own recent items first (:func:`memento.softq.own_recency`).

A user with little or no history backs off to the population's memory: after their own items,
the items users acted on most often (:meth:`memory_store.CaseBank.popular`) complete their
memory, with those items' cases as candidates (:func:`with_population`), so the prior ranks
them after the user's own items, most often first. (A user with no history has a blank state,
which the bank also answers with those cases.)

Serving and ``memento eval`` both build a user's memory from the history with
:func:`user_memory`, complete it with the population's (:func:`with_population`), and encode
its items with :func:`recent_vectors`.

>>> from memento.encoder import HistoryEntry
>>> h = [HistoryEntry("7", "click", 1.0, "e1"), HistoryEntry("8", "click", 2.0, "e2"),
...      HistoryEntry("7", "cart", 3.0, "e3"), HistoryEntry("9", "click", 4.0)]
>>> m = user_memory(h, limit=2)
>>> m.recent_items, m.case_ids
(('9', '7'), ('act:e3',))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from memento.encoder import HistoryEntry, ItemEncoder
from memento.schemas import organic_case_id

__all__ = ["UserMemory", "user_memory", "with_population", "recent_vectors"]


@dataclass(frozen=True)
class UserMemory:
    """What a request knows of its user's own past.

    Parameters
    ----------
    recent_items
        The user's most recent distinct items, newest first.
    case_ids
        The organic case of each of those items' newest action, where the action has an event
        id (the bank may not hold it yet: the stream worker writes it).
    """

    recent_items: tuple[str, ...] = ()
    case_ids: tuple[str, ...] = ()


def user_memory(history: Sequence[HistoryEntry], limit: int) -> UserMemory:
    """The user's ``limit`` most recent distinct items and their newest organic cases, from
    ``history`` (any order; ties in time keep the later entry as the newer)."""
    if limit <= 0:
        return UserMemory()
    order = sorted(range(len(history)), key=lambda i: (history[i].ts, i), reverse=True)
    items: list[str] = []
    case_ids: list[str] = []
    for i in order:
        entry = history[i]
        if entry.item_id in items:
            continue
        items.append(entry.item_id)
        if entry.event_id:
            case_ids.append(organic_case_id(entry.event_id))
        if len(items) >= limit:
            break
    return UserMemory(tuple(items), tuple(case_ids))


def with_population(memories: Sequence[UserMemory | None],
                    popular: Callable[[int], Sequence[tuple[str, str]]], limit: int) -> list[UserMemory]:
    """Each memory completed to ``limit`` items by the population's: after the user's own items
    (newest first), the items users acted on most often that the user has not had (most often
    first), with their cases (``popular(n)``: (item, case id) pairs, most often first; called only
    when a memory is short). A user with little history backs off to what users do most.

    >>> mine = UserMemory(("7",), ("act:e1",))
    >>> out = with_population([None, mine], lambda n: [("3", "act:p3"), ("7", "act:p7"), ("9", "act:p9")][:n], 3)
    >>> [(m.recent_items, m.case_ids) for m in out]
    [(('3', '7', '9'), ('act:p3', 'act:p7', 'act:p9')), (('7', '3', '9'), ('act:e1', 'act:p3', 'act:p9'))]
    """
    memories = [m if m is not None else UserMemory() for m in memories]
    if limit <= 0 or all(len(m.recent_items) >= limit for m in memories):
        return memories
    pairs = list(popular(2 * limit))
    out = []
    for m in memories:
        own = set(m.recent_items)
        extra = [(item, case_id) for item, case_id in pairs if item not in own][:max(0, limit - len(own))]
        out.append(UserMemory(m.recent_items + tuple(i for i, _ in extra),
                              m.case_ids + tuple(c for _, c in extra)) if extra else m)
    return out


def recent_vectors(memories: Sequence[UserMemory | None], items: ItemEncoder) -> tuple[np.ndarray, np.ndarray]:
    """The item vectors of each memory's recent items [B, R, D], zero-padded, and the mask of the
    real ones [B, R] (R the longest list, at least 1).

    >>> from memento.encoder import ItemEncoder
    >>> vecs, mask = recent_vectors([UserMemory(("1", "2")), None], ItemEncoder(4, {}))
    >>> vecs.shape, mask.tolist()
    ((2, 2, 4), [[True, True], [False, False]])
    """
    width = max([len(m.recent_items) for m in memories if m is not None] + [1])
    vecs = np.zeros((len(memories), width, items.dim), np.float32)
    mask = np.zeros((len(memories), width), bool)
    for b, memory in enumerate(memories):
        if memory is None:
            continue
        for r, item in enumerate(memory.recent_items):
            vecs[b, r] = items.encode(item)
            mask[b, r] = True
    return vecs, mask
