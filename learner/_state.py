"""Saving and restoring a replay-buffer part's state without pickle.

A part's state is a flat mapping of names to numpy arrays (written to ``<name>.npz``) and
JSON-serialisable scalars (written to ``<name>.json``). Loading uses
``np.load(allow_pickle=False)``, so a state file can never execute code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["save_state", "load_state", "write_atomic"]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` durably: a synced temporary file renamed over it, then the
    directory synced (so the rename survives a power loss too)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_state(directory: str | Path, name: str, arrays: dict[str, np.ndarray],
               meta: dict[str, Any]) -> None:
    """Write ``arrays`` to ``directory/name.npz`` and ``meta`` to ``directory/name.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"{name}: array {key!r} has dtype object, which cannot be saved "
                            f"without pickle")
    npz_tmp = directory / f"{name}.npz.tmp"
    with open(npz_tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(npz_tmp, directory / f"{name}.npz")
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
