"""The soft-Q network Q(s, c): one definition, used by the learner, serving and eval.

>>> import torch
>>> net = QNetwork(state_dim=4, hidden=8)
>>> s = torch.zeros(2, 4); cases = torch.zeros(2, 3, case_feature_dim(4))
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

from memento.encoder import case_feature_dim

__all__ = ["QNetwork", "FrozenQ", "case_feature_dim"]


def _pair_inputs(s, cases, d: int) -> list:
    """The parts of the MLP input per (s, c) pair, in order; ``s`` is broadcast to the cases'
    shape. Works on torch tensors and numpy arrays alike."""
    c_state, c_item, outcome = cases[..., :d], cases[..., d:2 * d], cases[..., 2 * d:]
    return [s, c_state, c_item, s * c_state, s * c_item, outcome]


class QNetwork(nn.Module):
    """Scores each candidate case for a state.

    The input per (s, c) pair is ``[s, c_state, c_item, s*c_state, s*c_item, outcome]``: the
    element-wise products let a small MLP express the similarities that plain RAG uses
    (cosine of states) next to the ones it ignores (how well the case's item fits *this*
    user, and how the case turned out).

    Parameters
    ----------
    state_dim
        Dimension of states and item vectors.
    hidden
        Width of the two hidden layers.
    """

    def __init__(self, state_dim: int = 32, hidden: int = 128):
        super().__init__()
        self.state_dim = state_dim
        self.hidden = hidden
        self.mlp = nn.Sequential(
            nn.Linear(5 * state_dim + 1, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    @property
    def case_dim(self) -> int:
        return case_feature_dim(self.state_dim)

    def forward(self, state: torch.Tensor, cases: torch.Tensor) -> torch.Tensor:
        """``state`` [B, D], ``cases`` [B, K, 2D+1] → Q values [B, K]."""
        s = state.unsqueeze(1).expand(-1, cases.shape[1], -1)
        x = torch.cat(_pair_inputs(s, cases, self.state_dim), dim=-1)
        return self.mlp(x).squeeze(-1)

    def config(self) -> dict[str, int]:
        return {"state_dim": self.state_dim, "hidden": self.hidden}


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
        self.layers: list[tuple[np.ndarray, np.ndarray] | None] = []
        for layer in net.mlp:
            if isinstance(layer, nn.Linear):
                self.layers.append((layer.weight.detach().numpy().T.astype(np.float32, copy=True),
                                    layer.bias.detach().numpy().astype(np.float32, copy=True)))
            elif isinstance(layer, nn.ReLU):
                self.layers.append(None)
            else:
                raise TypeError(f"FrozenQ: unsupported layer {type(layer).__name__} in QNetwork.mlp")

    def __call__(self, states: np.ndarray, cases: np.ndarray) -> np.ndarray:
        """``states`` [B, D], ``cases`` [B, K, 2D+1] (float32) → Q values [B, K]."""
        s = np.broadcast_to(states[:, None, :], cases.shape[:-1] + (states.shape[-1],))
        x = np.concatenate(_pair_inputs(s, cases, self.state_dim), axis=-1)
        for layer in self.layers:
            if layer is None:
                np.maximum(x, 0.0, out=x)
            else:
                x = x @ layer[0] + layer[1]
        return x[..., 0]
