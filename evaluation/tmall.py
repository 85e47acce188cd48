"""Loader for the Tmall recommendation log (Tianchi data set 140281) and files in its format.

Two shapes are accepted:

* the sample's CSV: header ``item_id,user_id,action,vtime`` (columns in any order), GB18030 or UTF-8;
* the full data set's parts: no header, fields separated by ``\\x01`` in the order
  ``item_id, user_id, action, vtime``.

Ids lose their ``i``/``u`` prefixes (``i161`` → ``161``, as in the product file), ``alipay``
becomes ``purchase``, and ``vtime`` (``2014/9/18 15:03``; seconds and ISO dashes also accepted)
becomes epoch seconds, naive times read as UTC. Rows that cannot be parsed are collected with
their line number and reason instead of stopping the load; a file with nothing parseable, or a
missing file, raises :class:`TmallFormatError` / :class:`FileNotFoundError` with a clear message.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
>>> _ = open(path, "w").write("item_id,user_id,action,vtime\\ni161,u2625,alipay,2014/9/18 15:03\\ni1,u2,jump,2014/9/1 0:00\\n")
>>> log = load_tmall_log(path)
>>> log.actions[0].item_id, log.actions[0].user_id, log.actions[0].action, log.actions[0].ts
('161', '2625', 'purchase', 1411052580.0)
>>> log.bad_rows[0].line, log.bad_rows[0].reason
(3, "unknown action 'jump' (expected one of click, collect, cart, purchase, alipay)")
"""

from __future__ import annotations

import calendar
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from memento.encoder import normalise_item_id
from memento.schemas import ACTION_ALIASES, ACTIONS, Action

__all__ = ["TmallFormatError", "BadRow", "TmallLog", "load_tmall_log", "iter_tmall_log",
           "normalise_user_id", "parse_vtime", "LOG_COLUMNS"]

log = logging.getLogger(__name__)

LOG_COLUMNS = ("item_id", "user_id", "action", "vtime")
_FIELD_SEPARATOR = "\x01"
_VTIME = re.compile(r"^\s*(\d{4})[/-](\d{1,2})[/-](\d{1,2})(?:[ T](\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:\.\d+)?)?)?\s*$")


class TmallFormatError(ValueError):
    """A Tmall log could not be read at all; the message says why."""


@dataclass(frozen=True)
class BadRow:
    """A row that was skipped: 1-based line number in the file, why, and its text."""

    line: int
    reason: str
    text: str


@dataclass
class TmallLog:
    """The parsed log: actions in time order, the rows that were skipped, and counts."""

    path: str
    actions: list[Action]
    bad_rows: list[BadRow] = field(default_factory=list)
    rows_read: int = 0
    shape: str = "csv"

    def action_counts(self) -> dict[str, int]:
        return dict(Counter(a.action for a in self.actions))

    def summary(self, max_bad: int = 10) -> str:
        """One line of counts, then up to ``max_bad`` skipped rows with line numbers and reasons."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.action_counts().items()))
        lines = [f"{self.path}: parsed {len(self.actions)} of {self.rows_read} rows ({self.shape}); "
                 f"skipped {len(self.bad_rows)}; actions: {counts or 'none'}"]
        for bad in self.bad_rows[:max_bad]:
            lines.append(f"  line {bad.line}: {bad.reason}: {bad.text[:80]!r}")
        if len(self.bad_rows) > max_bad:
            lines.append(f"  ... and {len(self.bad_rows) - max_bad} more skipped rows")
        return "\n".join(lines)


def normalise_user_id(raw: str) -> str:
    """Tmall logs prefix user ids with ``u``; use the bare id (``u2625`` → ``2625``)."""
    raw = raw.strip()
    return raw[1:] if len(raw) > 1 and raw[0] == "u" and raw[1:].isdigit() else raw


def parse_vtime(text: str) -> float:
    """``2014/9/18 15:03`` (also with seconds, dashes or a bare date) → epoch seconds, as UTC.

    >>> parse_vtime("2014/9/1 0:08")
    1409530080.0
    """
    m = _VTIME.match(text)
    if m is None:
        raise ValueError(f"unparseable vtime {text!r} (expected like '2014/9/18 15:03')")
    year, month, day, hour, minute, second = (int(g) if g else 0 for g in m.groups())
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour < 24 and minute < 60 and second < 61):
        raise ValueError(f"vtime {text!r} is not a valid date and time")
    return float(calendar.timegm((year, month, day, hour, minute, second)))


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("gb18030", errors="replace")


def _split(line: str, separator: str) -> list[str]:
    if separator == ",":
        # Log fields never contain commas or quotes; strip quotes a spreadsheet may have added.
        return [f.strip().strip('"') for f in line.split(",")]
    return [f.strip() for f in line.split(separator)]


def iter_tmall_log(path: str | Path) -> Iterator[tuple[int, Action | BadRow]]:
    """Stream ``(line number, Action or BadRow)`` in file order, without loading the file.

    Event ids are ``"<file name>:<line>"``, so the same file always yields the same ids.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Tmall log {path} does not exist")
    if path.is_dir():
        raise TmallFormatError(f"Tmall log {path} is a directory, not a file")
    name = path.name
    columns: dict[str, int] = {c: i for i, c in enumerate(LOG_COLUMNS)}
    separator: str | None = None
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = _decode(raw).lstrip("\ufeff").rstrip("\r\n")
            if not line.strip():
                continue
            if separator is None:
                separator = _FIELD_SEPARATOR if _FIELD_SEPARATOR in line else ","
                header = [f.lower() for f in _split(line, separator)]
                if "item_id" in header or "user_id" in header:
                    missing = [c for c in LOG_COLUMNS if c not in header]
                    if missing:
                        raise TmallFormatError(f"{path}: header {header} lacks columns {missing}")
                    columns = {c: header.index(c) for c in LOG_COLUMNS}
                    continue
            yield number, _parse_row(number, line, separator, columns, name)


def _parse_row(number: int, line: str, separator: str, columns: dict[str, int], name: str) -> Action | BadRow:
    fields_ = _split(line, separator)
    width = max(columns.values()) + 1
    if len(fields_) < width:
        return BadRow(number, f"expected {width} fields separated by {separator!r}, found {len(fields_)}", line)
    item = normalise_item_id(fields_[columns["item_id"]])
    user = normalise_user_id(fields_[columns["user_id"]])
    raw_action = fields_[columns["action"]].lower()
    if not item:
        return BadRow(number, "empty item_id", line)
    if not user:
        return BadRow(number, "empty user_id", line)
    action = ACTION_ALIASES.get(raw_action, raw_action)
    if action not in ACTIONS:
        return BadRow(number, f"unknown action {raw_action!r} (expected one of "
                              f"{', '.join(ACTIONS)}, alipay)", line)
    try:
        ts = parse_vtime(fields_[columns["vtime"]])
    except ValueError as exc:
        return BadRow(number, str(exc), line)
    return Action(event_id=f"{name}:{number}", user_id=user, item_id=item, action=action, ts=ts)


def load_tmall_log(path: str | Path, max_rows: int | None = None) -> TmallLog:
    """Parse a whole log (or its first ``max_rows`` data rows); actions sorted by time (ties
    keep file order). Logs a warning summary when rows were skipped."""
    actions: list[Action] = []
    bad: list[BadRow] = []
    rows = 0
    for _, parsed in iter_tmall_log(path):
        if max_rows is not None and rows >= max_rows:
            break
        rows += 1
        if isinstance(parsed, BadRow):
            bad.append(parsed)
        else:
            actions.append(parsed)
    if rows and bad and not actions:
        raise TmallFormatError(f"{path}: none of {rows} rows could be parsed; first problems: "
                               + "; ".join(f"line {b.line}: {b.reason}" for b in bad[:3]))
    if not rows:
        raise TmallFormatError(f"{path}: no data rows (expected {','.join(LOG_COLUMNS)} lines)")
    actions.sort(key=lambda a: a.ts)
    result = TmallLog(path=str(path), actions=actions, bad_rows=bad, rows_read=rows, shape=_detect_shape(path))
    if bad:
        log.warning("%s", result.summary())
    return result


def _detect_shape(path: str | Path) -> str:
    with Path(path).open("rb") as fh:
        first = fh.readline()
    return "\\x01-separated" if _FIELD_SEPARATOR.encode() in first else "csv"
