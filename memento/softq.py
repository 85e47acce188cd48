"""Soft-Q arithmetic: the retrieval policy μ(c|s) and the TD target, in one place.

μ(c|s) = softmax(Q(s, c)/α) over the K candidates, mixed with a uniform floor so that every
candidate keeps at least ``min_prob`` (as Vowpal Wabbit's softmax explorer does); the soft
value is V(s) = α·logsumexp(Q(s, ·)/α), and the TD target is y = r + γ(1 − done)·V_target(s′).

With a retrieval prior (:func:`retrieval_prior`) μ is the KL-regularised soft-Q policy
towards the retrieved cases' own ranking π0(c|s) = softmax(β·cos(s, c_state) + w·log(1 + V(c)))
(Fox et al. 2016, "G-learning"; Todorov 2009), with V(c) what the retrieved cases that led to
c's item paid (:func:`neighbour_votes`): μ ∝ π0·exp(Q/α), and V(s) = α·log Σ_c n·π0(c)·exp(Q/α)
(n valid candidates, so that no prior gives exactly the plain soft value). An untrained Q
(equal values) then samples what the neighbours' vote and nearness rank first, and Q moves μ
away from it only as far as the rewards it has learned justify: a prior that dominates where
rewards are rare and fades where they are plenty.

>>> import torch
>>> q = torch.tensor([[1.0, 0.0]])
>>> round(float(soft_value(q, alpha=1e-3)), 3)   # tends to max Q as α → 0
1.0
>>> p = policy_probs(q, alpha=1.0, min_prob=0.1)
>>> bool(torch.isclose(p.sum(), torch.tensor(1.0))) and bool((p >= 0.1).all())
True
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from memento.encoder import case_item, case_outcome, case_state

__all__ = ["soft_value", "policy_probs", "td_target", "entropy", "policy_logits_numpy", "policy_probs_numpy", "probs_from_logits_numpy",
           "entropy_numpy",
           "retrieval_prior", "retrieval_prior_numpy", "neighbour_votes", "own_recency", "item_key",
           "histogram_support", "histogram_mean", "histogram_target"]

_NEG = -1e30


def _masked(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return q if mask is None else q.masked_fill(~mask, _NEG)


def _cosine_to_case_states(states, cases, xp_sum, xp_norm):
    c_state = case_state(cases)
    dots = xp_sum(states[..., None, :] * c_state, -1)
    return dots / (xp_norm(states)[..., None] * xp_norm(c_state) + 1e-12)


# Odd multipliers below 2**20: a 32-bit word times one is below 2**52, so a row of up to 2**11
# words sums without overflow and torch and numpy agree exactly.
_ITEM_KEY_SEED = 20140901


@functools.lru_cache(maxsize=None)
def _item_key_multipliers(d: int) -> np.ndarray:
    # cached: item_key runs on every request and update, and seeding a generator costs more than the hash
    mult = np.random.default_rng(_ITEM_KEY_SEED + d).integers(1, 2 ** 19, d, dtype=np.int64) * 2 + 1
    mult.flags.writeable = False
    return mult


def item_key(item_vec):
    """An integer key of each item vector's exact float32 bits (numpy or torch, same result).

    Item vectors are a deterministic function of the item (memento.encoder.ItemEncoder), so two
    cases lead to the same item exactly when their keys match (up to a 2**-60 chance): the
    item's identity, without a separate id column in the case features.

    >>> v = np.eye(3, dtype=np.float32)[[0, 1, 0]]
    >>> k = item_key(v); bool(k[0] == k[2]), bool(k[0] == k[1])
    (True, False)
    >>> bool((k == item_key(torch.from_numpy(v)).numpy()).all())
    True
    """
    mult = _item_key_multipliers(item_vec.shape[-1])
    if isinstance(item_vec, torch.Tensor):
        bits = item_vec.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        h = (bits * torch.tensor(mult)).sum(-1)
    else:
        bits = np.ascontiguousarray(item_vec, np.float32).view(np.uint32).astype(np.int64)
        h = (bits * mult).sum(-1)
    return h ^ (h >> 31)


def neighbour_votes(cases, mask=None):
    """V(c) = Σ_{c′} [item(c′) = item(c)]·max(outcome(c′), 0) over each row's valid candidates
    (torch or numpy): how much the retrieved cases that led to c's item paid, c included.

    ``cases`` [B, K, 2D+1] (memento.encoder's case feature layout) → [B, K].

    >>> c = np.zeros((1, 3, 5), np.float32); c[0, :, 2] = [1, 2, 1]; c[0, :, 4] = [1, 3, 2]
    >>> neighbour_votes(c).tolist()   # items 1, 2, 1 with outcomes 1, 3, 2
    [[3.0, 3.0, 3.0]]
    >>> c[0, 1, 2] = 1; neighbour_votes(c, np.array([[True, True, False]])).tolist()
    [[4.0, 4.0, 4.0]]
    """
    keys = item_key(case_item(cases))
    if isinstance(cases, torch.Tensor):
        paid = case_outcome(cases).clamp(min=0)
        if mask is not None:
            paid = paid * mask
        same = (keys.unsqueeze(-1) == keys.unsqueeze(-2)).to(paid.dtype)
        return (same * paid.unsqueeze(-2)).sum(-1)
    paid = np.maximum(case_outcome(cases), np.float32(0))
    if mask is not None:
        paid = paid * mask
    same = keys[..., :, None] == keys[..., None, :]
    return (same * paid[..., None, :]).sum(-1).astype(np.float32)


def own_recency(cases, recent, recent_mask=None):
    """R(c) = 1/(1 + r) when c's item is the user's r-th most recent distinct item (newest: r = 0),
    else 0 (numpy): the recency term of the retrieval prior, from the case features alone (items
    compared by :func:`item_key`, as the vote does).

    ``cases`` [B, K, 2D+1]; ``recent`` [B, R, D] the item vectors of each row's user's most
    recent distinct items, newest first; ``recent_mask`` [B, R] (False: padding) → [B, K].

    >>> c = np.zeros((1, 3, 5), np.float32); c[0, :, 2:4] = [[1, 0], [0, 1], [1, 1]]
    >>> own_recency(c, np.array([[[0, 1], [1, 0]]], np.float32)).tolist()   # newest item 2, then 1
    [[0.5, 1.0, 0.0]]
    """
    keys = item_key(case_item(cases))
    recent_keys = item_key(np.asarray(recent, np.float32))
    match = keys[..., :, None] == recent_keys[..., None, :]          # [B, K, R]
    if recent_mask is not None:
        match &= np.asarray(recent_mask, bool)[..., None, :]
    weight = 1.0 / (1.0 + np.arange(recent_keys.shape[-1], dtype=np.float32))
    return (match * weight).max(axis=-1, initial=0.0).astype(np.float32)


def _prior_logits(xp, states, cases, similarity, vote, mask, recency, own):
    """β·cos(s, c_state) + w·log(1 + V(c)) + ρ·R(c) (``xp``: torch or numpy)."""
    if xp is torch:
        logits = torch.zeros(cases.shape[:-1], dtype=cases.dtype)
        norm, total, log1p = (lambda x: torch.linalg.vector_norm(x, dim=-1)), torch.sum, torch.log1p
    else:
        logits = np.zeros(cases.shape[:-1], np.float32)
        norm, total, log1p = (lambda x: np.linalg.norm(x, axis=-1)), np.sum, np.log1p
        similarity, vote, recency = np.float32(similarity), np.float32(vote), np.float32(recency)
    if similarity:
        logits = logits + similarity * _cosine_to_case_states(states, cases, total, norm)
    if vote:
        logits = logits + vote * log1p(neighbour_votes(cases, mask))
    if recency and own is not None:
        logits = logits + recency * (torch.as_tensor(own, dtype=cases.dtype) if xp is torch else own)
    return logits


def retrieval_prior(states: torch.Tensor, cases: torch.Tensor, similarity: float, vote: float = 0.0,
                    mask: torch.Tensor | None = None, recency: float = 0.0, own=None) -> torch.Tensor | None:
    """log(n·π0(c|s)) of the retrieval prior π0 = softmax(``similarity``·cos(s, c_state) +
    ``vote``·log(1 + V(c)) + ``recency``·R(c)) over each row's n valid candidates (0 where
    ``mask`` is False; V: :func:`neighbour_votes`; R: :func:`own_recency`, given as ``own``
    [B, K], absent (0) when None); None when every weight is 0 (no prior).

    The terms are the ways the retrieved cases themselves rank: nearness (plain RAG's choice),
    the neighbours' vote (a k-nearest-neighbour estimate of what pays for states like s: an item
    that several of the K cases led to, and that paid, ranks high) and the user's own recent
    items (newest first: users come back to what they just had).

    ``states`` [B, D], ``cases`` [B, K, 2D+1] → [B, K].

    >>> s = torch.tensor([[1.0, 0.0]])
    >>> c = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]]])
    >>> [round(float(x), 3) for x in retrieval_prior(s, c, 2.0)[0].exp() / 2]   # π0
    [0.881, 0.119]
    >>> retrieval_prior(s, c, 0.0) is None
    True
    >>> c[0, 0, 2] = c[0, 1, 3] = 1.0; c[0, 1, 4] = 2.0   # two items; the second case's paid 2
    >>> [round(float(x), 3) for x in retrieval_prior(s, c, 0.0, 1.0)[0].exp() / 2]
    [0.25, 0.75]
    >>> [round(float(x), 3) for x in retrieval_prior(s, c, 0.0, 0.0, recency=2.0, own=[[0.0, 1.0]])[0].exp() / 2]
    [0.119, 0.881]
    """
    if not similarity and not vote and not recency:
        return None
    logits = _masked(_prior_logits(torch, states, cases, similarity, vote, mask, recency, own), mask)
    n = logits.new_full(logits.shape[:-1] + (1,), logits.shape[-1]) if mask is None else \
        mask.sum(-1, keepdim=True).to(logits.dtype).clamp(min=1)
    prior = torch.log_softmax(logits, dim=-1) + torch.log(n)
    return prior if mask is None else prior.masked_fill(~mask, 0.0)


def retrieval_prior_numpy(states: np.ndarray, cases: np.ndarray, similarity: float, vote: float = 0.0,
                          mask: np.ndarray | None = None, recency: float = 0.0,
                          own: np.ndarray | None = None) -> np.ndarray | None:
    """:func:`retrieval_prior` on numpy arrays (the same arithmetic; serving's side).

    >>> s = np.array([[0.6, 0.8]], np.float32); c = np.random.default_rng(0).random((1, 3, 5), np.float32)
    >>> c[0, 2, 2:4] = c[0, 0, 2:4]; m = np.array([[True, True, True]]); r = np.array([[0, 0.5, 1]], np.float32)
    >>> t = retrieval_prior(torch.from_numpy(s), torch.from_numpy(c), 3.0, 2.0, torch.from_numpy(m), 4.0, r).numpy()
    >>> bool(np.allclose(retrieval_prior_numpy(s, c, 3.0, 2.0, m, 4.0, r), t, atol=1e-5))
    True
    """
    if not similarity and not vote and not recency:
        return None
    logits = _prior_logits(np, states, cases, similarity, vote, mask, recency, own)
    if mask is not None:
        logits = np.where(mask, logits, np.float32(_NEG))
    z = logits - logits.max(axis=-1, keepdims=True)
    n = np.full(z.shape[:-1] + (1,), z.shape[-1], np.float32) if mask is None else \
        np.maximum(mask.sum(axis=-1, keepdims=True), 1).astype(np.float32)
    prior = (z - np.log(np.exp(z).sum(axis=-1, keepdims=True)) + np.log(n)).astype(np.float32)
    return prior if mask is None else np.where(mask, prior, np.float32(0.0))


def _logits(q, alpha: float, prior):
    return q / alpha if prior is None else q / alpha + prior


def soft_value(q: torch.Tensor, alpha: float, mask: torch.Tensor | None = None,
               prior: torch.Tensor | None = None) -> torch.Tensor:
    """α·logsumexp(Q/α + prior) over the last axis, ignoring candidates where ``mask`` is False
    (``prior``: :func:`retrieval_prior`, None for none)."""
    return alpha * torch.logsumexp(_masked(_logits(q, alpha, prior), mask), dim=-1)


def policy_probs(q: torch.Tensor, alpha: float, min_prob: float = 0.0,
                 mask: torch.Tensor | None = None, prior: torch.Tensor | None = None) -> torch.Tensor:
    """μ(c|s) ∝ exp(Q/α + prior), with each valid candidate's probability at least ``min_prob``."""
    probs = torch.softmax(_masked(_logits(q, alpha, prior), mask), dim=-1)
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


def policy_logits_numpy(q: np.ndarray, alpha: float, mask: np.ndarray | None = None,
                        prior: np.ndarray | None = None) -> np.ndarray:
    """Q/α plus the prior's log-weights, the masked logits of μ before the floor: they order
    the candidates as μ does, also where probabilities tie at the floor or underflow to 0.

    >>> policy_logits_numpy(np.array([[1.0, 0.0, 5.0]], np.float32), 0.5, np.array([[True, True, False]]))[0, :2]
    array([2., 0.], dtype=float32)
    """
    z = q / np.float32(alpha) if prior is None else q / np.float32(alpha) + prior
    return z if mask is None else np.where(mask, z, np.float32(_NEG))


def policy_probs_numpy(q: np.ndarray, alpha: float, min_prob: float = 0.0,
                       mask: np.ndarray | None = None, prior: np.ndarray | None = None) -> np.ndarray:
    """:func:`policy_probs` on numpy arrays, for serving's small batches (the same arithmetic;
    tests check the two agree).

    >>> q = np.array([[1.0, 0.0, 5.0]], np.float32); m = np.array([[True, True, False]])
    >>> t = policy_probs(torch.from_numpy(q), 0.5, 0.1, torch.from_numpy(m)).numpy()
    >>> bool(np.allclose(policy_probs_numpy(q, 0.5, 0.1, m), t, atol=1e-7))
    True
    """
    return probs_from_logits_numpy(policy_logits_numpy(q, alpha, mask, prior), min_prob, mask)


def probs_from_logits_numpy(z: np.ndarray, min_prob: float = 0.0, mask: np.ndarray | None = None) -> np.ndarray:
    """μ from its masked logits (:func:`policy_logits_numpy`): softmax, then the floor
    ``min_prob`` mixed in over the valid candidates.

    >>> z = policy_logits_numpy(np.array([[1.0, 0.0]], np.float32), 0.5)
    >>> bool(np.allclose(probs_from_logits_numpy(z, 0.1), policy_probs_numpy(np.array([[1.0, 0.0]], np.float32), 0.5, 0.1)))
    True
    """
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    if min_prob > 0:
        n = np.full(z.shape[:-1] + (1,), z.shape[-1], z.dtype) if mask is None else \
            mask.sum(axis=-1, keepdims=True).astype(z.dtype)
        floor = np.minimum(min_prob * n, 1.0).astype(z.dtype)
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
              gamma: float, alpha: float, next_mask: torch.Tensor | None = None,
              next_prior: torch.Tensor | None = None) -> torch.Tensor:
    """y = r + γ(1 − done)·α·logsumexp(Q_target(s′, ·)/α + prior(s′, ·)); a state with no valid
    candidate has value 0."""
    value = soft_value(next_q_target, alpha, next_mask, next_prior)
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
