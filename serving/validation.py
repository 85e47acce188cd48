"""Validation of HTTP request bodies, with errors that name the offending field.

:class:`RequestError` carries the HTTP status: 400 when the body is not a JSON object at all,
422 when a field is missing, has the wrong type or is out of range.

>>> parse_recommend({"user_id": "u1", "k": 3}).k
3
>>> parse_recommend({"user_id": "u1", "k": 0})
Traceback (most recent call last):
...
serving.validation.RequestError: field 'k' must be an integer in 1..100, got 0
>>> parse_recommend({"context": {}}).user_id
Traceback (most recent call last):
...
serving.validation.RequestError: field 'user_id' is required
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from memento.encoder import HistoryEntry
from memento.schemas import (ACTION_ALIASES, ACTIONS, MAX_STRING_LENGTH, Action, SchemaError, finite_float,
                             future_time_problem, load_json, short_repr)

__all__ = ["RequestError", "RecommendRequest", "parse_json", "parse_recommend", "parse_feedback",
           "MAX_K", "MAX_RECENT_ITEMS"]

MAX_K = 100
MAX_RECENT_ITEMS = 1000
MAX_ID_LENGTH = MAX_STRING_LENGTH  # what every consumer of the records these ids go into accepts


class RequestError(ValueError):
    """Bad input; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class RecommendRequest:
    user_id: str
    ts: float
    recent_items: list[HistoryEntry]
    k: int
    explain: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 :class:`RequestError`."""
    if not raw:
        raise RequestError("request body is empty; expected a JSON object", 400)
    try:
        data = load_json(raw, "request body")
    except SchemaError as exc:
        raise RequestError(str(exc), 400) from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {type(data).__name__}", 400)
    return data


def _string(data: dict, name: str, where: str = "", required: bool = True) -> str | None:
    field = f"{where}{name}"
    if name not in data or data[name] is None:
        if required:
            raise RequestError(f"field {field!r} is required")
        return None
    value = data[name]
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"field {field!r} must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise RequestError(f"field {field!r} is longer than {MAX_ID_LENGTH} characters")
    return value


def _number(data: dict, name: str, where: str = "", default: float | None = None) -> float:
    field = f"{where}{name}"
    if name not in data or data[name] is None:
        if default is None:
            raise RequestError(f"field {field!r} is required")
        return default
    number = finite_float(data[name])
    if number is None:
        raise RequestError(f"field {field!r} must be a finite number, got {short_repr(data[name])}")
    return number


def _action(data: dict, where: str) -> str:
    raw = _string(data, "action", where)
    action = ACTION_ALIASES.get(raw.lower(), raw.lower())
    if action not in ACTIONS:
        raise RequestError(f"field '{where}action' must be one of {list(ACTIONS)}, got {raw!r}")
    return action


def _event_time(data: dict, now: float | None, max_future_skew_s: float) -> float:
    now = time.time() if now is None else now
    ts = _number(data, "ts", default=now)
    problem = future_time_problem(ts, now, max_future_skew_s)
    if problem is not None:
        raise RequestError(problem)
    return ts


def parse_recommend(data: dict[str, Any], now: float | None = None,
                    max_future_skew_s: float = math.inf) -> RecommendRequest:
    """Validate a ``POST /v1/recommend`` body (unknown fields are ignored); ``ts`` may lie at
    most ``max_future_skew_s`` ahead of ``now`` (``Settings.max_future_skew_s``)."""
    user_id = _string(data, "user_id")
    ts = _event_time(data, now, max_future_skew_s)
    k = data.get("k", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise RequestError(f"field 'k' must be an integer in 1..{MAX_K}, got {short_repr(k)}")
    explain = data.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(f"field 'explain' must be a boolean, got {explain!r}")
    context = data.get("context")
    recent: list[HistoryEntry] = []
    if context is not None:
        if not isinstance(context, dict):
            raise RequestError(f"field 'context' must be an object, got {type(context).__name__}")
        items = context.get("recent_items")
        if items is not None:
            if not isinstance(items, list):
                raise RequestError("field 'context.recent_items' must be a list")
            if len(items) > MAX_RECENT_ITEMS:
                raise RequestError(f"field 'context.recent_items' has {len(items)} entries; at most "
                                   f"{MAX_RECENT_ITEMS} are accepted")
            for i, item in enumerate(items):
                where = f"context.recent_items[{i}]."
                if not isinstance(item, dict):
                    raise RequestError(f"field 'context.recent_items[{i}]' must be an object")
                recent.append(HistoryEntry(_string(item, "item_id", where), _action(item, where),
                                           _number(item, "ts", where, default=ts)))
    return RecommendRequest(user_id=user_id, ts=ts, recent_items=recent, k=k, explain=explain)


def parse_feedback(data: dict[str, Any], now: float | None = None, max_future_skew_s: float = math.inf) -> Action:
    """Validate a ``POST /v1/feedback`` body into the :class:`Action` to publish (``ts`` as in
    :func:`parse_recommend`)."""
    user_id = _string(data, "user_id")
    item_id = _string(data, "item_id")
    action = _action(data, "")
    ts = _event_time(data, now, max_future_skew_s)
    request_id = _string(data, "request_id", required=False)
    event_id = _string(data, "event_id", required=False) or uuid.uuid4().hex
    return Action(event_id=event_id, user_id=user_id, item_id=item_id, action=action, ts=ts,
                  request_id=request_id)
