"""Binary encoding of the case bank's log records: a batch of added cases, or a batch of evicted ids.

One :func:`encode_add` record carries every case one ``CaseBank.add`` call routed to a shard, so a
batch costs one record, one CRC and one fsync however many cases it holds. Numbers are stored as
little-endian arrays; the three string columns (case id, item id, source) as one JSON list.
:func:`batch_from_arrays` validates a batch given in columns with vectorised checks (the bulk add
path); :func:`batch_from_cases` lays ``Case`` objects out in columns and then does the same.

>>> import numpy as np
>>> batch = CaseBatch(["c1"], ["i1"], ["recommendation"], np.array([1.5]), np.array([2.0]),
...                   np.ones((1, 3), np.float32), np.zeros((1, 3), np.float32))
>>> decode_add(encode_add(batch), dim=3).case_ids
['c1']
>>> decode_evict(encode_evict(["c1", "c2"]))
['c1', 'c2']
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from memento.schemas import Case

__all__ = ["RECORD_ADD", "RECORD_EVICT", "CaseBatch", "encode_add", "decode_add", "encode_evict",
           "decode_evict", "batch_from_cases", "batch_from_arrays"]

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
        picks = rows.tolist()
        case_ids, item_ids, sources = self.case_ids, self.item_ids, self.sources
        return CaseBatch([case_ids[r] for r in picks], [item_ids[r] for r in picks],
                         [sources[r] for r in picks], self.ts[rows], self.outcomes[rows],
                         self.states[rows], self.item_vecs[rows])

    def case(self, row: int) -> Case:
        return Case(case_id=self.case_ids[row], state=self.states[row].tolist(),
                    item_id=self.item_ids[row], item_vec=self.item_vecs[row].tolist(),
                    outcome=float(self.outcomes[row]), ts=float(self.ts[row]),
                    source=self.sources[row])


def batch_from_cases(cases: Sequence[Case], dim: int) -> CaseBatch:
    """Validate ``cases`` and lay them out in columns; raises ValueError naming the bad case and field."""
    for row, case in enumerate(cases):
        if not isinstance(case, Case):
            raise TypeError(f"CaseBank.add: expected memento.schemas.Case, got {type(case).__name__} "
                            f"at position {row}")
    columns = {name: [getattr(c, name) for c in cases] for name in
               ("case_id", "item_id", "source", "ts", "outcome", "state", "item_vec")}
    vectors = {}
    for name in ("state", "item_vec"):
        try:
            vectors[name] = _matrix(columns[name], dim)
        except (ValueError, TypeError):
            vectors[name] = None
        if vectors[name] is None:
            for case in cases:
                if len(getattr(case, name)) != dim:
                    raise ValueError(f"CaseBank.add: case {case.case_id!r} field {name!r} has "
                                     f"{len(getattr(case, name))} values, expected dim={dim}")
            raise ValueError(f"CaseBank.add: field {name!r} is not a list of {dim} numbers")
    return batch_from_arrays(columns["case_id"], vectors["state"], columns["item_id"], vectors["item_vec"],
                             columns["outcome"], columns["ts"], columns["source"], dim=dim)


def _matrix(rows: list, dim: int) -> np.ndarray | None:
    """Rows of ``dim`` numbers as a float32 [n, dim] array; None if a row has another length."""
    if not rows:
        return np.empty((0, dim), np.float32)
    if set(map(len, rows)) != {dim}:
        return None
    if isinstance(rows[0], np.ndarray):
        return np.stack(rows).astype(np.float32)
    # fromiter over the flattened rows is several times faster than np.array on a list of lists.
    flat = np.fromiter(itertools.chain.from_iterable(rows), np.float64, len(rows) * dim)
    return flat.reshape(len(rows), dim).astype(np.float32)


def _column(values, n: int, name: str, case_ids: list[str]) -> np.ndarray:
    try:
        column = np.array(np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)))
    except (ValueError, TypeError):
        raise ValueError(f"CaseBank.add: field {name!r} must be a number or {n} numbers") from None
    bad = ~np.isfinite(column)
    if bad.any():
        raise ValueError(f"CaseBank.add: case {case_ids[int(np.argmax(bad))]!r} field {name!r} "
                         f"is not a finite number")
    return column


def _strings(values, n: int, name: str) -> list[str]:
    if isinstance(values, str):
        return [values] * n
    strings = values.tolist() if isinstance(values, np.ndarray) else list(values)
    if len(strings) != n:
        raise ValueError(f"CaseBank.add: field {name!r} has {len(strings)} values for {n} cases")
    return strings if all(type(v) is str for v in strings) else [str(v) for v in strings]


def batch_from_arrays(case_ids: Sequence[str], states, item_ids, item_vecs, outcomes, ts,
                      sources="recommendation", *, dim: int) -> CaseBatch:
    """Validate a batch given in columns (vectorised; no per-case objects) and return it.

    ``states`` and ``item_vecs`` are [n, dim] arrays; ``outcomes`` and ``ts`` are n numbers or one
    number for all; ``item_ids`` and ``sources`` are n strings or one string for all. Raises
    ValueError naming the field (and the first bad case) that is wrong.

    >>> b = batch_from_arrays(["a", "b"], np.eye(2), "item", np.zeros((2, 2)), [1, 0], 5.0, dim=2)
    >>> b.item_ids, b.ts.tolist(), b.states.dtype.name
    (['item', 'item'], [5.0, 5.0], 'float32')
    >>> batch_from_arrays(["a"], np.ones((1, 3)), "i", np.ones((1, 2)), 0, 0, dim=2)
    Traceback (most recent call last):
    ...
    ValueError: CaseBank.add: field 'states' must have shape [1, 2], got [1, 3]
    """
    case_ids = case_ids.tolist() if isinstance(case_ids, np.ndarray) else list(case_ids)
    n = len(case_ids)
    if not all(type(c) is str and c for c in case_ids):
        for row, c in enumerate(case_ids):
            if not (isinstance(c, str) and c):
                raise ValueError(f"CaseBank.add: case at position {row} has an empty or non-string "
                                 f"case_id {c!r}")
        case_ids = [str(c) for c in case_ids]
    columns = []
    for name, values in (("states", states), ("item_vecs", item_vecs)):
        try:
            column = np.ascontiguousarray(values, dtype=np.float32)
        except (ValueError, TypeError):
            raise ValueError(f"CaseBank.add: field {name!r} must be an array of numbers") from None
        if column.shape != (n, dim):
            raise ValueError(f"CaseBank.add: field {name!r} must have shape [{n}, {dim}], got "
                             f"{list(column.shape)}")
        bad = ~np.isfinite(column).all(axis=1)
        if bad.any():
            raise ValueError(f"CaseBank.add: case {case_ids[int(np.argmax(bad))]!r} field "
                             f"{name[:-1]!r} holds a non-finite value")
        columns.append(column)
    return CaseBatch(case_ids, _strings(item_ids, n, "item_ids"), _strings(sources, n, "sources"),
                     _column(ts, n, "ts", case_ids), _column(outcomes, n, "outcome", case_ids),
                     columns[0], columns[1])


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
