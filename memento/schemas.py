"""Event schemas: the one definition of every message on memento-stream's Kafka topics.

Each message is a JSON object. :func:`decode` validates bytes against a schema and raises
:class:`SchemaError` with a reason naming the offending field; producers use :func:`encode`.

>>> a = Action(event_id="e1", user_id="u1", item_id="i9", action="click", ts=10.0)
>>> decode(Action, encode(a)) == a
True
>>> decode(Action, b'{"event_id": "e1"}')
Traceback (most recent call last):
...
memento.schemas.SchemaError: Action: missing field 'user_id'
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "ACTIONS", "ACTION_ALIASES", "SchemaError", "Action", "Recommendation", "Transition", "Case",
    "CheckpointAnnouncement", "DeadLetter", "ORGANIC_CASE_SOURCE", "organic_case_id", "encode", "decode", "from_dict", "to_dict",
    "load_json", "finite_float", "short_repr", "future_time_problem", "MAX_INT", "MAX_STRING_LENGTH", "MAX_INLINE_CHECKPOINT_BYTES", "MAX_CHECKPOINT_RECORD_BYTES", "MAX_ORIGINAL_BYTES",
    "MAX_VECTOR_LENGTH", "pack_vector", "as_packed", "unpack_vector", "packed_length",
]

ACTIONS = ("click", "collect", "cart", "purchase")
# Source-specific spellings accepted on input and normalised (Tmall logs "alipay" for purchase).
ACTION_ALIASES = {"alipay": "purchase", "buy": "purchase", "fav": "collect"}


class SchemaError(ValueError):
    """A message does not match its schema; ``str(err)`` names the schema and the field."""


MAX_INT = 2 ** 63 - 1  # integer fields are 64-bit, as Kafka's and every consumer's are
MAX_STRING_LENGTH = 256  # ids and names: a user's state holds hundreds of them, in one table value
MAX_ORIGINAL_BYTES = 64 * 1024  # of a dead-lettered message kept in its DeadLetter
MAX_VECTOR_LENGTH = 1 << 16  # numbers in one vector field (a state is tens to hundreds)


def _base64_length(n_bytes: int) -> int:
    """Characters of the base64 text of ``n_bytes`` bytes (padded)."""
    return 4 * -(-n_bytes // 3)


def pack_vector(values) -> str:
    """A vector as it travels: its float32 values, little-endian, base64. Every consumer computes
    in float32; a JSON list of the same values is about four times longer and far slower to write
    and read (docs/streams.md).

    >>> pack_vector([1.0, -0.5])
    'AACAPwAAAL8='
    >>> unpack_vector(pack_vector([1.0, -0.5]))
    [1.0, -0.5]
    """
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def unpack_vector(text: str, where: str = "vector") -> list[float]:
    """The values of :func:`pack_vector`'s ``text``; :class:`SchemaError` naming ``where`` when it
    is not base64 of whole float32 values, is longer than :data:`MAX_VECTOR_LENGTH` or holds a
    value that is not finite.

    >>> unpack_vector("AADAfw==", "Case: field 'state'")
    Traceback (most recent call last):
    ...
    memento.schemas.SchemaError: Case: field 'state' must hold finite numbers, got nan
    """
    return _packed_values(text, where).astype(np.float64).tolist()


def _packed_values(text: str, where: str) -> np.ndarray:
    """:func:`unpack_vector`'s checks; the float32 values (a read-only view of the decoded bytes)."""
    if len(text) > _base64_length(4 * MAX_VECTOR_LENGTH):
        raise SchemaError(f"{where} holds more than {MAX_VECTOR_LENGTH} numbers")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SchemaError(f"{where} must be a list of numbers or base64 float32, got {short_repr(text)}") from None
    if len(raw) % 4:
        raise SchemaError(f"{where} must be a list of numbers or base64 float32, got {len(raw)} bytes")
    values = np.frombuffer(raw, dtype="<f4")
    finite = np.isfinite(values)
    if not finite.all():
        raise SchemaError(f"{where} must hold finite numbers, got {float(values[~finite][0])}")
    return values


def as_packed(vector) -> str:
    """``vector`` as :func:`pack_vector` text; text (packed already) is kept as it is.

    >>> as_packed([1.0, -0.5]), as_packed("AACAPwAAAL8=")
    ('AACAPwAAAL8=', 'AACAPwAAAL8=')
    """
    return vector if vector.__class__ is str else pack_vector(vector)


def packed_length(text: str) -> int:
    """How many numbers the packed vector ``text`` (:func:`pack_vector`'s, valid base64) holds.

    >>> packed_length(pack_vector([1.0, 2.0, 3.0])), packed_length(pack_vector([]))
    (3, 0)
    """
    return (3 * len(text) // 4 - text.endswith("=") - text.endswith("==")) // 4


def load_json(raw: bytes | str, what: str) -> Any:
    """Parse a JSON document from outside (a Kafka record, a request body); every way it can
    fail is a :class:`SchemaError` naming ``what``: bad UTF-8 or syntax, nesting deeper than the
    parser's recursion allows, an integer of more digits than Python converts.

    >>> load_json(b"[" * 100_000, "Case")
    Traceback (most recent call last):
    ...
    memento.schemas.SchemaError: Case: not valid JSON (nested too deeply)
    >>> load_json("1" * 5000, "Case")
    Traceback (most recent call last):
    ...
    memento.schemas.SchemaError: Case: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit)
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise SchemaError(f"{what}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and the digit limit are ValueErrors
        raise SchemaError(f"{what}: not valid JSON ({exc})") from None


def future_time_problem(ts: float, now: float, max_future_skew_s: float) -> str | None:
    """Why the event time ``ts`` (epoch seconds) cannot be taken, read at wall time ``now``: it
    lies more than ``max_future_skew_s`` ahead (``Settings.max_future_skew_s``); None when it can.

    >>> future_time_problem(1_700_000_000_000.0, now=1_700_000_000.0, max_future_skew_s=3600)
    "field 'ts' is 1698300000000 s ahead of this process's clock (more than max_future_skew_s = 3600; milliseconds?)"
    >>> future_time_problem(1000.0, now=1_700_000_000.0, max_future_skew_s=3600) is None   # the past is fine
    True
    """
    ahead = ts - now
    if ahead <= max_future_skew_s:
        return None
    return (f"field 'ts' is {ahead:.0f} s ahead of this process's clock (more than max_future_skew_s = "
            f"{max_future_skew_s:g}{'; milliseconds?' if ts > 1e11 else ''})")


def finite_float(value: Any) -> float | None:
    """``value`` as a float if it is a finite JSON number (not a bool, not an integer too large
    for a float), else None.

    >>> finite_float(3), finite_float(10 ** 400), finite_float(float("nan")), finite_float(True)
    (3.0, None, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


@dataclass(frozen=True)
class Action:
    """A user's action on an item, at event time ``ts`` (epoch seconds)."""

    event_id: str
    user_id: str
    item_id: str
    action: str
    ts: float
    request_id: str | None = None

    def validate(self) -> None:
        if self.action not in ACTIONS:
            raise SchemaError(f"Action: field 'action' must be one of {list(ACTIONS)}, "
                              f"got {self.action!r}")


@dataclass(frozen=True)
class Recommendation:
    """What serving answered: the chosen case, its propensity μ(c|s) and the state s it saw;
    ``prior`` names the retrieval prior the case was drawn under when μ mixes several
    (:mod:`memento.priors`; None otherwise)."""

    request_id: str
    user_id: str
    item_id: str
    case_id: str
    propensity: float
    policy_version: int
    ts: float
    state: list[float]
    case_features: list[float]
    served_at: float = 0.0
    prior: str | None = None

    def validate(self) -> None:
        if not 0.0 < self.propensity <= 1.0:
            raise SchemaError(f"Recommendation: field 'propensity' must be in (0, 1], "
                              f"got {self.propensity}")


@dataclass(frozen=True)
class Transition:
    """(s, c, μ(c|s), r, s′, done) for one recommendation; ``transition_id`` = request id;
    ``prior``: the recommendation's."""

    transition_id: str
    user_id: str
    state: list[float]
    case_id: str
    case_features: list[float]
    item_id: str
    propensity: float
    reward: float
    next_state: list[float]
    done: bool
    policy_version: int
    ts: float
    closed_at: float = 0.0
    prior: str | None = None


# The source of a case a user's own action became (:func:`organic_case_id`); a served
# recommendation's case has source "recommendation".
ORGANIC_CASE_SOURCE = "action"


def organic_case_id(event_id: str) -> str:
    """The id of the case a user's own action becomes (state before it, item, its weight).

    >>> organic_case_id("e1")
    'act:e1'
    """
    return f"act:{event_id}"


@dataclass(frozen=True)
class Case:
    """A case c = (state, item, outcome) of the case bank. ``item_vec`` carries the item's
    features so that every consumer scores the case identically."""

    case_id: str
    state: list[float]
    item_id: str
    item_vec: list[float]
    outcome: float
    ts: float
    source: str = "recommendation"


# Checkpoints up to this size travel inside their announcement (base64 in ``data``), so serving
# needs no volume shared with the learner; a larger one is announced by file only.
MAX_INLINE_CHECKPOINT_BYTES = 8 << 20
# The largest checkpoint announcement: the inline bytes as base64 (4/3 of them) and the rest.
MAX_CHECKPOINT_RECORD_BYTES = 12 << 20


@dataclass(frozen=True)
class CheckpointAnnouncement:
    """A new policy version: a safetensors file and its sha256, and the file's bytes (base64)
    when it is at most :data:`MAX_INLINE_CHECKPOINT_BYTES`."""

    version: int
    path: str
    sha256: str
    created_at: float
    step: int
    state_dim: int
    item_dim: int
    metrics: dict[str, float] = field(default_factory=dict)
    signature: str | None = None  # HMAC of version, file name and sha256 (memento.checkpoint.sign_announcement)
    data: str | None = None  # the file's bytes, base64 (verified against sha256 before it is parsed)


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be processed, with the reason and its original bytes."""

    source_topic: str
    partition: int
    offset: int
    reason: str
    original: str  # original bytes, decoded as UTF-8 with backslash escapes for invalid bytes
    ts: float


# string fields with another bound than MAX_STRING_LENGTH (None: none)
_STRING_LIMITS = {("CheckpointAnnouncement", "path"): 4096,
                  ("CheckpointAnnouncement", "data"): _base64_length(MAX_INLINE_CHECKPOINT_BYTES), ("DeadLetter", "reason"): None,
                  ("DeadLetter", "original"): None}

T = TypeVar("T")
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``hint``, whether it allows None): ``X | None`` and ``Optional[X]``
    give (X, True), any other hint (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def _check(cls: type, name: str, hint: Any, value: Any) -> Any:
    where = f"{cls.__name__}: field {name!r}"
    hint, optional = _optional(hint)
    if optional and value is None:
        return None
    origin = typing.get_origin(hint)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise SchemaError(f"{where} must be a non-empty string, got {short_repr(value)}")
        limit = _STRING_LIMITS.get((cls.__name__, name), MAX_STRING_LENGTH)
        if limit is not None and len(value) > limit:
            raise SchemaError(f"{where} is {len(value)} characters long, more than {limit}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where} must be a boolean, got {short_repr(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or not -MAX_INT <= value <= MAX_INT:
            raise SchemaError(f"{where} must be a 64-bit integer, got {short_repr(value)}")
        return value
    if hint is float:
        number = finite_float(value)
        if number is None:
            raise SchemaError(f"{where} must be a finite number, got {short_repr(value)}")
        return number
    if origin is list:
        if isinstance(value, str):  # packed (pack_vector): how encode writes vectors
            return unpack_vector(value, where)
        if not isinstance(value, list):
            raise SchemaError(f"{where} must be a list of numbers")
        if len(value) > MAX_VECTOR_LENGTH:
            raise SchemaError(f"{where} holds more than {MAX_VECTOR_LENGTH} numbers")
        out = []
        for v in value:
            number = finite_float(v)
            if number is None:
                raise SchemaError(f"{where} must hold finite numbers, got {short_repr(v)}")
            out.append(number)
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be an object")
        out = {}
        for k, v in value.items():  # dict[str, float]: the only mapping in the schemas
            number = finite_float(v)
            if number is None:
                raise SchemaError(f"{where} must map names to finite numbers, got {k!r}: {short_repr(v)}")
            out[k] = number
        return out
    return value


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a reason names the value, not a megabyte of it)."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond the digit limit of repr
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fast_check(cls: type, name: str, hint: Any):
    """``_check(cls, name, hint, value)`` as a function of the value, that returns at once the
    values it takes as they are (the common case: exactly a str within its limit, a finite float,
    a 64-bit int, a bool, None where allowed) and leaves every other value, and every error and
    its message, to :func:`_check`."""
    inner, optional = _optional(hint)

    def slow(value: Any) -> Any:
        return _check(cls, name, hint, value)

    if inner is str:
        limit = _STRING_LIMITS.get((cls.__name__, name), MAX_STRING_LENGTH)
        limit = sys.maxsize if limit is None else limit

        def fast(value: Any) -> Any:
            if value.__class__ is str and 0 < len(value) <= limit:
                return value
            return None if optional and value is None else slow(value)
    elif inner is float:
        def fast(value: Any) -> Any:
            if value.__class__ is float and value - value == 0.0:  # finite
                return value
            return None if optional and value is None else slow(value)
    elif inner is int:
        def fast(value: Any) -> Any:
            if value.__class__ is int and -MAX_INT <= value <= MAX_INT:
                return value
            return None if optional and value is None else slow(value)
    elif inner is bool:
        def fast(value: Any) -> Any:
            if value.__class__ is bool:
                return value
            return None if optional and value is None else slow(value)
    else:
        return slow
    return fast


def _packed_check(cls: type, name: str, hint: Any):
    """A vector field's check that leaves the vector packed: base64 text is checked as
    :func:`unpack_vector` checks it and kept as it is; a list of numbers is checked as
    :func:`_check` does and packed (:func:`pack_vector`)."""
    where = f"{cls.__name__}: field {name!r}"

    def check(value: Any) -> Any:
        if value.__class__ is str:
            _packed_values(value, where)
            return value
        return pack_vector(_check(cls, name, hint, value))
    return check


_PLANS: dict[tuple[type, bool], tuple[tuple[str, Any, bool], ...]] = {}


def _plan(cls: type, packed: bool = False) -> tuple[tuple[str, Any, bool], ...]:
    """Per field of ``cls``: its name, its checker (:func:`_fast_check`, or :func:`_packed_check`
    for a vector field when ``packed``), whether it is required."""
    plan = _PLANS.get((cls, packed))
    if plan is None:
        hints = _hints(cls)
        vectors = _vector_fields(cls) if packed else ()
        plan = _PLANS[(cls, packed)] = tuple(
            (f.name, (_packed_check if f.name in vectors else _fast_check)(cls, f.name, hints[f.name]),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls))
    return plan


def from_dict(cls: type[T], data: Any, *, packed: bool = False) -> T:
    """Build and validate a schema object from a decoded JSON object; with ``packed``, its vector
    fields hold :func:`pack_vector` text instead of lists (for a reader that only passes them on:
    :func:`encode` writes such text as it is)."""
    if not isinstance(data, dict):
        raise SchemaError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    kwargs = {}
    for name, check, required in _plan(cls, packed):
        if name in data:
            value = data[name]
            if cls is Action and name == "action" and isinstance(value, str):
                value = ACTION_ALIASES.get(value.lower(), value.lower())
            kwargs[name] = check(value)
        elif required:
            raise SchemaError(f"{cls.__name__}: missing field {name!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


_VECTOR_FIELDS: dict[type, tuple[str, ...]] = {}


def _vector_fields(cls: type) -> tuple[str, ...]:
    names = _VECTOR_FIELDS.get(cls)
    if names is None:
        names = _VECTOR_FIELDS[cls] = tuple(
            name for name, hint in _hints(cls).items() if typing.get_origin(hint) is list)
    return names


def _fields(obj: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name in _vector_fields(type(obj)):
        out[name] = as_packed(out[name])  # text is packed already (from_dict's packed vectors)
    return out


def encode(obj: Any) -> bytes:
    """Compact JSON of a schema record: ``to_dict``'s document, without its deep copy, with its
    vectors packed (:func:`pack_vector`; :func:`decode` reads them, and lists of numbers too; a
    vector that is text already, as ``decode(..., packed=True)`` leaves it, is written as it is).

    >>> c = Case("c1", [0.5, 0.25], "i1", [1.0, 0.0], 1.0, 0.0)
    >>> json.loads(encode(c))["state"], decode(Case, encode(c)) == c
    ('AAAAPwAAgD4=', True)
    >>> decode(Case, encode(c), packed=True).state, encode(decode(Case, encode(c), packed=True)) == encode(c)
    ('AAAAPwAAgD4=', True)
    """
    return json.dumps(_fields(obj), separators=(",", ":"), allow_nan=False, default=_fields).encode()


def decode(cls: type[T], raw: bytes | str, *, packed: bool = False) -> T:
    """Parse and validate ``raw``; raises :class:`SchemaError` naming what is wrong (and nothing
    else, whatever the bytes). With ``packed``, vector fields stay :func:`pack_vector` text
    (checked, not converted; :func:`from_dict`)."""
    return from_dict(cls, load_json(raw, cls.__name__), packed=packed)
