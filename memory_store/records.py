"""Binary encoding of the case bank's log records: a batch of added cases, or a batch of evicted ids.

One :func:`encode_add` record carries every case one ``CaseBank.add`` call routed to a shard, so a
batch costs one record, one CRC and one fsync however many cases it holds. Numbers are stored as
little-endian arrays; the three string columns (case id, item id, source) as one JSON list.

>>> import numpy as np
>>> batch = CaseBatch(["c1"], ["i1"], ["recommendation"], np.array([1.5]), np.array([2.0]),
...                   np.ones((1, 3), np.float32), np.zeros((1, 3), np.float32))
>>> decode_add(encode_add(batch), dim=3).case_ids
['c1']
>>> decode_evict(encode_evict(["c1", "c2"]))
['c1', 'c2']
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from memento.schemas import Case

__all__ = ["RECORD_ADD", "RECORD_EVICT", "CaseBatch", "encode_add", "decode_add", "encode_evict",
           "decode_evict", "batch_from_cases"]

RECORD_ADD = 1
RECORD_EVICT = 2

_ADD_HEADER = struct.Struct("<II")  # number of cases, length of the JSON string block


@dataclass
class CaseBatch:
    """Cases in columns: what a shard stores and what an add record holds."""

    case_ids: list[str]
    item_ids: list[str]
    sources: list[str]
    ts: np.ndarray          # float64 [n]
    outcomes: np.ndarray    # float64 [n]
    states: np.ndarray      # float32 [n, dim]
    item_vecs: np.ndarray   # float32 [n, dim]

    def __len__(self) -> int:
        return len(self.case_ids)

    def take(self, rows: Sequence[int] | np.ndarray) -> "CaseBatch":
        rows = np.asarray(rows, dtype=np.int64)
        return CaseBatch([self.case_ids[r] for r in rows], [self.item_ids[r] for r in rows],
                         [self.sources[r] for r in rows], self.ts[rows], self.outcomes[rows],
                         self.states[rows], self.item_vecs[rows])

    def case(self, row: int) -> Case:
        return Case(case_id=self.case_ids[row], state=self.states[row].tolist(),
                    item_id=self.item_ids[row], item_vec=self.item_vecs[row].tolist(),
                    outcome=float(self.outcomes[row]), ts=float(self.ts[row]),
                    source=self.sources[row])


def batch_from_cases(cases: Sequence[Case], dim: int) -> CaseBatch:
    """Validate ``cases`` and lay them out in columns; raises ValueError naming the bad case and field."""
    n = len(cases)
    case_ids, item_ids, sources = [], [], []
    ts = np.empty(n, np.float64)
    outcomes = np.empty(n, np.float64)
    for row, case in enumerate(cases):
        if not isinstance(case, Case):
            raise TypeError(f"CaseBank.add: expected memento.schemas.Case, got {type(case).__name__} "
                            f"at position {row}")
        if not isinstance(case.case_id, str) or not case.case_id:
            raise ValueError(f"CaseBank.add: case at position {row} has an empty or non-string case_id "
                             f"{case.case_id!r}")
        case_ids.append(case.case_id)
        item_ids.append(str(case.item_id))
        sources.append(str(case.source))
        ts[row] = case.ts
        outcomes[row] = case.outcome
    try:
        states = np.asarray([c.state for c in cases], dtype=np.float32).reshape(n, -1) if n else \
            np.empty((0, dim), np.float32)
        item_vecs = np.asarray([c.item_vec for c in cases], dtype=np.float32).reshape(n, -1) if n else \
            np.empty((0, dim), np.float32)
    except ValueError:
        states = item_vecs = None
    for name, column in (("state", states), ("item_vec", item_vecs)):
        if column is None or column.shape[1] != dim:
            for case in cases:
                if len(getattr(case, name)) != dim:
                    raise ValueError(f"CaseBank.add: case {case.case_id!r} field {name!r} has "
                                     f"{len(getattr(case, name))} values, expected dim={dim}")
            raise ValueError(f"CaseBank.add: field {name!r} is not a list of {dim} numbers")
        bad = ~np.isfinite(column).all(axis=1)
        if bad.any():
            raise ValueError(f"CaseBank.add: case {case_ids[int(np.argmax(bad))]!r} field {name!r} "
                             f"holds a non-finite value")
    for name, column in (("ts", ts), ("outcome", outcomes)):
        bad = ~np.isfinite(column)
        if bad.any():
            raise ValueError(f"CaseBank.add: case {case_ids[int(np.argmax(bad))]!r} field {name!r} "
                             f"is not a finite number")
    return CaseBatch(case_ids, item_ids, sources, ts, outcomes, states, item_vecs)


def encode_add(batch: CaseBatch) -> bytes:
    strings = json.dumps([batch.case_ids, batch.item_ids, batch.sources],
                         separators=(",", ":")).encode()
    return b"".join((_ADD_HEADER.pack(len(batch), len(strings)), strings,
                     np.ascontiguousarray(batch.ts, "<f8").tobytes(),
                     np.ascontiguousarray(batch.outcomes, "<f8").tobytes(),
                     np.ascontiguousarray(batch.states, "<f4").tobytes(),
                     np.ascontiguousarray(batch.item_vecs, "<f4").tobytes()))


def decode_add(payload: bytes, dim: int) -> CaseBatch:
    n, string_len = _ADD_HEADER.unpack_from(payload, 0)
    pos = _ADD_HEADER.size
    case_ids, item_ids, sources = json.loads(payload[pos:pos + string_len])
    pos += string_len
    expected = pos + n * (8 + 8 + 8 * dim)
    if len(payload) != expected or not (len(case_ids) == len(item_ids) == len(sources) == n):
        raise ValueError(f"add record of {len(payload)} bytes does not hold {n} cases of dim {dim}")
    ts = np.frombuffer(payload, "<f8", n, pos).astype(np.float64)
    pos += 8 * n
    outcomes = np.frombuffer(payload, "<f8", n, pos).astype(np.float64)
    pos += 8 * n
    states = np.frombuffer(payload, "<f4", n * dim, pos).reshape(n, dim).astype(np.float32)
    pos += 4 * n * dim
    item_vecs = np.frombuffer(payload, "<f4", n * dim, pos).reshape(n, dim).astype(np.float32)
    return CaseBatch(case_ids, item_ids, sources, ts, outcomes, states, item_vecs)


def encode_evict(case_ids: Sequence[str]) -> bytes:
    return json.dumps(list(case_ids), separators=(",", ":")).encode()


def decode_evict(payload: bytes) -> list[str]:
    ids = json.loads(payload)
    if not isinstance(ids, list):
        raise ValueError("evict record does not hold a list of case ids")
    return ids
