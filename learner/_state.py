"""Saving and restoring a replay-buffer part's state without pickle.

A part's state is a flat mapping of names to numpy arrays (written to ``<name>.npz``) and
JSON-serialisable scalars (written to ``<name>.json``). Loading uses
``np.load(allow_pickle=False)``, so a state file can never execute code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from memento.atomic import atomic_file, write_atomic

__all__ = ["save_state", "load_state"]


def save_state(directory: str | Path, name: str, arrays: dict[str, np.ndarray],
               meta: dict[str, Any]) -> None:
    """Write ``arrays`` to ``directory/name.npz`` and ``meta`` to ``directory/name.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"{name}: array {key!r} has dtype object, which cannot be saved "
                            f"without pickle")
    with atomic_file(directory / f"{name}.npz") as fh:
        np.savez(fh, **arrays)
    write_atomic(directory / f"{name}.json", json.dumps(meta).encode())


def load_state(directory: str | Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_state` wrote; ``FileNotFoundError`` names the missing file."""
    directory = Path(directory)
    npz_path, json_path = directory / f"{name}.npz", directory / f"{name}.json"
    for path in (npz_path, json_path):
        if not path.exists():
            raise FileNotFoundError(f"replay buffer state file {path} does not exist")
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(json_path.read_text())
    return arrays, meta
