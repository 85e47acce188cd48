"""Logged data for ``memento eval``: a Tmall log or an interactions CSV as one time-ordered event list.

Two sources are read into the same :class:`LoggedData`:

* ``tmall`` (:func:`load_tmall`): the Tmall log format, parsed by :func:`evaluation.tmall.load_tmall_log`,
  with item metadata from a Tmall product file (:func:`memento.encoder.load_products`);
* ``interactions`` (:func:`load_interactions`): a generic CSV with a header, one row per logged
  event, optionally with the logging policy's propensity and context-feature columns (bandit logs).
  A context column holds numbers or categorical strings; :meth:`LoggedData.context_vector` turns
  an event's context into one fixed-length vector (numbers as they are, categories feature-hashed).

The reward of an event comes from a reward mapping (action name → reward, see
:func:`parse_reward_mapping`) or, for rating logs, from a rating threshold. Rows that cannot be used
are kept in :attr:`LoggedData.skipped` with their line number and the reason, instead of stopping
the load; a missing file, a missing required column or a file where no row parses raises an error
naming the file and the problem.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
>>> _ = open(path, "w").write(
...     "user_id,item_id,timestamp,action\\n"
...     "u1,i7,2014-09-18T15:03:00,purchase\\n"
...     "u1,i8,1409530080,click\\n"
...     "u2,i7,1409530080,view\\n")
>>> data = load_interactions(path)
>>> [(e.event_id, e.user_id, e.item_id, e.ts, e.action, e.reward) for e in data.events]
[('interactions-3', 'u1', '8', 1409530080.0, 'click', 1.0), ('interactions-2', 'u1', '7', 1411052580.0, 'purchase', 5.0)]
>>> data.skipped
[(4, "action 'view' has no reward (known: cart, click, collect, purchase); add it to the reward mapping, e.g. view=1")]
>>> data.summary()
'interactions: 2 events (click 1, purchase 1); 1 users; 2 items; 1 skipped rows'
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, TextIO

import numpy as np

from memento.config import RewardWeights, parse_reward_mapping
from memento.encoder import ItemMeta, load_products, normalise_item_id, signed_hash
from memento.schemas import ACTION_ALIASES
from evaluation.tmall import load_tmall_log

__all__ = ["LoggedEvent", "LoggedData", "parse_reward_mapping", "load_tmall", "load_interactions",
           "load_items", "default_rewards", "parse_timestamp", "CONTEXT_BUCKETS"]

_ENCODINGS = ("utf-8-sig", "gb18030")
_NULL = {"", "null"}
# Spellings of a missing context value (compared lower case): 0 in a numeric column, no
# feature in a categorical one.
_MISSING_CONTEXT = {"", "nan", "null", "none", "na", "n/a"}
# Hash buckets shared by the categorical context columns of a log.
CONTEXT_BUCKETS = 1024


@dataclass(frozen=True)
class LoggedEvent:
    """One logged event.

    Parameters
    ----------
    event_id
        ``"<source>-<line number>"``, or the file's ``event_id`` value when it has that column.
    user_id
        The user; ``""`` when the log has no user id (context-only bandit logs).
    item_id
        The item, without Tmall's ``i`` prefix.
    ts
        Event time, epoch seconds.
    action
        The action name, lower case with source spellings normalised (``alipay`` → ``purchase``);
        ``"rating"`` for rating logs.
    reward
        The reward of this event under the mapping (or rating threshold) it was loaded with.
    propensity
        The logging policy's probability of this item, when the log has it.
    context
        The context values, one per context column in header order, when the log has context
        columns: a float for a numeric column (a missing value is 0.0), the stripped string for a
        categorical column (a missing value is ``""``). :meth:`LoggedData.context_vector` makes
        the feature vector of it.
    rating
        The logged rating, when the log has a ``rating`` column.
    """

    event_id: str
    user_id: str
    item_id: str
    ts: float
    action: str
    reward: float
    propensity: float | None
    context: tuple[float | str, ...] | None
    rating: float | None = None


@dataclass
class LoggedData:
    """The events of one log in time order, item metadata, and what was skipped.

    Parameters
    ----------
    source
        ``"tmall"`` or ``"interactions"``.
    events
        Sorted by ``ts``; ties keep file order.
    items
        Item metadata by item id (empty when no item file was given).
    context_columns
        Names of the context-feature columns, in header order (empty if none).
    categorical_columns
        The context columns whose values are categories (strings), in header order; the other
        context columns are numeric.
    context_buckets
        Hash buckets of the categorical columns' one-hots (see :meth:`context_vector`).
    skipped
        ``(line, reason)`` of every row that was not loaded, by line.
    rewards
        The reward mapping in effect (empty for rating logs).
    """

    source: str
    events: list[LoggedEvent]
    items: dict[str, ItemMeta] = field(default_factory=dict)
    context_columns: list[str] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    rewards: dict[str, float] = field(default_factory=dict)
    categorical_columns: list[str] = field(default_factory=list)
    context_buckets: int = CONTEXT_BUCKETS

    @property
    def context_dim(self) -> int:
        """Length of :meth:`context_vector`: one entry per numeric context column, plus
        :attr:`context_buckets` when some column is categorical (0 without context)."""
        n_numeric = len(self.context_columns) - len(self.categorical_columns)
        return n_numeric + (self.context_buckets if self.categorical_columns else 0)

    def context_vector(self, event: LoggedEvent) -> np.ndarray:
        """The context of ``event`` as one float64 vector of length :attr:`context_dim`.

        The numeric columns' values come first, in header order, as logged (any int or float
        type). Then :attr:`context_buckets` entries shared by the categorical columns: each
        non-missing value adds a signed one-hot, ±1 at the bucket of ``"column=value"`` under
        :func:`memento.encoder.signed_hash` (the item encoder's hashing). A missing categorical
        value adds nothing; distinct values rarely share a bucket (collisions may add or cancel).
        The evaluation projects this vector to the state dimension (a fixed Gaussian projection,
        normalised).

        >>> from memento.encoder import signed_hash
        >>> data = LoggedData("interactions", [], context_columns=["ctx_a", "ctx_b"],
        ...                   categorical_columns=["ctx_a"], context_buckets=8)
        >>> e = LoggedEvent("e1", "", "7", 0.0, "click", 1.0, None, ("81ce5f", 0.5))
        >>> v = data.context_vector(e)
        >>> index, sign = signed_hash("ctx_a=81ce5f", 8)
        >>> data.context_dim, float(v[0]), bool(v[1 + index] == sign), float(abs(v).sum())
        (9, 0.5, True, 1.5)
        """
        if event.context is None or len(event.context) != len(self.context_columns):
            raise ValueError(f"event {event.event_id}: context {event.context!r} does not match "
                             f"the context columns {self.context_columns}")
        vec = np.zeros(self.context_dim, np.float64)
        categorical = set(self.categorical_columns)
        n_numeric = len(self.context_columns) - len(categorical)
        numeric = 0
        for name, value in zip(self.context_columns, event.context):
            if name in categorical:
                if value:
                    index, sign = signed_hash(f"{name}={value}", self.context_buckets)
                    vec[n_numeric + index] += sign
            else:
                vec[numeric] = float(value)
                numeric += 1
        return vec

    @property
    def has_propensity(self) -> bool:
        """True when every event carries the logging policy's propensity."""
        return bool(self.events) and all(e.propensity is not None for e in self.events)

    @property
    def has_users(self) -> bool:
        """True when every event has a user id."""
        return bool(self.events) and all(e.user_id for e in self.events)

    def action_counts(self) -> dict[str, int]:
        """Number of events per action name."""
        return dict(Counter(e.action for e in self.events))

    def summary(self) -> str:
        """One line: events per action, distinct users and items, skipped rows."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.action_counts().items()))
        users = len({e.user_id for e in self.events if e.user_id})
        items = len({e.item_id for e in self.events})
        parts = [f"{self.source}: {len(self.events)} events ({counts or 'none'})",
                 f"{users} users" if users else "no user ids", f"{items} items"]
        if self.items:
            parts.append(f"{len(self.items)} with metadata")
        if self.context_columns:
            kinds = f" ({len(self.categorical_columns)} categorical)" if self.categorical_columns else ""
            parts.append(f"{len(self.context_columns)} context columns{kinds}")
        if self.has_propensity:
            parts.append("propensity logged")
        parts.append(f"{len(self.skipped)} skipped rows")
        return "; ".join(parts)


def default_rewards() -> dict[str, float]:
    """The default reward mapping: :class:`memento.config.RewardWeights`' values.

    >>> default_rewards()
    {'click': 1.0, 'collect': 2.0, 'cart': 3.0, 'purchase': 5.0}
    """
    return {k: float(v) for k, v in dataclasses.asdict(RewardWeights()).items()}


def _effective_rewards(rewards: dict[str, float] | None) -> dict[str, float]:
    # Names go through ACTION_ALIASES, as logged actions do, so "alipay=7" sets purchase.
    mapping = default_rewards()
    seen: dict[str, str] = {}
    for name, value in (rewards or {}).items():
        key = name.strip().lower()
        canonical = ACTION_ALIASES.get(key, key)
        if canonical in seen:
            raise ValueError(f"reward mapping names {seen[canonical]!r} and {name!r}, "
                             f"which are the same action {canonical!r}")
        seen[canonical] = name
        mapping[canonical] = float(value)
    return mapping


def _unknown_action(action: str, mapping: dict[str, float]) -> str:
    return (f"action {action!r} has no reward (known: {', '.join(sorted(mapping))}); "
            f"add it to the reward mapping, e.g. {action}=1")


def load_tmall(log_path: str | Path, products_path: str | Path | None = None,
               rewards: dict[str, float] | None = None) -> LoggedData:
    """Load a Tmall log (and optionally its product file) as logged data.

    Parameters
    ----------
    log_path
        A Tmall log in either shape :func:`evaluation.tmall.load_tmall_log` reads.
    products_path
        The Tmall product CSV for item metadata, or ``None``.
    rewards
        Reward per action, applied over :func:`default_rewards`.

    Raises :class:`FileNotFoundError` for a missing file and :class:`evaluation.tmall.TmallFormatError`
    (a :class:`ValueError`) for a log with nothing parseable.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
    >>> _ = open(path, "w").write("item_id,user_id,action,vtime\\ni161,u2625,alipay,2014/9/18 15:03\\n")
    >>> e = load_tmall(path, rewards={"purchase": 10}).events[0]
    >>> e.event_id, e.user_id, e.item_id, e.action, e.reward
    ('tmall-2', '2625', '161', 'purchase', 10.0)
    """
    mapping = _effective_rewards(rewards)
    log = load_tmall_log(log_path)
    skipped = [(b.line, b.reason) for b in log.bad_rows]
    events: list[LoggedEvent] = []
    for a in log.actions:
        # The Tmall loader names events "<file name>:<line>".
        line = int(a.event_id.rpartition(":")[2])
        if a.action not in mapping:
            skipped.append((line, _unknown_action(a.action, mapping)))
            continue
        events.append(LoggedEvent(event_id=f"tmall-{line}", user_id=a.user_id, item_id=a.item_id,
                                  ts=float(a.ts), action=a.action, reward=mapping[a.action],
                                  propensity=None, context=None))
    if not events:
        raise ValueError(f"{log_path}: no event has a reward; first problems: "
                         + "; ".join(f"line {n}: {r}" for n, r in sorted(skipped)[:3]))
    events.sort(key=lambda e: e.ts)
    items = load_products(products_path) if products_path else {}
    return LoggedData(source="tmall", events=events, items=items, skipped=sorted(skipped), rewards=mapping)


def parse_timestamp(text: str) -> float:
    """Epoch seconds from a number or an ISO 8601 date or date-time (naive means UTC).

    A value that reads as a number is taken as epoch seconds.

    >>> parse_timestamp("1411052580"), parse_timestamp("2014-09-18T15:03:00"), parse_timestamp("2014-09-18")
    (1411052580.0, 1411052580.0, 1410998400.0)
    >>> parse_timestamp("2014-09-18T17:03:00+02:00")
    1411052580.0
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"timestamp {text!r} is not a finite number")
        return value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"timestamp {text!r} is neither epoch seconds nor an ISO 8601 date or "
                         f"date-time (like 2014-09-18 or 2014-09-18T15:03:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _open_csv(path: Path, what: str, read: Callable[[TextIO], object]):
    """Run ``read`` over the file decoded as UTF-8, or as GB18030 when UTF-8 fails."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a file")
    for encoding in _ENCODINGS:
        try:
            with path.open(encoding=encoding, newline="") as fh:
                return read(fh)
        except UnicodeDecodeError:
            continue
    raise ValueError(f"{what} {path} is neither UTF-8 nor GB18030 text")


def _read_header(reader, path: Path, what: str) -> list[str]:
    for row in reader:
        if any(cell.strip() for cell in row):
            header = [cell.strip() for cell in row]
            lowered = [h.lower() for h in header]
            duplicates = sorted({h for h in lowered if lowered.count(h) > 1})
            if duplicates:
                raise ValueError(f"{what} {path}: header repeats columns {duplicates}")
            return header
    raise ValueError(f"{what} {path} is empty (expected a header line)")


def _number(row: dict[str, str], column: str) -> float:
    text = row[column]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{column} {text!r} is not a finite number")
    return value


_KNOWN = ("user_id", "item_id", "timestamp", "action", "rating", "propensity", "event_id")


def load_interactions(log_path: str | Path, *, items_path: str | Path | None = None,
                      rewards: dict[str, float] | None = None, rating_threshold: float | None = None,
                      context_prefix: str | None = None,
                      context_buckets: int = CONTEXT_BUCKETS) -> LoggedData:
    """Load an interactions CSV (one logged event per row) as logged data.

    The file needs a header. Columns (names are case-insensitive):

    * ``item_id`` (required; a Tmall ``i`` prefix is dropped);
    * ``timestamp`` (required): epoch seconds, or an ISO 8601 date or date-time, naive meaning UTC;
    * ``user_id``: required unless context columns are given; then it may be absent or empty;
    * ``action`` or ``rating``: one is required. With ``action`` the reward is the mapping's value
      for the action (source spellings such as ``alipay`` count as ``purchase``). With ``rating``
      the action is ``"rating"`` and the reward is 1.0 when ``rating >= rating_threshold``, else
      0.0. When both columns are present the log is an action log and ``rating`` is only recorded
      in :attr:`LoggedEvent.rating` (empty means none);
    * ``propensity`` (optional): the logging policy's probability of the logged item, in (0, 1].
      If some rows have it, rows without it are skipped;
    * ``event_id`` (optional): used as the event id instead of ``interactions-<line>``; must be
      unique;
    * context columns (optional): every column whose name starts with ``context_prefix``, in
      header order. Each column is typed from the rows that load: it is numeric when every value
      reads as a number (any int or float spelling, e.g. ``3``, ``-0.5``, ``1e3``), categorical
      otherwise (e.g. hashed ids such as ``81ce5f…``, or ``red``). Empty, ``nan``, ``null``,
      ``none``, ``na`` and ``n/a`` (any case) are missing: 0.0 in a numeric column, ``""`` (no
      feature) in a categorical one. A numeric row holding ``inf`` is skipped. See
      :meth:`LoggedData.context_vector` for the vector the evaluation uses.

    Rows with an unusable value are skipped and listed in :attr:`LoggedData.skipped` with the
    column and value.

    Parameters
    ----------
    log_path
        The interactions CSV, UTF-8 or GB18030.
    items_path
        Item metadata CSV for :func:`load_items`, or ``None``.
    rewards
        Reward per action, applied over :func:`default_rewards` (action logs only).
    rating_threshold
        Lowest rating that counts as a success; required for rating logs, refused for action logs.
    context_prefix
        Prefix of the context-feature column names, or ``None`` for no context.
    context_buckets
        Hash buckets shared by the categorical context columns (:attr:`LoggedData.context_buckets`).

    Raises :class:`FileNotFoundError` for a missing file and :class:`ValueError` for a missing
    required column, a bad option, or a file where no row could be used.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "bandit.csv")
    >>> _ = open(path, "w").write("item_id,timestamp,rating,propensity,ctx_a,ctx_b\\n"
    ...                           "3,10,4.5,0.25,0.1,1\\n3,11,2,0.5,0.2,0\\n")
    >>> data = load_interactions(path, rating_threshold=4, context_prefix="ctx_")
    >>> [(e.reward, e.propensity, e.context) for e in data.events], data.has_users
    ([(1.0, 0.25, (0.1, 1.0)), (0.0, 0.5, (0.2, 0.0))], False)

    A categorical column (``ctx_site``) and a missing number (``ctx_a`` on the second row):

    >>> _ = open(path, "w").write("item_id,timestamp,action,ctx_site,ctx_a\\n"
    ...                           "3,10,click,81ce5f,0.5\\n4,11,click,,\\n")
    >>> data = load_interactions(path, context_prefix="ctx_")
    >>> [e.context for e in data.events], data.categorical_columns, data.context_dim
    ([('81ce5f', 0.5), ('', 0.0)], ['ctx_site'], 1025)
    """
    path = Path(log_path)
    what = "interactions log"
    if context_prefix is not None and not context_prefix:
        raise ValueError("context_prefix must not be empty (it selects the context-feature columns)")
    if rating_threshold is not None and not math.isfinite(float(rating_threshold)):
        raise ValueError(f"rating_threshold {rating_threshold!r} must be a finite number")
    if context_buckets < 1:
        raise ValueError(f"context_buckets must be >= 1, got {context_buckets}")

    def read(fh: TextIO):
        reader = csv.reader(fh)
        header = _read_header(reader, path, what)
        lowered = [h.lower() for h in header]
        columns = {name: lowered.index(name) for name in _KNOWN if name in lowered}
        context_cols = [h for h, low in zip(header, lowered)
                        if context_prefix is not None and h.startswith(context_prefix) and low not in _KNOWN]
        found = f"columns found: {header}"
        missing = [c for c in ("item_id", "timestamp") if c not in columns]
        if "user_id" not in columns and not context_cols:
            missing.append("user_id")
        if missing:
            extra = ""
            if "user_id" in missing and context_prefix is not None:
                extra = f" (no column starts with context prefix {context_prefix!r}, so user_id is required)"
            raise ValueError(f"{what} {path}: missing required column(s) {missing}{extra}; {found}")
        if context_prefix is not None and not context_cols:
            raise ValueError(f"{what} {path}: no column starts with context prefix {context_prefix!r}; {found}")
        if "action" not in columns and "rating" not in columns:
            raise ValueError(f"{what} {path}: needs an 'action' or a 'rating' column; {found}")
        rating_log = "action" not in columns
        if rating_log and rating_threshold is None:
            raise ValueError(f"{what} {path} is a rating log (has 'rating', no 'action'): "
                             f"give a rating threshold (e.g. --rating-threshold 4)")
        if rating_log and rewards is not None:
            raise ValueError(f"{what} {path} is a rating log: a reward mapping does not apply; "
                             f"the reward is rating >= rating threshold")
        if not rating_log and rating_threshold is not None:
            raise ValueError(f"{what} {path} is an action log (has an 'action' column): "
                             f"a rating threshold does not apply; use a reward mapping")
        mapping = {} if rating_log else _effective_rewards(rewards)
        rows = _parse_rows(reader, header, columns, context_cols, mapping, rating_threshold)
        return header, context_cols, mapping, rows

    header, context_cols, mapping, (events, skipped, rows_read, categorical) = _open_csv(path, what, read)
    if not rows_read:
        raise ValueError(f"{what} {path}: no data rows after the header")
    if not events:
        raise ValueError(f"{what} {path}: none of {rows_read} rows could be used; first problems: "
                         + "; ".join(f"line {n}: {r}" for n, r in skipped[:3]))
    events.sort(key=lambda e: e.ts)
    items = load_items(items_path) if items_path else {}
    return LoggedData(source="interactions", events=events, items=items, context_columns=context_cols,
                      skipped=skipped, rewards=mapping, categorical_columns=categorical,
                      context_buckets=context_buckets)


def _parse_rows(reader, header: list[str], columns: dict[str, int], context_cols: list[str],
                mapping: dict[str, float], rating_threshold: float | None):
    width = len(header)
    name_of = {i: name for name, i in columns.items()}
    context_index = [header.index(c) for c in context_cols]
    rating_log = "action" not in columns
    parsed: list[tuple[int, LoggedEvent]] = []
    skipped: list[tuple[int, str]] = []
    ids: dict[str, int] = {}
    rows_read = 0
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        rows_read += 1
        if len(cells) != width:
            skipped.append((line, f"expected {width} fields as in the header, found {len(cells)}"))
            continue
        row = {name_of[i]: cells[i].strip() for i in name_of}
        try:
            event = _parse_row(line, row, cells, context_cols, context_index, mapping, rating_log,
                               rating_threshold)
        except ValueError as exc:
            skipped.append((line, str(exc)))
            continue
        if event.event_id in ids:
            skipped.append((line, f"duplicate event_id {event.event_id!r} (first on line {ids[event.event_id]})"))
            continue
        ids[event.event_id] = line
        parsed.append((line, event))
    if any(e.propensity is not None for _, e in parsed):
        kept = []
        for line, event in parsed:
            if event.propensity is None:
                skipped.append((line, "empty propensity (other rows log one; every row needs it)"))
            else:
                kept.append((line, event))
        parsed = kept
    categorical: list[str] = []
    if context_cols:
        parsed, categorical = _type_context(parsed, context_cols, skipped)
    skipped.sort(key=lambda s: s[0])
    return [e for _, e in parsed], skipped, rows_read, categorical


def _context_number(text: str) -> float | None:
    """The number ``text`` spells (None for a missing value); raises ValueError if none."""
    if text.lower() in _MISSING_CONTEXT:
        return None
    value = float(text)
    return None if math.isnan(value) else value


def _type_context(parsed: list[tuple[int, LoggedEvent]], context_cols: list[str],
                  skipped: list[tuple[int, str]]):
    """Type each context column from the rows kept (their context holds the raw strings) and
    convert the rows: floats for numeric columns, strings for categorical ones. Appends a row
    with an infinite number to ``skipped``; returns the rows kept and the categorical columns."""
    numeric = []
    for j in range(len(context_cols)):
        try:
            for _, event in parsed:
                _context_number(event.context[j])
        except ValueError:
            numeric.append(False)
        else:
            numeric.append(True)
    out = []
    for line, event in parsed:
        values: list[float | str] = []
        bad = None
        for name, is_number, text in zip(context_cols, numeric, event.context):
            if not is_number:
                values.append("" if text.lower() in _MISSING_CONTEXT else text)
                continue
            value = _context_number(text)
            if value is not None and not math.isfinite(value):
                bad = f"{name} {text!r} is not a finite number"
                break
            values.append(0.0 if value is None else value)
        if bad is not None:
            skipped.append((line, bad))
            continue
        out.append((line, dataclasses.replace(event, context=tuple(values))))
    return out, [name for name, is_number in zip(context_cols, numeric) if not is_number]


def _parse_row(line: int, row: dict[str, str], cells: list[str], context_cols: list[str],
               context_index: list[int], mapping: dict[str, float], rating_log: bool,
               rating_threshold: float | None) -> LoggedEvent:
    item = normalise_item_id(row["item_id"])
    if not item:
        raise ValueError("empty item_id")
    user = row.get("user_id", "")
    if not user and not context_cols:
        raise ValueError("empty user_id")
    if not row["timestamp"]:
        raise ValueError("empty timestamp")
    ts = parse_timestamp(row["timestamp"])
    rating = None
    if "rating" in row and (row["rating"] or rating_log):
        if not row["rating"]:
            raise ValueError("empty rating")
        rating = _number(row, "rating")
    if rating_log:
        action, reward = "rating", 1.0 if rating >= rating_threshold else 0.0
    else:
        raw = row["action"].lower()
        if not raw:
            raise ValueError("empty action")
        action = ACTION_ALIASES.get(raw, raw)
        if action not in mapping:
            raise ValueError(_unknown_action(raw, mapping))
        reward = mapping[action]
    propensity = None
    if row.get("propensity"):
        propensity = _number(row, "propensity")
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"propensity {row['propensity']!r} is outside (0, 1]")
    # the raw strings; typed per column once every row is read (_type_context)
    context = tuple(cells[i].strip() for i in context_index) if context_cols else None
    event_id = f"interactions-{line}"
    if "event_id" in row:
        if not row["event_id"]:
            raise ValueError("empty event_id")
        event_id = row["event_id"]
    return LoggedEvent(event_id=event_id, user_id=user, item_id=item, ts=ts, action=action,
                       reward=reward, propensity=propensity, context=context, rating=rating)


def _first(row: dict[str, str | None], names: Iterable[str]) -> str:
    for name in names:
        value = (row.get(name) or "").strip()
        if value.lower() not in _NULL:
            return value
    return ""


def load_items(path: str | Path) -> dict[str, ItemMeta]:
    """Item metadata from a CSV with ``item_id`` and any of ``category``, ``brand`` or ``brand_id``,
    ``seller`` or ``seller_id``, and ``title`` (names case-insensitive; UTF-8 or GB18030).

    An empty or ``null`` category, brand or seller means none; when both ``brand`` and
    ``brand_id`` are present, ``brand`` wins unless empty (the same for seller). Rows without an
    item id are ignored; a repeated item id keeps its last row. Tmall product files
    (``item_id,title,pict_url,category,brand_id,seller_id``) are read as they are.

    Parameters
    ----------
    path
        The item CSV.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "items.csv")
    >>> _ = open(path, "w").write("item_id,category,brand_id,seller_id\\n7,2-7,null,s1\\n")
    >>> load_items(path)
    {'7': ItemMeta(item_id='7', category='2-7', brand='', seller='s1', title='')}
    """
    path = Path(path)
    what = "items file"

    def read(fh: TextIO) -> dict[str, ItemMeta]:
        reader = csv.reader(fh)
        header = _read_header(reader, path, what)
        lowered = [h.lower() for h in header]
        if "item_id" not in lowered:
            raise ValueError(f"{what} {path}: missing required column 'item_id'; columns found: {header}")
        out: dict[str, ItemMeta] = {}
        for cells in reader:
            row = dict(zip(lowered, cells))
            item = normalise_item_id(row.get("item_id") or "")
            if not item:
                continue
            out[item] = ItemMeta(item_id=item, category=_first(row, ["category"]),
                                 brand=_first(row, ["brand", "brand_id"]),
                                 seller=_first(row, ["seller", "seller_id"]),
                                 title=(row.get("title") or "").strip())
        return out

    return _open_csv(path, what, read)
