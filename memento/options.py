"""Process options as dataclasses, and their command-line flags generated from the fields.

Every process's tunable options are a frozen dataclass whose fields say their default and help
(:func:`option`); :func:`add_dataclass_options` gives each field a ``--flag`` and
:func:`options_from_args` builds the dataclass back from the flags given, so a default is
written once, in the field, and validated once, in the dataclass.

>>> import argparse
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo:
...     rate: float = option(0.5, "how fast")
...     mode: str = option("a", "which mode", choices=("a", "b"))
...     limit: int | None = option(None, "an optional cap")
>>> p = argparse.ArgumentParser(); add_dataclass_options(p, Demo, "demo")
>>> options_from_args(Demo, p.parse_args(["--rate", "2", "--limit", "none"]))
Demo(rate=2.0, mode='a', limit=None)
>>> options_from_args(Demo, p.parse_args([]), mode="b")
Demo(rate=0.5, mode='b', limit=None)
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields
from typing import Any, Sequence

__all__ = ["option", "add_dataclass_options", "options_from_args", "log_level"]


def option(default: Any, help: str, *, choices: Sequence[str] | None = None):
    """A dataclass field with its flag's ``help`` (and ``choices``, for a string field)."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off", "") else kind(text)
    return parse


def add_dataclass_options(parser: argparse.ArgumentParser, cls, title: str, exclude: Sequence[str] = ()) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (help from the field's metadata); unset
    flags are absent from the parsed namespace, so :func:`options_from_args` keeps defaults."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else "required"
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        type_name = str(f.type)
        if type_name == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        kind = int if type_name.startswith("int") else float if type_name.startswith("float") else str
        parse = _parse_optional(kind) if "None" in type_name else kind
        group.add_argument(flag, dest=f.name, type=parse, default=argparse.SUPPRESS, help=help_text,
                           choices=f.metadata.get("choices"))


def options_from_args(cls, args: argparse.Namespace, **fallback):
    """Build ``cls`` from the flags that were given (unset flags are absent from ``args``);
    ``fallback`` fills fields whose flag was not given."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    for key, value in fallback.items():
        values.setdefault(key, value)
    return cls(**values)


def log_level(args: argparse.Namespace | None = None) -> str:
    """The log level of a process: ``memento --log-level`` when it was parsed, else the
    environment's ``MEMENTO_LOG_LEVEL`` (how a parent hands it to a child started as
    ``python -m ...``), else INFO.

    >>> log_level(argparse.Namespace(log_level="debug"))
    'DEBUG'
    """
    import os

    given = getattr(args, "log_level", None) if args is not None else None
    return (given or os.environ.get("MEMENTO_LOG_LEVEL") or "INFO").upper()
