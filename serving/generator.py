"""Generators: turn the case the policy chose into the item(s) recommended.

In Memento's terms the generator is the frozen "LLM" that acts on the retrieved case; it never
learns (all learning is in the retrieval policy). :class:`CaseItemGenerator` (the default)
recommends the chosen case's item and, when more items are asked for, the items of the next
most probable candidates with distinct items. :class:`ChatCompletionGenerator` asks an
OpenAI-compatible chat endpoint, giving it the retrieved case as an in-context example; it is
off by default and falls back to the default generator on any error.

>>> import numpy as np
>>> from serving.policy import Decision
>>> class Bank:  # anything with item_of(case_id) -> item id
...     items = {"a": "i1", "b": "i1", "c": "i2"}
...     def item_of(self, cid):
...         return self.items.get(cid)
>>> d = Decision(np.zeros(2, np.float32), ["a", "b", "c"], np.zeros(3), np.zeros((3, 5)),
...              np.zeros(3), np.array([0.2, 0.5, 0.3]), chosen=0, policy_version=1)
>>> CaseItemGenerator(Bank()).generate(d, k=2)
['i1', 'i2']
"""

from __future__ import annotations

import abc
import json
import logging
import re
import urllib.error
import urllib.request
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from memento.encoder import HistoryEntry
from serving.policy import Decision

__all__ = ["Generator", "CaseItemGenerator", "ChatCompletionGenerator", "GeneratorError", "first_distinct"]

log = logging.getLogger(__name__)


class GeneratorError(RuntimeError):
    """The generator could not produce an item."""


class Generator(abc.ABC):
    """Maps a policy decision to at most ``k`` distinct item ids, the chosen case's item first
    unless the generator decides otherwise. Generators are frozen: they never learn.

    ``blocking`` tells the server to call :meth:`generate` off the event loop.
    """

    blocking: bool = False

    def generate(self, decision: Decision, k: int = 1,
                 history: Sequence[HistoryEntry] = ()) -> list[str]:
        """Up to ``k`` distinct item ids (at least one) for ``decision``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        items = list(dict.fromkeys(self._generate(decision, k, list(history))))[:k]
        if not items:
            raise GeneratorError(f"{type(self).__name__} produced no item")
        return items

    @abc.abstractmethod
    def _generate(self, decision: Decision, k: int, history: list[HistoryEntry]) -> list[str]:
        """Item ids, best first (duplicates and extras are dropped by :meth:`generate`)."""


class CaseItemGenerator(Generator):
    """The chosen case's item, then the items of the other candidates by decreasing μ; if the
    candidates hold fewer than ``k`` distinct items, the next nearest cases of the bank fill up.

    Parameters
    ----------
    bank
        The case bank (``item_of`` and, for filling up, ``search``).
    """

    def __init__(self, bank):
        self.bank = bank

    def _item(self, case_id: str) -> str | None:
        return self.bank.item_of(case_id)

    def _generate(self, decision: Decision, k: int, history: list[HistoryEntry]) -> list[str]:
        return first_distinct(self._items_in_order(decision, k), k)

    def _items_in_order(self, decision: Decision, k: int) -> Iterator[str | None]:
        """The candidates' items, the chosen case's first, then by decreasing μ; then the items of
        the next nearest cases (searched only if the candidates' items run out before ``k``)."""
        yield self._item(decision.case_id)
        for index in decision.ranked()[1:]:  # ranked() starts with the chosen case
            yield self._item(decision.case_ids[index])
        seen_cases = set(decision.case_ids)
        _, ids = self.bank.search(np.asarray(decision.state, np.float32)[None], len(seen_cases) + 4 * k)
        for case_id in ids[0]:
            if case_id not in seen_cases:
                yield self._item(case_id)


def first_distinct(items: Iterable[str | None], k: int) -> list[str]:
    """The first ``k`` distinct item ids of ``items``, in order, skipping ``None``; ``items`` is
    consumed only as far as needed. The recommendation-list rule shared by
    :class:`CaseItemGenerator` and the offline evaluation.

    >>> first_distinct(["a", None, "a", "b", "c"], 2)
    ['a', 'b']
    """
    out: list[str] = []
    if k < 1:
        return out
    for item in items:
        if item is not None and item not in out:
            out.append(item)
            if len(out) == k:
                break
    return out


class ChatCompletionGenerator(Generator):
    """Asks an OpenAI-compatible ``/chat/completions`` endpoint for the item(s), with the
    retrieved case and the user's recent items in the prompt. The answer must name items among
    the candidates' items or the catalogue; anything else, or any transport error, is logged,
    counted, and answered by ``fallback``.

    Parameters
    ----------
    base_url
        Endpoint root, e.g. ``http://127.0.0.1:8000/v1``.
    model
        Model name sent in the request.
    fallback
        Generator used when the endpoint fails (normally :class:`CaseItemGenerator`).
    api_key
        Sent as a bearer token when given.
    timeout_s
        Per-request timeout.
    known_items
        Item ids the answer may name in addition to the candidates' items.
    on_fallback
        Called once per fallback (serving counts them in a metric).
    """

    blocking = True

    def __init__(self, base_url: str, model: str, fallback: Generator, *, api_key: str = "",
                 timeout_s: float = 2.0, known_items: Sequence[str] = (),
                 on_fallback: Callable[[], None] | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.fallback = fallback
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.known_items = set(known_items)
        self.on_fallback = on_fallback

    def _candidate_items(self, decision: Decision) -> list[str]:
        bank = getattr(self.fallback, "bank", None)
        items = []
        for index in decision.ranked():
            item = bank.item_of(decision.case_ids[index]) if bank is not None else None
            if item is not None:
                items.append(item)
        return list(dict.fromkeys(items))

    def _messages(self, decision: Decision, k: int, history: list[HistoryEntry],
                  candidates: list[str]) -> list[dict]:
        chosen_item = candidates[0] if candidates else "unknown"
        recent = ", ".join(f"{h.action} {h.item_id}" for h in sorted(history, key=lambda h: -h.ts)[:10])
        example = (f"A similar user (similarity {float(decision.similarities[decision.chosen]):.2f}) "
                   f"was recommended item {chosen_item} with outcome "
                   f"{float(decision.case_features[-1]):.2f}.")
        return [
            {"role": "system", "content": "You recommend shop items. Answer only with a JSON array "
                                          "of item id strings, best first."},
            {"role": "user", "content": f"{example}\nThis user's recent actions: {recent or 'none'}.\n"
                                        f"Candidate items: {json.dumps(candidates)}.\n"
                                        f"Recommend {k} item(s)."},
        ]

    def _ask(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read())
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise GeneratorError(f"{self.url} answered without choices[0].message.content") from None

    def _generate(self, decision: Decision, k: int, history: list[HistoryEntry]) -> list[str]:
        candidates = self._candidate_items(decision)
        try:
            content = self._ask(self._messages(decision, k, history, candidates))
            match = re.search(r"\[.*\]", content, re.S)
            named = json.loads(match.group(0)) if match else []
            allowed = set(candidates) | self.known_items
            items = [str(i) for i in named if str(i) in allowed] if isinstance(named, list) else []
            if not items:
                raise GeneratorError(f"answer names no known item: {content[:200]!r}")
            return items
        except (OSError, urllib.error.URLError, ValueError, GeneratorError) as exc:
            log.warning("chat generator at %s failed (%s); falling back to %s", self.url, exc,
                        type(self.fallback).__name__)
            if self.on_fallback is not None:
                self.on_fallback()
            return self.fallback._generate(decision, k, history)
