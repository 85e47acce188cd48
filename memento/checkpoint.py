"""Versioned policy checkpoints: safetensors files with a sha256, never pickle.

A checkpoint holds the Q network's tensors and, in the safetensors header's ``__metadata__``
(string to string), ``version``, ``step``, ``config`` (the network's options, JSON) and
``policy``: the μ the network was trained for, as JSON ``{"alpha": α, "min_prob": floor,
"top_k": K, "similarity_prior": β, "vote_prior": w, "priors": [[β, w, share], ...]}``
(:class:`PolicyParams`): the learner's current temperature (tuned when ``target_entropy`` is
set), the probability floor, the number of candidates, the weights of the retrieval prior and,
when μ mixes several priors (:mod:`memento.priors`), each one's share. Serving samples exactly that μ. A checkpoint written before
``policy`` existed loads with ``policy`` None, and serving keeps its own flags.

Reading verifies before it parses: the file's size is bounded, its sha256 must match the
announced one, then the header (bounded too) is parsed as safetensors only.

>>> import tempfile, os
>>> from memento.qnet import QNetwork
>>> d = tempfile.mkdtemp()
>>> ann = save_checkpoint(QNetwork(4, 8), d, version=3, step=10,
...                       policy=PolicyParams(alpha=0.25, min_prob=0.01, top_k=8))
>>> net = load_checkpoint(ann.path, ann.sha256, expect_state_dim=4)
>>> net.state_dim, ann.version
(4, 3)
>>> read_checkpoint(ann.path, ann.sha256, expect_state_dim=4).policy
PolicyParams(alpha=0.25, min_prob=0.01, top_k=8, similarity_prior=0.0, vote_prior=0.0, priors=())
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import math
import re
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memento.atomic import write_atomic
from memento.priors import check_prior_mix
from memento.qnet import QNetwork
from memento.schemas import MAX_INLINE_CHECKPOINT_BYTES, CheckpointAnnouncement

__all__ = ["ANNOUNCEMENT_KEY", "CheckpointError", "PolicyParams", "Checkpoint", "save_checkpoint", "read_checkpoint",
           "load_checkpoint", "read_announced", "parse_checkpoint", "sha256_bytes", "MAX_CHECKPOINT_BYTES", "MAX_TOP_K", "CHECKPOINT_NAME",
           "checkpoint_file_name", "sign_announcement", "announcement_problem"]

# The key of every checkpoint announcement: the checkpoints topic is compacted (memento.config.
# TOPIC_CONFIGS), so the latest announcement is the one a new reader finds.
ANNOUNCEMENT_KEY = "policy"

MAX_CHECKPOINT_BYTES = 1 << 30     # a policy network is a few MB; refuse to read a larger file
MAX_HEADER_BYTES = 1 << 20         # the safetensors header (tensor index and metadata)
MAX_POLICY_JSON = 1024             # the "policy" metadata entry
MAX_TOP_K = 1024                   # candidates per request a checkpoint may ask serving for


CHECKPOINT_NAME = re.compile(r"^policy-v(\d+)\.safetensors$")  # the files save_checkpoint writes


def checkpoint_file_name(version: int) -> str:
    """The file name of policy version ``version`` (matches :data:`CHECKPOINT_NAME`).

    >>> checkpoint_file_name(12), int(CHECKPOINT_NAME.match(checkpoint_file_name(12)).group(1))
    ('policy-v000012.safetensors', 12)
    """
    return f"policy-v{version:06d}.safetensors"


def _signed_text(ann: CheckpointAnnouncement) -> bytes:
    return f"{ann.version}\n{Path(ann.path).name}\n{ann.sha256}".encode()


def sign_announcement(ann: CheckpointAnnouncement, key: str) -> str:
    """HMAC-SHA256 (hex) of the announcement's version, file name and sha256 under ``key``: with
    a key shared by the learner and serving, only the learner can announce a file to serve."""
    return hmac.new(key.encode(), _signed_text(ann), hashlib.sha256).hexdigest()


def announcement_problem(ann: CheckpointAnnouncement, key: str = "") -> str | None:
    """Why serving must not act on ``ann`` (None when it may): its file name is not one the
    learner writes for that version (a path elsewhere, ``/dev/zero``, an old file announced as a
    new version), or, with a ``key``, its signature is missing or wrong.

    >>> from memento.schemas import CheckpointAnnouncement
    >>> ann = CheckpointAnnouncement(3, "/x/policy-v000003.safetensors", "ab", 0.0, 0, 4, 4)
    >>> announcement_problem(ann) is None, announcement_problem(ann, key="k")
    (True, 'announcement of version 3 is not signed (a checkpoint key is configured)')
    >>> import dataclasses
    >>> announcement_problem(dataclasses.replace(ann, signature=sign_announcement(ann, "k")), key="k") is None
    True
    >>> announcement_problem(dataclasses.replace(ann, path="/dev/zero"))
    "announced file '/dev/zero' is not policy-v000003.safetensors"
    """
    if Path(ann.path).name != checkpoint_file_name(ann.version):
        return f"announced file {ann.path!r} is not {checkpoint_file_name(ann.version)}"
    if key:
        if not ann.signature:
            return f"announcement of version {ann.version} is not signed (a checkpoint key is configured)"
        if not hmac.compare_digest(ann.signature, sign_announcement(ann, key)):
            return f"announcement of version {ann.version} has a wrong signature"
    return None


class CheckpointError(RuntimeError):
    """A checkpoint that must not be served: wrong hash, not safetensors, or wrong shapes."""


@dataclass(frozen=True)
class PolicyParams:
    """The retrieval policy a network was trained for: μ(c|s) ∝ exp(Q(s, c)/alpha +
    prior(s, c)) over the ``top_k`` nearest cases, each floored at ``min_prob``
    (:func:`memento.softq.policy_probs`); the prior ranks by nearness with weight
    ``similarity_prior`` and by the neighbours' vote with weight ``vote_prior``
    (:func:`memento.softq.retrieval_prior`; 0 = none, and what a checkpoint that does not say it
    means). ``priors``, when not empty, is the mix μ samples instead: ``(β, w, share)`` for each
    prior (:mod:`memento.priors`), a request's prior drawn with probability ``share``; the
    single prior is then the leading one, which the TD target's soft value was taken under.

    >>> p = PolicyParams(alpha=0.1, min_prob=0.01, top_k=16)
    >>> PolicyParams.from_json(p.to_json()) == p
    True
    >>> PolicyParams.from_json('{"alpha": 0.1, "min_prob": 0.01, "top_k": 16}').similarity_prior  # older
    0.0
    >>> PolicyParams.from_json(PolicyParams(0.1, 0.0, 16, 0.0, 20.0, ((0, 20, 0.9), (1000, 0, 0.1))).to_json()).priors
    ((0.0, 20.0, 0.9), (1000.0, 0.0, 0.1))
    >>> PolicyParams.from_json('{"alpha": 0, "min_prob": 0.01, "top_k": 16}')
    Traceback (most recent call last):
    ...
    ValueError: policy alpha must be a finite number > 0, got 0
    """

    alpha: float
    min_prob: float
    top_k: int
    similarity_prior: float = 0.0
    vote_prior: float = 0.0
    priors: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self):
        a, m, k = self.alpha, self.min_prob, self.top_k
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (math.isfinite(a) and a > 0):
            raise ValueError(f"policy alpha must be a finite number > 0, got {a!r}")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise ValueError(f"policy min_prob must be a number in [0, 1), got {m!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
            raise ValueError(f"policy top_k must be an integer in 1..{MAX_TOP_K}, got {k!r}")
        for name in ("similarity_prior", "vote_prior"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b >= 0):
                raise ValueError(f"policy {name} must be a finite number >= 0, got {b!r}")
            object.__setattr__(self, name, float(b))
        object.__setattr__(self, "alpha", float(a))
        object.__setattr__(self, "min_prob", float(m))
        object.__setattr__(self, "priors", check_prior_mix(self.priors))

    def to_json(self) -> str:
        """The ``policy`` metadata entry (floats written exactly: they read back equal)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PolicyParams":
        """Parse a ``policy`` entry; ValueError when it is too long, not an object, or lacks or
        mistypes ``alpha``, ``min_prob`` or ``top_k`` (``similarity_prior`` and ``vote_prior`` are
        optional, 0 when absent, ``priors`` too, none when absent; other keys are ignored)."""
        if len(text) > MAX_POLICY_JSON:
            raise ValueError(f"policy metadata is {len(text)} characters, more than {MAX_POLICY_JSON}")
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"policy metadata must be a JSON object, got {type(value).__name__}")
        missing = [k for k in ("alpha", "min_prob", "top_k") if k not in value]
        if missing:
            raise ValueError(f"policy metadata lacks {', '.join(missing)}")
        return cls(alpha=value["alpha"], min_prob=value["min_prob"], top_k=value["top_k"],
                   similarity_prior=value.get("similarity_prior", 0.0),
                   vote_prior=value.get("vote_prior", 0.0), priors=value.get("priors", ()))


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the network, and the μ it was trained for (None: an older
    checkpoint that does not say)."""

    net: QNetwork
    policy: PolicyParams | None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(net: QNetwork, directory: str | Path, *, version: int, step: int,
                    metrics: dict[str, float] | None = None,
                    policy: PolicyParams | None = None) -> CheckpointAnnouncement:
    """Write ``policy-v{version}.safetensors`` atomically and return its announcement;
    ``policy`` (the μ the network was trained for) goes into the metadata when given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"version": str(version), "step": str(step), "config": json.dumps(net.config())}
    if policy is not None:
        meta["policy"] = policy.to_json()
    data = st_save(tensors, metadata=meta)
    path = directory / checkpoint_file_name(version)
    write_atomic(path, data)  # a full disk leaves no partial file behind
    inline = base64.b64encode(data).decode("ascii") if len(data) <= MAX_INLINE_CHECKPOINT_BYTES else None
    return CheckpointAnnouncement(
        version=version, path=str(path.resolve()), sha256=sha256_bytes(data), created_at=time.time(),
        step=step, state_dim=net.state_dim, item_dim=net.state_dim,
        metrics={k: float(v) for k, v in (metrics or {}).items()}, data=inline)


def load_checkpoint(path: str | Path, sha256: str, *, expect_state_dim: int) -> QNetwork:
    """Read, verify and build the network; raises :class:`CheckpointError` on any mismatch."""
    return read_checkpoint(path, sha256, expect_state_dim=expect_state_dim).net


def read_checkpoint(path: str | Path, sha256: str, *, expect_state_dim: int) -> Checkpoint:
    """Read, verify and build the network and the μ it was trained for; raises
    :class:`CheckpointError` on any mismatch (a malformed ``policy`` entry included)."""
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            size = info.st_size
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"checkpoint {path} is not a regular file")
            if size > MAX_CHECKPOINT_BYTES:
                raise CheckpointError(f"checkpoint {path} is {size} bytes, more than {MAX_CHECKPOINT_BYTES}")
            data = fh.read(MAX_CHECKPOINT_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    return parse_checkpoint(data, sha256, expect_state_dim=expect_state_dim, name=str(path))


def read_announced(ann: CheckpointAnnouncement, directory: str | Path, *, expect_state_dim: int) -> Checkpoint:
    """The checkpoint ``ann`` announces: from its inline bytes when it carries them (no shared
    volume needed), else from the file of the announced name in ``directory``; verified against
    the announced sha256 before it is parsed, as :func:`read_checkpoint`.

    >>> import tempfile
    >>> from memento.qnet import QNetwork
    >>> ann = save_checkpoint(QNetwork(4, 8), tempfile.mkdtemp(), version=1, step=1)
    >>> read_announced(ann, "/nonexistent", expect_state_dim=4).net.state_dim   # the bytes travelled
    4
    """
    name = Path(ann.path).name
    if ann.data is None:
        return read_checkpoint(Path(directory) / name, ann.sha256, expect_state_dim=expect_state_dim)
    try:
        data = base64.b64decode(ann.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CheckpointError(f"checkpoint {name}: its inline data is not base64 ({exc})") from None
    return parse_checkpoint(data, ann.sha256, expect_state_dim=expect_state_dim, name=name)


def parse_checkpoint(data: bytes, sha256: str, *, expect_state_dim: int, name: str = "checkpoint") -> Checkpoint:
    """Verify ``data`` (size, then sha256) and only then parse it as a safetensors policy;
    raises :class:`CheckpointError` naming ``name`` on any mismatch."""
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"checkpoint {name} is {len(data)} bytes, more than {MAX_CHECKPOINT_BYTES}")
    digest = sha256_bytes(data)
    if digest != sha256:
        raise CheckpointError(f"checkpoint {name}: sha256 {digest[:12]}… does not match the "
                              f"announced {sha256[:12]}…")
    try:
        header_len = int.from_bytes(data[:8], "little")
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"header of {header_len} bytes, more than {MAX_HEADER_BYTES}")
        tensors = st_load(data)
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        config = json.loads(meta["config"])
        policy = PolicyParams.from_json(meta["policy"]) if "policy" in meta else None
    except Exception as exc:  # safetensors raises several error types for bad files
        raise CheckpointError(f"checkpoint {name} is not a valid safetensors policy: {exc}") from None
    try:
        net = QNetwork.from_config(config)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {name}: {exc}") from None
    if net.state_dim != expect_state_dim:
        raise CheckpointError(f"checkpoint {name}: state_dim {net.state_dim} != serving's {expect_state_dim}")
    expected = net.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"checkpoint {name}: tensor names or shapes do not match QNetwork{config}")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise CheckpointError(f"checkpoint {name}: non-finite weights")
    net.load_state_dict(tensors)
    net.eval()
    return Checkpoint(net, policy)
