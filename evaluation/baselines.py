"""Industry baselines for ``memento eval``, each a small class behind :class:`EvalPolicy`.

* ``recent`` — the user's own most recent items (newest first, distinct), then the most popular
  items, then random catalogue items. An item policy: it never looks at the retrieved cases.
* ``itemknn`` — item-to-item collaborative filtering: items that co-occur in users' recent
  histories, cosine-normalised, scored against the user's own recent items; then popularity.
  An item policy.
* ``vw`` — Vowpal Wabbit's contextual bandit with action-dependent features
  (``--cb_explore_adf``), choosing among the same retrieved cases, with the same features, as
  the other case policies; it learns from each closed reward window with the logged propensity.

``recent`` and ``itemknn`` see every action of the stream through :meth:`EvalPolicy.observe`
(organic actions and responses to recommendations, with their reward weight); ``vw`` sees only
the requests and the transitions of its own decisions, like ``linucb`` and ``softq``.

>>> import numpy as np
>>> req = Request("u", 0.0, np.ones(2, np.float32), ["c1"], np.array([0.9]),
...               np.zeros((1, 5), np.float32), ["7"], [])
>>> policy = RecentPolicy(["1", "2", "3"])
>>> for user, item in [("u", "1"), ("v", "3"), ("v", "3"), ("u", "2")]:
...     policy.observe(user, item, 1.0)
>>> policy.choose(req, np.random.default_rng(0), list_size=3).items
['2', '1', '3']
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter, OrderedDict, defaultdict, deque
from typing import Sequence

import numpy as np

from evaluation.policies import (Choice, EvalPolicy, PopularityPolicy, Request, _deterministic,
                                         items_in_order)
from memento.encoder import case_item, case_outcome, case_state
from memento.schemas import Transition

__all__ = ["RecentHistory", "RecentPolicy", "ItemKNNPolicy", "VWPolicy", "DEFAULT_VW_ARGS"]

# VW's documented defaults for --cb_explore_adf (epsilon-greedy, epsilon = 0.05; cb_type mtr),
# with every shared namespace (s) crossed with every action namespace (c, v, o, i).
DEFAULT_VW_ARGS = "--cb_explore_adf --epsilon 0.05 --interactions sc sv so si"


class RecentHistory:
    """Each user's most recent distinct items, oldest first, at most ``size`` per user.

    Parameters
    ----------
    size
        Items kept per user; the oldest is forgotten first.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"history size must be >= 1, got {size}")
        self.size = size
        self._users: dict[str, OrderedDict[str, None]] = {}

    def add(self, user_id: str, item_id: str) -> bool:
        """Record that ``user_id`` acted on ``item_id`` now; True when the item was not in the
        user's history (it entered), False when it only moved to the front."""
        items = self._users.setdefault(user_id, OrderedDict())
        if item_id in items:
            items.move_to_end(item_id)
            return False
        items[item_id] = None
        if len(items) > self.size:
            items.popitem(last=False)
        return True

    def items(self, user_id: str) -> list[str]:
        """The user's items, oldest first."""
        items = self._users.get(user_id)
        return list(items) if items else []

    def newest_first(self, user_id: str) -> list[str]:
        return self.items(user_id)[::-1]


def _fill_with_popular(head: list[str], popularity: PopularityPolicy, request: Request,
                       rng: np.random.Generator, list_size: int) -> list[str]:
    """``head`` (distinct), then the most popular items not in it (then random catalogue items,
    as :class:`PopularityPolicy` does), up to ``list_size``."""
    head = head[:list_size]
    if len(head) < list_size:
        taken = set(head)
        popular = popularity.choose(request, rng, list_size + len(head)).items
        head += [i for i in popular if i not in taken][:list_size - len(head)]
    return head


class RecentPolicy(EvalPolicy):
    """The user's own most recent items (newest first, distinct), then the most popular items
    over all users (:class:`PopularityPolicy`), then random catalogue items. Every observed
    action counts as an interaction, whatever its reward weight.

    Parameters
    ----------
    catalogue
        Fallback items (as for ``popularity``).
    history
        Recent items kept per user.
    """

    name = "recent"

    def __init__(self, catalogue: Sequence[str], history: int = 50):
        self.history = RecentHistory(history)
        self.popularity = PopularityPolicy(catalogue)

    def observe(self, user_id: str, item_id: str, reward: float) -> None:
        self.history.add(user_id, item_id)
        self.popularity.observe(user_id, item_id, reward)

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        items = _fill_with_popular(self.history.newest_first(request.user_id), self.popularity,
                                   request, rng, list_size)
        return Choice(items, None, 1.0, _deterministic(items))


class ItemKNNPolicy(EvalPolicy):
    """Item-to-item collaborative filtering on co-occurrence in users' recent histories.

    Two items co-occur when one enters a user's recent history while the other is in it (among
    the user's last ``history`` distinct items before it); an item *occurs* each time it enters
    one. Similarity is the
    cosine of the two occurrence vectors: ``sim(i, j) = C_ij / sqrt(n_i · n_j)`` (Sarwar et al.
    2001; Linden et al. 2003), so popular items do not neighbour everything. A repeat action on
    an item already in the history only refreshes its recency and counts nothing.

    A user's candidates are scored by ``Σ_h sim(h, j)`` over the items ``h`` of their recent
    history, with ``sim(h, h) = 1`` (the cosine of a vector with itself). Nothing is excluded
    (users re-buy): a history item scores 1 for itself plus its similarity to the user's other
    items, as in item-kNN recommenders that do not filter already-seen items. The list is the best-scored items (ties: the order in which they
    were reached), then popularity, then random catalogue items.

    Parameters
    ----------
    catalogue
        Fallback items (as for ``popularity``).
    history
        Recent distinct items per user: the co-occurrence window and the items scored against.
        An action costs O(history); a request O(Σ_h neighbours(h)).
    """

    name = "itemknn"

    def __init__(self, catalogue: Sequence[str], history: int = 20):
        self.history = RecentHistory(history)
        self.popularity = PopularityPolicy(catalogue)
        self.occurrences: Counter[str] = Counter()
        self.co: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def observe(self, user_id: str, item_id: str, reward: float) -> None:
        self.popularity.observe(user_id, item_id, reward)
        before = self.history.items(user_id)
        if self.history.add(user_id, item_id):
            self.occurrences[item_id] += 1
            row = self.co[item_id]
            for other in before:
                if other != item_id:
                    row[other] += 1
                    self.co[other][item_id] += 1

    def similarity(self, a: str, b: str) -> float:
        if a == b:
            return 1.0 if self.occurrences[a] else 0.0
        c = self.co.get(a, {}).get(b, 0)
        return c / math.sqrt(self.occurrences[a] * self.occurrences[b]) if c else 0.0

    def scores(self, user_id: str) -> dict[str, float]:
        """``Σ_h sim(h, j)`` for every item ``j`` co-occurring with the user's recent items."""
        scores: dict[str, float] = {}
        for h in self.history.newest_first(user_id):
            scores[h] = scores.get(h, 0.0) + 1.0   # sim(h, h)
            row = self.co.get(h)
            if not row:
                continue
            inv_h = 1.0 / math.sqrt(self.occurrences[h])
            for j, c in row.items():
                scores[j] = scores.get(j, 0.0) + c * inv_h / math.sqrt(self.occurrences[j])
        return scores

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        scores = self.scores(request.user_id)
        rank = {j: n for n, j in enumerate(scores)}
        best = heapq.nsmallest(list_size, scores, key=lambda j: (-scores[j], rank[j]))
        items = _fill_with_popular(best, self.popularity, request, rng, list_size)
        return Choice(items, None, 1.0, _deterministic(items))


_VW_UNSAFE = re.compile(r"[\s|:]")


def _vw_features(values) -> str:
    return " ".join(f"{j}:{v:.6g}" for j, v in enumerate(values.tolist()) if v != 0.0)


class VWPolicy(EvalPolicy):
    """Vowpal Wabbit's contextual bandit with action-dependent features (``--cb_explore_adf``)
    over the retrieved cases: the same candidates and features as ``linucb`` and ``softq``.

    Each decision is one multi-line ADF example:

    * shared namespace ``s``: the user's state s (``D`` features);
    * per candidate: ``c`` the case's state (``D``), ``v`` its item vector (``D``), ``o`` its
      outcome, ``i`` its item id as one categorical feature (VW hashes the name, so the model
      can learn a bias per item, shared by every case that leads to that item);
    * the default arguments cross ``s`` with each of ``c``, ``v``, ``o`` and ``i``.

    VW answers a PMF over the candidates (epsilon-greedy by default); the case is sampled from it
    with the evaluation's generator, and its probability is the propensity. The list is the
    sampled case's item, then the other candidates' items by descending PMF (ties: nearest
    first), then the next nearest cases' items. The distribution over items sums the PMF of the
    cases that lead to each item.

    Learning: cost = −reward, with the logged propensity, on the example of the decision. The
    candidate rows of each decision are kept until its transition arrives and dropped when it is
    learned; at most ``max_open`` decisions are kept (oldest dropped first). The policy does not
    see request ids, so a transition is matched by user, request time and chosen case (oldest
    first when several decisions share them). A transition whose decision is no longer kept is
    learned from a one-candidate example rebuilt from the transition (its state, case features
    and item): the ``mtr`` cost model only updates the chosen action anyway. Counted in
    ``rebuilt_examples``.

    Parameters
    ----------
    args
        VW arguments; must contain ``--cb_explore_adf``. ``--quiet`` and ``--random_seed`` are
        added here.
    seed
        VW's random seed (used by explorations that randomise, e.g. ``--bag``).
    max_open
        Decisions kept waiting for their transitions.
    """

    name = "vw"

    def __init__(self, args: str = DEFAULT_VW_ARGS, seed: int = 0, max_open: int = 4096):
        from vowpalwabbit import Workspace  # imported only when the policy is used

        if "--cb_explore_adf" not in args.split():
            raise ValueError(f"vw policy needs --cb_explore_adf in its arguments, got {args!r}")
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.args = args
        self.workspace = Workspace(f"{args} --quiet --random_seed {int(seed)}")
        self.max_open = max_open
        # decisions waiting for their transitions, oldest first, by sequence number; and the
        # sequence numbers of each (user, time, case), oldest first (two requests may share one)
        self._open: OrderedDict[int, tuple[tuple[str, float, str], list[str], int]] = OrderedDict()
        self._by_key: dict[tuple[str, float, str], deque[int]] = {}
        self._seq = 0
        self.updates = 0
        self.rebuilt = 0

    @staticmethod
    def _shared(state) -> str:
        return f"shared |s {_vw_features(np.asarray(state, np.float64))}"

    @staticmethod
    def _action(features, item_id: str) -> str:
        f = np.asarray(features, np.float64)
        item = _VW_UNSAFE.sub("_", item_id) or "_"
        return (f"|c {_vw_features(case_state(f))} |v {_vw_features(case_item(f))} |o outcome:{case_outcome(f):.6g} "
                f"|i {item}")

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        n = len(request.case_ids)
        if n == 0:
            items = items_in_order(request, [], list_size)
            return Choice(items, None, 1.0, _deterministic(items) if items else None)
        lines = [self._shared(request.state)] + [self._action(request.features[i], request.case_items[i])
                                                 for i in range(n)]
        pmf = np.asarray(self.workspace.predict(lines), np.float64)
        pmf = pmf / pmf.sum()
        chosen = int(rng.choice(n, p=pmf))
        rest = [int(i) for i in np.argsort(-pmf, kind="stable") if i != chosen]
        items = items_in_order(request, [chosen] + rest, list_size)
        by_item: dict[str, float] = {}
        for item, p in zip(request.case_items, pmf):
            by_item[item] = by_item.get(item, 0.0) + float(p)
        self._keep((request.user_id, float(request.ts), request.case_ids[chosen]), lines, chosen)
        return Choice(items, chosen, float(pmf[chosen]), by_item)

    def _keep(self, key: tuple[str, float, str], lines: list[str], chosen: int) -> None:
        self._seq += 1
        self._open[self._seq] = (key, lines, chosen)
        self._by_key.setdefault(key, deque()).append(self._seq)
        while len(self._open) > self.max_open:
            _, (old_key, _, _) = self._open.popitem(last=False)
            self._forget(old_key)

    def _forget(self, key: tuple[str, float, str]) -> int:
        """The oldest sequence number kept under ``key``, removed from the index."""
        queue = self._by_key[key]
        seq = queue.popleft()
        if not queue:
            del self._by_key[key]
        return seq

    def _take(self, key: tuple[str, float, str]) -> tuple[list[str], int] | None:
        if key not in self._by_key:
            return None
        _, lines, chosen = self._open.pop(self._forget(key))
        return lines, chosen

    def learn(self, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            kept = self._take((t.user_id, float(t.ts), t.case_id))
            if kept is None:
                lines, chosen = [self._shared(t.state), self._action(t.case_features, t.item_id)], 0
                self.rebuilt += 1
            else:
                lines, chosen = kept
            labelled = list(lines)
            labelled[chosen + 1] = f"0:{-float(t.reward):.6g}:{float(t.propensity):.6g} {lines[chosen + 1]}"
            self.workspace.learn(labelled)
            self.updates += 1

    def stats(self) -> dict[str, float]:
        return {"updates": float(self.updates), "rebuilt_examples": float(self.rebuilt),
                "open_decisions": float(len(self._open))}
