"""Faster equivalents of the services' per-event work, for the evaluation loop.

``memento eval`` runs the stream worker's job for every event of a run, in one process. Part of
that job costs far more there than it must, and is replaced here by a version that gives
bit-for-bit the same results (the states come from the stream worker's own fast encoder,
:class:`memento.encoder.RowStateEncoder`):

* :class:`BufferedCaseBank` — the run's :class:`memory_store.CaseBank`, with the cases written
  between two reads of the bank added in one call (one column batch instead of one call per
  case), and the item of every case kept by id, so that a search's items need no ``get``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["BufferedCaseBank"]


class BufferedCaseBank:
    """A :class:`memory_store.CaseBank` whose writes wait for the next read.

    The evaluation writes a case for every organic action and every closed window, and reads the
    bank once or twice per request. Writes are kept in order and added in one
    :meth:`~memory_store.CaseBank.add_arrays` call just before the bank is read (searched,
    counted or closed): shards, slots and insertion order come out as with one ``add`` per case,
    so searches return the same cases in the same order. It also remembers each case's item
    (a known id keeps its first item, as the bank does), so :meth:`items_of` replaces a ``get``
    per search hit. Every other attribute is the bank's, read after the queued cases are added
    (the evaluation's readers use ``search_with_features``: :mod:`learner.candidates`,
    :class:`serving.policy.RetrievalPolicy`).

    Parameters
    ----------
    bank
        An open case bank (it is closed by :meth:`close`).
    """

    def __init__(self, bank):
        self.bank = bank
        self.dim = bank.dim
        self._item_of: dict[str, str] = {}
        self._pending: list[tuple[str, np.ndarray, str, np.ndarray, float, float, str]] = []

    def add_case(self, case_id: str, state: np.ndarray, item_id: str, item_vec: np.ndarray,
                 outcome: float, ts: float, source: str) -> None:
        """Queue one case (``state`` and ``item_vec``: float32 [dim])."""
        self._pending.append((case_id, state, item_id, item_vec, outcome, ts, source))
        self._item_of.setdefault(case_id, item_id)

    def add(self, cases) -> None:
        """Queue ``memento.schemas.Case`` objects."""
        for c in cases:
            self.add_case(c.case_id, np.asarray(c.state, np.float32), c.item_id,
                          np.asarray(c.item_vec, np.float32), c.outcome, c.ts, c.source)

    def flush(self) -> int:
        """Add every queued case to the bank; returns how many were new."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        case_ids, states, item_ids, item_vecs, outcomes, ts, sources = zip(*pending)
        return self.bank.add_arrays(list(case_ids), np.stack(states), list(item_ids), np.stack(item_vecs),
                                    list(outcomes), list(ts), list(sources))

    def search_with_features(self, queries: np.ndarray, k: int):
        self.flush()
        return self.bank.search_with_features(queries, k)

    def items_of(self, case_ids: Sequence[str]) -> list[str]:
        """The item of each case (cases of a search: all are known)."""
        item_of = self._item_of
        return [item_of[c] for c in case_ids]

    def __len__(self) -> int:
        self.flush()
        return len(self.bank)

    def __getattr__(self, name: str):
        # Any other use of the bank (get, search, features, stats, ...) sees every queued case.
        if name.startswith("_") or name == "bank":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        self.flush()
        return getattr(self.bank, name)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.bank.close()
