"""Versioned policy checkpoints: safetensors files with a sha256, never pickle.

>>> import tempfile, os
>>> from memento.qnet import QNetwork
>>> d = tempfile.mkdtemp()
>>> ann = save_checkpoint(QNetwork(4, 8), d, version=3, step=10)
>>> net = load_checkpoint(ann.path, ann.sha256, expect_state_dim=4)
>>> net.state_dim, ann.version
(4, 3)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memento.qnet import QNetwork
from memento.schemas import CheckpointAnnouncement

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "sha256_bytes"]


class CheckpointError(RuntimeError):
    """A checkpoint that must not be served: wrong hash, not safetensors, or wrong shapes."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(net: QNetwork, directory: str | Path, *, version: int, step: int,
                    metrics: dict[str, float] | None = None) -> CheckpointAnnouncement:
    """Write ``policy-v{version}.safetensors`` atomically and return its announcement."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"version": str(version), "step": str(step), "config": json.dumps(net.config())}
    data = st_save(tensors, metadata=meta)
    path = directory / f"policy-v{version:06d}.safetensors"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return CheckpointAnnouncement(
        version=version, path=str(path.resolve()), sha256=sha256_bytes(data), created_at=time.time(),
        step=step, state_dim=net.state_dim, item_dim=net.state_dim,
        metrics={k: float(v) for k, v in (metrics or {}).items()})


def load_checkpoint(path: str | Path, sha256: str, *, expect_state_dim: int) -> QNetwork:
    """Read, verify and build the network; raises :class:`CheckpointError` on any mismatch."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    digest = sha256_bytes(data)
    if digest != sha256:
        raise CheckpointError(f"checkpoint {path}: sha256 {digest[:12]}… does not match the "
                              f"announced {sha256[:12]}…")
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        config = json.loads(meta["config"])
    except Exception as exc:  # safetensors raises several error types for bad files
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors policy: {exc}") from None
    if config.get("state_dim") != expect_state_dim:
        raise CheckpointError(f"checkpoint {path}: state_dim {config.get('state_dim')} != "
                              f"serving's {expect_state_dim}")
    net = QNetwork(**config)
    expected = net.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"checkpoint {path}: tensor names or shapes do not match QNetwork{config}")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise CheckpointError(f"checkpoint {path}: non-finite weights")
    net.load_state_dict(tensors)
    net.eval()
    return net
