"""Soft-Q arithmetic: the retrieval policy μ(c|s) and the TD target, in one place.

μ(c|s) = softmax(Q(s, c)/α) over the K candidates, mixed with a uniform floor so that every
candidate keeps at least ``min_prob`` (as Vowpal Wabbit's softmax explorer does); the soft
value is V(s) = α·logsumexp(Q(s, ·)/α), and the TD target is y = r + γ(1 − done)·V_target(s′).

>>> import torch
>>> q = torch.tensor([[1.0, 0.0]])
>>> round(float(soft_value(q, alpha=1e-3)), 3)   # tends to max Q as α → 0
1.0
>>> p = policy_probs(q, alpha=1.0, min_prob=0.1)
>>> bool(torch.isclose(p.sum(), torch.tensor(1.0))) and bool((p >= 0.1).all())
True
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["soft_value", "policy_probs", "td_target", "entropy", "policy_probs_numpy", "entropy_numpy",
           "histogram_support", "histogram_mean", "histogram_target"]

_NEG = -1e30


def _masked(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return q if mask is None else q.masked_fill(~mask, _NEG)


def soft_value(q: torch.Tensor, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """α·logsumexp(Q/α) over the last axis, ignoring candidates where ``mask`` is False."""
    return alpha * torch.logsumexp(_masked(q, mask) / alpha, dim=-1)


def policy_probs(q: torch.Tensor, alpha: float, min_prob: float = 0.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """μ(c|s) with each valid candidate's probability at least ``min_prob``."""
    probs = torch.softmax(_masked(q, mask) / alpha, dim=-1)
    if min_prob > 0:
        n = q.new_full(q.shape[:-1] + (1,), q.shape[-1]) if mask is None else mask.sum(-1, keepdim=True).to(q.dtype)
        floor = torch.clamp(min_prob * n, max=1.0)
        uniform = (1.0 / n.clamp(min=1)).expand_as(probs)
        if mask is not None:
            uniform = uniform * mask
        probs = (1 - floor) * probs + floor * uniform
    return probs


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * torch.log(probs.clamp(min=1e-12))).sum(-1)


def policy_probs_numpy(q: np.ndarray, alpha: float, min_prob: float = 0.0,
                       mask: np.ndarray | None = None) -> np.ndarray:
    """:func:`policy_probs` on numpy arrays, for serving's small batches (the same arithmetic;
    tests check the two agree).

    >>> q = np.array([[1.0, 0.0, 5.0]], np.float32); m = np.array([[True, True, False]])
    >>> t = policy_probs(torch.from_numpy(q), 0.5, 0.1, torch.from_numpy(m)).numpy()
    >>> bool(np.allclose(policy_probs_numpy(q, 0.5, 0.1, m), t, atol=1e-7))
    True
    """
    z = (q if mask is None else np.where(mask, q, np.float32(_NEG))) / np.float32(alpha)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    if min_prob > 0:
        n = np.full(q.shape[:-1] + (1,), q.shape[-1], q.dtype) if mask is None else \
            mask.sum(axis=-1, keepdims=True).astype(q.dtype)
        floor = np.minimum(min_prob * n, 1.0).astype(q.dtype)
        uniform = np.broadcast_to(1.0 / np.maximum(n, 1), probs.shape)
        if mask is not None:
            uniform = uniform * mask
        probs = (1 - floor) * probs + floor * uniform
    return probs


def entropy_numpy(probs: np.ndarray) -> np.ndarray:
    """:func:`entropy` on numpy arrays."""
    return -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=-1)


@torch.no_grad()
def td_target(reward: torch.Tensor, done: torch.Tensor, next_q_target: torch.Tensor, *,
              gamma: float, alpha: float, next_mask: torch.Tensor | None = None) -> torch.Tensor:
    """y = r + γ(1 − done)·α·logsumexp(Q_target(s′, ·)/α); a state with no valid candidate has
    value 0."""
    value = soft_value(next_q_target, alpha, next_mask)
    if next_mask is not None:
        value = torch.where(next_mask.any(-1), value, torch.zeros_like(value))
    return reward + gamma * (1.0 - done.to(reward.dtype)) * value


def histogram_support(value_min: float, value_max: float, bins: int) -> np.ndarray:
    """Centres of ``bins`` equal bins covering [value_min, value_max] (empty for 0 bins).

    >>> histogram_support(0.0, 1.0, 4).tolist()
    [0.125, 0.375, 0.625, 0.875]
    """
    if not bins:
        return np.zeros(0)
    width = (value_max - value_min) / bins
    return value_min + width * (np.arange(bins) + 0.5)


def histogram_mean(logits, support):
    """Mean of the histogram softmax(logits) over ``support`` (the last axis); torch or numpy."""
    if isinstance(logits, torch.Tensor):
        return (torch.softmax(logits, dim=-1) * support).sum(-1)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e * support).sum(-1) / e.sum(-1)


@torch.no_grad()
def histogram_target(y: torch.Tensor, value_min: float, value_max: float, bins: int,
                     sigma_over_width: float = 0.75) -> torch.Tensor:
    """HL-Gauss (Imani & White 2018; Farebrother et al. 2024, "Stop Regressing"): the target
    histogram of each scalar target y [B] is the mass of N(y, σ²) in each bin, renormalised to
    the support, with σ = ``sigma_over_width`` bin widths. Cross-entropy against it trains a
    histogram whose mean tracks E[y] with classification's better-behaved gradients.

    >>> p = histogram_target(torch.tensor([0.3, 9.0]), 0.0, 1.0, 4)
    >>> [round(float(x), 3) for x in p.sum(-1)], int(p[0].argmax()), int(p[1].argmax())
    ([1.0, 1.0], 1, 3)
    """
    width = (value_max - value_min) / bins
    edges = value_min + width * torch.arange(bins + 1, dtype=y.dtype)
    y = y.clamp(value_min, value_max).unsqueeze(-1)
    cdf = torch.special.ndtr((edges - y) / (sigma_over_width * width))
    mass = cdf[..., 1:] - cdf[..., :-1]
    return mass / (cdf[..., -1:] - cdf[..., :1]).clamp(min=1e-12)
