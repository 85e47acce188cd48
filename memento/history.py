"""Bounded per-user recent-action histories, the input of the state encoder.

>>> h = UserHistories(max_users=2, max_len=3)
>>> for i in range(5): h.add("u", HistoryEntry(str(i), "click", float(i)))
>>> [e.item_id for e in h.get("u")]
['2', '3', '4']
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

from memento.encoder import HistoryEntry

__all__ = ["UserHistories", "HistoryEntry"]


class UserHistories:
    """Thread-safe map user → newest ``max_len`` actions, keeping at most ``max_users`` users
    (least recently updated evicted first)."""

    def __init__(self, max_users: int = 1_000_000, max_len: int = 30):
        self.max_users = max_users
        self.max_len = max_len
        self._data: OrderedDict[str, deque[HistoryEntry]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user_id: str, entry: HistoryEntry) -> None:
        with self._lock:
            hist = self._data.get(user_id)
            if hist is None:
                hist = self._data[user_id] = deque(maxlen=self.max_len)
                if len(self._data) > self.max_users:
                    self._data.popitem(last=False)
            else:
                self._data.move_to_end(user_id)
            hist.append(entry)

    def get(self, user_id: str) -> list[HistoryEntry]:
        with self._lock:
            return list(self._data.get(user_id, ()))

    def __len__(self) -> int:
        return len(self._data)
