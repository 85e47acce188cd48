"""The soft-Q network Q(s, c): one definition, used by the learner, serving and eval.

>>> import torch
>>> net = QNetwork(state_dim=4, hidden=8)
>>> s = torch.zeros(2, 4); cases = torch.zeros(2, 3, case_feature_dim(4))
>>> tuple(net(s, cases).shape)
(2, 3)
"""

from __future__ import annotations

import torch
from torch import nn

from memento.encoder import case_feature_dim

__all__ = ["QNetwork", "case_feature_dim"]


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
        d = self.state_dim
        s = state.unsqueeze(1).expand(-1, cases.shape[1], -1)
        c_state, c_item, outcome = cases[..., :d], cases[..., d:2 * d], cases[..., 2 * d:]
        x = torch.cat([s, c_state, c_item, s * c_state, s * c_item, outcome], dim=-1)
        return self.mlp(x).squeeze(-1)

    def config(self) -> dict[str, int]:
        return {"state_dim": self.state_dim, "hidden": self.hidden}
