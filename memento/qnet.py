"""The soft-Q network Q(s, c): one definition, used by the learner, serving and eval.

>>> import torch
>>> net = QNetwork(state_dim=4, hidden=8, wide=True, item_buckets=16, item_embed=2)
>>> s = torch.zeros(2, 4); cases = torch.rand(2, 3, case_feature_dim(4))
>>> tuple(net(s, cases).shape)
(2, 3)
>>> frozen = FrozenQ(net)
>>> bool(np.allclose(frozen(s.numpy(), cases.numpy()), net(s, cases).detach().numpy(), atol=1e-6))
True
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from memento.encoder import case_feature_dim, case_item, case_outcome, case_state
from memento.schemas import finite_float, short_repr
from memento.softq import histogram_mean, histogram_support, item_key

__all__ = ["QNetwork", "FrozenQ", "case_feature_dim", "item_bucket"]

def item_bucket(item_vec, buckets: int):
    """A hash bucket of each item vector (numpy or torch, same result): its
    :func:`memento.softq.item_key` modulo ``buckets``, so equal items share a bucket and the
    bucket stands for the item's identity (the hashing trick for ids).

    >>> v = np.eye(4, dtype=np.float32)
    >>> b = item_bucket(v, 1024)
    >>> bool((b == item_bucket(torch.from_numpy(v), 1024).numpy()).all()), len(set(b.tolist()))
    (True, 4)
    """
    h = item_key(item_vec)
    return torch.remainder(h, buckets) if isinstance(h, torch.Tensor) else np.remainder(h, buckets)


def _pair_inputs(s, cases, d: int, unit_scale: bool = False) -> list:
    """The parts of the MLP input per (s, c) pair, in order; ``s`` is broadcast to the cases'
    shape. Works on torch tensors and numpy arrays alike.

    With ``unit_scale``, each part is scaled to components of order 1: a unit vector's
    components are about 1/√D and an element-wise product of two about 1/D, so they are
    multiplied by √D and D. Gradient steps of a fixed size (Adam) then move every weight at
    the same pace instead of leaving the similarity features 30× slower to learn.
    """
    c_state, c_item, outcome = case_state(cases), case_item(cases), case_outcome(cases)[..., None]
    if unit_scale:
        r = float(np.sqrt(d))
        s, c_state, c_item = s * r, c_state * r, c_item * r
    return [s, c_state, c_item, s * c_state, s * c_item, outcome]


class QNetwork(nn.Module):
    """Scores each candidate case for a state.

    The deep part is an MLP over ``[s, c_state, c_item, s*c_state, s*c_item, outcome]`` per
    (s, c) pair: the element-wise products let it express the similarities that plain RAG uses
    (cosine of states) next to the ones it ignores (how well the case's item fits *this* user,
    and how the case turned out). Two optional parts (Wide & Deep, Cheng et al. 2016):

    * ``wide``: a linear term over ``[s*c_state, s*c_item, outcome]``, the features a linear
      contextual bandit uses, so the network starts from that inductive bias and only has to
      learn what is nonlinear;
    * ``item_buckets``: a learned embedding and bias per item (hashed into that many buckets by
      :func:`item_bucket`), so Q can learn that an item pays more or less than its features
      say, as a per-arm bandit does; the embedding also feeds the MLP.

    Parameters
    ----------
    state_dim
        Dimension of states and item vectors.
    hidden
        Width of the two hidden layers.
    wide
        Add the linear term.
    item_buckets
        Hash buckets of the item embedding (0 = no item embedding or bias).
    item_embed
        Width of the item embedding fed to the MLP (its bias is one more column per output).
    value_bins
        0: Q is one number per pair. N > 1: the network outputs logits of a histogram over N
        equal bins covering [``value_min``, ``value_max``] and Q is its mean
        (:func:`memento.softq.histogram_mean`); the learner then trains it by cross-entropy
        (:func:`memento.softq.histogram_target`). The wide term and item bias add to the logits.
    value_min, value_max
        The histogram's support (used only with ``value_bins``).
    unit_scale
        Scale the input parts to components of order 1 (see :func:`_pair_inputs`).
    """

    def __init__(self, state_dim: int = 32, hidden: int = 128, wide: bool = False,
                 item_buckets: int = 0, item_embed: int = 8, value_bins: int = 0,
                 value_min: float = 0.0, value_max: float = 10.0, unit_scale: bool = False):
        super().__init__()
        if item_buckets < 0 or item_embed < 0:
            raise ValueError(f"item_buckets and item_embed must be >= 0, got {item_buckets}, {item_embed}")
        if value_bins == 1 or value_bins < 0 or (value_bins and not value_max > value_min):
            raise ValueError(f"value_bins must be 0 or > 1 with value_max > value_min, got "
                             f"{value_bins} bins on [{value_min}, {value_max}]")
        self.state_dim = state_dim
        self.hidden = hidden
        self.wide = bool(wide)
        self.item_buckets = int(item_buckets)
        self.item_embed = int(item_embed) if item_buckets else 0
        self.value_bins = int(value_bins)
        self.value_min, self.value_max = float(value_min), float(value_max)
        self.unit_scale = bool(unit_scale)
        out = self.value_bins or 1
        self.mlp = nn.Sequential(
            nn.Linear(5 * state_dim + 1 + self.item_embed, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, out),
        )
        if self.wide:
            self.wide_linear = nn.Linear(2 * state_dim + 1, out, bias=False)
            nn.init.zeros_(self.wide_linear.weight)
        if self.item_buckets:
            self.item_table = nn.Embedding(self.item_buckets, self.item_embed + out)
            with torch.no_grad():
                self.item_table.weight.normal_(0.0, 0.1)
                self.item_table.weight[:, self.item_embed:] = 0.0

    @property
    def case_dim(self) -> int:
        return case_feature_dim(self.state_dim)

    def support(self) -> np.ndarray:
        """Centres of the histogram's bins (empty without ``value_bins``)."""
        return histogram_support(self.value_min, self.value_max, self.value_bins)

    def outputs(self, state: torch.Tensor, cases: torch.Tensor) -> torch.Tensor:
        """``state`` [B, D], ``cases`` [B, K, 2D+1] → [B, K, max(1, value_bins)]: Q values, or
        the histogram's logits."""
        d = self.state_dim
        s = state.unsqueeze(1).expand(-1, cases.shape[1], -1)
        parts = _pair_inputs(s, cases, d, self.unit_scale)
        item = None
        if self.item_buckets:  # one lookup: the embedding feeds the MLP, the rest adds to its output
            item = self.item_table(item_bucket(case_item(cases), self.item_buckets))
            parts.append(item[..., :self.item_embed])
        out = self.mlp(torch.cat(parts, dim=-1))
        if item is not None:
            out = out + item[..., self.item_embed:]
        if self.wide:
            out = out + self.wide_linear(torch.cat(parts[3:6], dim=-1))
        return out

    def forward(self, state: torch.Tensor, cases: torch.Tensor) -> torch.Tensor:
        """``state`` [B, D], ``cases`` [B, K, 2D+1] → Q values [B, K]."""
        out = self.outputs(state, cases)
        if not self.value_bins:
            return out.squeeze(-1)
        return histogram_mean(out, torch.as_tensor(self.support(), dtype=out.dtype))

    # bounds on a config read from outside (a checkpoint): what a network of this kind needs,
    # far below what would exhaust memory while building it
    CONFIG_BOUNDS = {"state_dim": (1, 4096), "hidden": (1, 8192), "item_buckets": (0, 1 << 22),
                     "item_embed": (0, 1024), "value_bins": (0, 1024)}

    @classmethod
    def from_config(cls, config: object) -> "QNetwork":
        """Build the network a checkpoint's ``config`` describes, after checking it: an object
        whose keys are :meth:`config`'s, each of the right type and within
        :attr:`CONFIG_BOUNDS`; ValueError naming what is wrong otherwise.

        >>> QNetwork.from_config(QNetwork(4, 8).config()).hidden
        8
        >>> QNetwork.from_config({"state_dim": 4, "hidden": 10 ** 9})
        Traceback (most recent call last):
        ...
        ValueError: network config 'hidden' must be an integer in 1..8192, got 1000000000
        """
        if not isinstance(config, dict):
            raise ValueError(f"network config must be an object, got {type(config).__name__}")
        defaults = cls(1, 1).config()
        unknown = sorted(set(config) - set(defaults))
        if unknown or "state_dim" not in config:
            raise ValueError(f"network config has unknown keys {unknown}" if unknown
                             else "network config lacks 'state_dim'")
        for key, value in config.items():
            kind = type(defaults[key])
            if kind is int:
                low, high = cls.CONFIG_BOUNDS[key]
                if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                    raise ValueError(f"network config {key!r} must be an integer in {low}..{high}, "
                                     f"got {short_repr(value)}")
            elif not (isinstance(value, bool) if kind is bool else finite_float(value) is not None):
                raise ValueError(f"network config {key!r} must be a {kind.__name__}, got {short_repr(value)}")
        return cls(**config)

    def config(self) -> dict:
        return {"state_dim": self.state_dim, "hidden": self.hidden, "wide": self.wide,
                "item_buckets": self.item_buckets, "item_embed": self.item_embed,
                "value_bins": self.value_bins, "value_min": self.value_min, "value_max": self.value_max,
                "unit_scale": self.unit_scale}


class FrozenQ:
    """The function of a :class:`QNetwork` at the moment of construction, evaluated with numpy.

    Serving scores a few states at a time, where torch's per-operation overhead dominates;
    this copy of the weights computes the same Q values (the same inputs, layers and float32
    arithmetic) with a fraction of it. Later changes to the network do not reach it.

    Parameters
    ----------
    net
        The network to copy; its ``mlp`` must be Linear and ReLU layers.
    """

    def __init__(self, net: QNetwork):
        self.state_dim = net.state_dim
        self.unit_scale = net.unit_scale
        self.layers: list[tuple[np.ndarray, np.ndarray] | None] = []
        for layer in net.mlp:
            if isinstance(layer, nn.Linear):
                self.layers.append((layer.weight.detach().numpy().T.astype(np.float32, copy=True),
                                    layer.bias.detach().numpy().astype(np.float32, copy=True)))
            elif isinstance(layer, nn.ReLU):
                self.layers.append(None)
            else:
                raise TypeError(f"FrozenQ: unsupported layer {type(layer).__name__} in QNetwork.mlp")
        self.wide = (net.wide_linear.weight.detach().numpy().T.astype(np.float32, copy=True)
                     if net.wide else None)
        self.item_buckets, self.item_embed = net.item_buckets, net.item_embed
        self.item_table = (net.item_table.weight.detach().numpy().astype(np.float32, copy=True)
                           if net.item_buckets else None)
        self.support = net.support().astype(np.float32) if net.value_bins else None

    def __call__(self, states: np.ndarray, cases: np.ndarray) -> np.ndarray:
        """``states`` [B, D], ``cases`` [B, K, 2D+1] (float32) → Q values [B, K]."""
        d = self.state_dim
        s = np.broadcast_to(states[:, None, :], cases.shape[:-1] + (states.shape[-1],))
        parts = _pair_inputs(s, cases, d, self.unit_scale)
        item = None
        if self.item_table is not None:
            item = self.item_table[item_bucket(case_item(cases), self.item_buckets)]
            parts.append(item[..., :self.item_embed])
        x = np.concatenate(parts, axis=-1)
        wide_in = x[..., 3 * d:5 * d + 1] if self.wide is not None else None
        for layer in self.layers:
            if layer is None:
                np.maximum(x, 0.0, out=x)
            else:
                x = x @ layer[0] + layer[1]
        if item is not None:
            x = x + item[..., self.item_embed:]
        if self.wide is not None:
            x = x + wide_in @ self.wide
        if self.support is None:
            return x[..., 0]
        return histogram_mean(x, self.support)
