"""The retrieval policy μ(c|s): nearest cases, scored by Q, sampled from softmax(Q/α).

For a state s, the policy takes the ``top_k`` nearest cases of the bank (cosine of states) and,
when the request carries the user's memory, the user's own newest cases (:mod:`memento.personal`),
scores them with the soft-Q network, forms μ(c|s) = softmax(Q(s, c)/α), times the retrieval
prior when it has one (:func:`memento.softq.retrieval_prior`), with a probability floor
(:func:`memento.softq.policy_probs`), and samples one case from μ with a seeded generator. The
propensity μ(c|s) of the chosen case is what the stream worker and the learner need for
off-policy correction, so it is returned with the decision.

A policy object is immutable: hot reload builds a new one and swaps the reference.

>>> import numpy as np, torch
>>> from memento.qnet import QNetwork
>>> from memento.schemas import Case
>>> from memory_store import CaseBank
>>> bank = CaseBank(None, dim=4)
>>> unit = lambda i: [1.0 if j == i else 0.0 for j in range(4)]
>>> _ = bank.add([Case(f"c{i}", unit(i), f"item{i}", unit(i), 1.0, 0.0) for i in range(3)])
>>> torch.manual_seed(0) and None
>>> policy = RetrievalPolicy(QNetwork(4, 8), version=7, bank=bank, options=PolicyOptions(top_k=2))
>>> d = policy.recommend(np.array(unit(1), np.float32), np.random.default_rng(0))
>>> d.case_ids[0], len(d.case_ids), d.policy_version
('c1', 2, 7)
>>> 0.0 < d.propensity <= 1.0 and abs(float(d.probs.sum()) - 1.0) < 1e-5
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from memento.checkpoint import PolicyParams
from memento.qnet import FrozenQ, QNetwork
from memento.config import (DEFAULT_ALPHA, DEFAULT_MIN_PROB, DEFAULT_OWN_CASES, DEFAULT_SIMILARITY_PRIOR, DEFAULT_TOP_K,
                            DEFAULT_VOTE_PRIOR)
from memento.options import option
from memento.personal import UserMemory
from memento.priors import RetrievalPrior, check_prior_mix
from memento.softq import entropy_numpy, own_recency, policy_logits_numpy, probs_from_logits_numpy, retrieval_prior_numpy

__all__ = ["PolicyOptions", "Decision", "RetrievalPolicy", "NoCandidatesError"]


# the options a checkpoint carries (every PolicyParams field), which replace serving's flags
_FROM_CHECKPOINT = tuple(f.name for f in dataclasses.fields(PolicyParams))


class NoCandidatesError(LookupError):
    """The case bank returned no case for the state (the bank is empty)."""


@dataclass(frozen=True)
class PolicyOptions:
    """How serving turns Q values into a choice.

    ``top_k``, ``alpha`` and ``min_prob`` define μ, which the learner assumed when it trained the
    network; a checkpoint carries them (:class:`memento.checkpoint.PolicyParams`) and
    :meth:`for_checkpoint` adopts them, so serving's own values only count until a checkpoint
    that carries them is loaded.

    Parameters
    ----------
    top_k
        Number of nearest cases μ chooses among; must equal the learner's K so that μ and the
        TD target's soft value range over the same candidate set.
    alpha
        Temperature of μ = softmax(Q/α): small α is greedy in Q, large α is uniform.
    min_prob
        Floor on each candidate's probability (keeps every propensity away from 0 so that
        off-policy weights 1/μ stay bounded).
    similarity_prior, vote_prior
        Weights β and w of the retrieval prior: μ ∝ softmax(β·cos(s, c_state) + w·log(1 + V(c)))·exp(Q/α),
        V(c) what the retrieved cases that led to c's item paid (:func:`memento.softq.retrieval_prior`;
        0 = none).
    priors
        When not empty, μ mixes several retrieval priors instead of the one above: ``(β, w,
        share)`` or ``(β, w, ρ, share)`` each (:mod:`memento.priors`; ρ weighs the user's own
        recent items); a request's prior is drawn with probability ``share``, then its case
        from μ under that prior, and the propensity is the mixture's, Σ share·μ_prior(c|s). Set
        by the learner's checkpoints.
    own_cases
        The user's own newest cases (one per distinct recent item) added to the ``top_k``
        nearest as candidates, and how many recent items the recency term ranks
        (:mod:`memento.personal`); 0 = none. Serving's own option: the learner does not keep
        users' histories.
    seed
        Seed of the sampling generator (one per serving process; worker i uses seed + i).
    """

    top_k: int = option(DEFAULT_TOP_K, "nearest cases μ chooses among until a checkpoint sets it; also the K "
                        "the bank's IVF probes are tuned for (flag unset: settings' top_k, env MEMENTO_TOP_K)")
    alpha: float = option(DEFAULT_ALPHA, "temperature of μ = softmax(Q/α) until a checkpoint sets it")
    min_prob: float = option(DEFAULT_MIN_PROB, "floor on each candidate's probability until a checkpoint sets it")
    similarity_prior: float = option(DEFAULT_SIMILARITY_PRIOR, "weight β of nearness in the retrieval prior "
                                     "softmax(β·cos(s, c_state) + w·log(1 + V(c))) until a checkpoint sets it; 0 = none")
    vote_prior: float = option(DEFAULT_VOTE_PRIOR, "weight w of the neighbours' vote V(c) in the retrieval prior "
                               "until a checkpoint sets it; 0 = none")
    priors: tuple[tuple[float, ...], ...] = option((), "retrieval priors μ mixes (set by checkpoints)")
    own_cases: int = option(DEFAULT_OWN_CASES, "the user's own newest cases (one per distinct recent item) added "
                            "to the nearest as candidates, and the recent items the recency term ranks; 0 = none")
    seed: int = option(0, "seed of the sampling generator (worker i uses seed + i)")

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.own_cases < 0:
            raise ValueError(f"own_cases must be >= 0, got {self.own_cases}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")
        for name in ("similarity_prior", "vote_prior"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "priors", check_prior_mix(self.priors))

    def prior_mix(self) -> list[tuple[RetrievalPrior, float]]:
        """The priors μ samples from, with their shares: :attr:`priors`, or else the single
        prior of ``similarity_prior`` and ``vote_prior`` with share 1.

        >>> [(p.key, s) for p, s in PolicyOptions(vote_prior=20.0).prior_mix()]
        [('0:20', 1.0)]
        """
        if not self.priors:
            return [(RetrievalPrior(self.similarity_prior, self.vote_prior), 1.0)]
        return [RetrievalPrior.from_entry(entry) for entry in self.priors]

    def for_checkpoint(self, params: PolicyParams | None) -> "PolicyOptions":
        """These options with μ's α, floor, K and prior weights taken from a checkpoint's
        ``params`` (the seed stays); unchanged when the checkpoint does not carry them (None).

        >>> flags = PolicyOptions(top_k=16, alpha=0.1, min_prob=0.01, seed=3)
        >>> flags.for_checkpoint(PolicyParams(alpha=0.37, min_prob=0.0, top_k=8, similarity_prior=5.0))
        PolicyOptions(top_k=8, alpha=0.37, min_prob=0.0, similarity_prior=5.0, vote_prior=0.0, priors=(), own_cases=16, seed=3)
        >>> flags.for_checkpoint(None) is flags
        True
        """
        if params is None:
            return self
        return dataclasses.replace(self, **{name: getattr(params, name) for name in _FROM_CHECKPOINT})

    def overridden_by(self, params: PolicyParams | None) -> dict[str, tuple]:
        """The options a checkpoint's ``params`` set to another value: name → (this, checkpoint's).

        >>> PolicyOptions(top_k=16, alpha=0.1, min_prob=0.01, vote_prior=0.0).overridden_by(PolicyParams(0.37, 0.01, 16))
        {'alpha': (0.1, 0.37)}
        """
        if params is None:
            return {}
        return {name: (getattr(self, name), getattr(params, name))
                for name in _FROM_CHECKPOINT if getattr(self, name) != getattr(params, name)}


@dataclass(frozen=True)
class Decision:
    """One sampled choice with everything needed to explain and log it.

    Arrays are over the valid candidates only, in search order (most similar first).
    """

    state: np.ndarray          # [D] the state s the policy saw
    case_ids: list[str]        # [n]
    similarities: np.ndarray   # [n] cosine of s with each case's state
    features: np.ndarray       # [n, 2D+1] case feature vectors
    q: np.ndarray              # [n] Q(s, c)
    probs: np.ndarray          # [n] μ(c|s)
    chosen: int                # index of the sampled case
    policy_version: int
    entropy: float = field(default=0.0)
    prior: str | None = None   # key of the retrieval prior the case was drawn under, when μ mixes several
    # μ's logits under that prior [n]: ranked()'s order, which probabilities lose where they
    # tie at the floor or underflow (with a sharp prior, past the first few candidates)
    logits: np.ndarray | None = None

    @property
    def case_id(self) -> str:
        return self.case_ids[self.chosen]

    @property
    def propensity(self) -> float:
        return float(self.probs[self.chosen])

    @property
    def case_features(self) -> np.ndarray:
        return self.features[self.chosen]

    def ranked(self) -> list[int]:
        """Candidate indices: the chosen one first, then in μ's order under the prior the
        choice was drawn from (decreasing logits; decreasing probability without them)."""
        scores = self.probs if self.logits is None else self.logits
        order = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) != self.chosen]
        return [self.chosen] + order


class RetrievalPolicy:
    """Soft-Q retrieval policy over a case bank.

    Parameters
    ----------
    net
        The Q network (frozen: serving never trains it).
    version
        Policy version announced by the learner.
    bank
        The case bank (``memory_store.CaseBank``); only ``search_with_features`` is used.
    options
        Sampling options.
    """

    def __init__(self, net: QNetwork, version: int, bank, options: PolicyOptions | None = None):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._frozen = FrozenQ(self.net)  # the same function, without torch's per-call overhead
        self.version = int(version)
        self.bank = bank
        self.options = options or PolicyOptions()

    def _scores(self, states: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Q values [B, K] of the candidates (padding included); subclasses may score differently."""
        return self._frozen(states, features)

    def recommend(self, state: np.ndarray, rng: np.random.Generator) -> Decision:
        """Retrieve, score and sample for one state; raises :class:`NoCandidatesError` on an
        empty bank."""
        decision = self.recommend_many(np.asarray(state, np.float32).reshape(1, -1), rng)[0]
        if decision is None:
            raise NoCandidatesError("the case bank has no case to choose from")
        return decision

    def recommend_many(self, states: np.ndarray, rng: np.random.Generator,
                       memories: list[UserMemory | None] | None = None,
                       recent: tuple[np.ndarray, np.ndarray] | None = None) -> list[Decision | None]:
        """One decision per row of ``states`` [B, D], from one bank search and one forward pass
        of the Q network for the whole batch; ``None`` for a row with no candidate.

        ``memories`` (one per row, :func:`memento.personal.user_memory`) add each user's own
        newest cases to the nearest ones; ``recent`` (:func:`memento.personal.recent_vectors` of
        the same memories) feeds the priors' recency term."""
        states = np.ascontiguousarray(states, dtype=np.float32)
        if states.ndim != 2:
            raise ValueError(f"states must be [B, D], got shape {states.shape}")
        ids, scores, features, mask = self.bank.search_with_features(states, self.options.top_k)
        if memories is not None and self.options.own_cases:
            own = [() if m is None else m.case_ids[:self.options.own_cases] for m in memories]
            ids, scores, features, mask = self.bank.append_cases(states, ids, scores, features, mask, own)
        return self._decide(states, ids, scores, features, mask, rng, recent)

    def decide(self, state: np.ndarray, case_ids: list[str], similarities: np.ndarray,
               features: np.ndarray, rng: np.random.Generator,
               recent: tuple[np.ndarray, np.ndarray] | None = None) -> Decision:
        """Score already retrieved candidates with Q and sample one from μ (``recent``: the
        user's recent item vectors [R, D] and their mask [R], for the recency term)."""
        n = len(case_ids)
        if n == 0:
            raise NoCandidatesError("the case bank has no case to choose from")
        state = np.ascontiguousarray(state, dtype=np.float32).reshape(1, -1)
        feats = np.ascontiguousarray(features[:n], dtype=np.float32)[None]
        sims = np.asarray(similarities[:n], dtype=np.float32)[None]
        if recent is not None:
            recent = (recent[0][None], recent[1][None])
        return self._decide(state, [list(case_ids)], sims, feats, np.ones((1, n), bool), rng, recent)[0]

    def _decide(self, states: np.ndarray, id_lists: list[list[str]], similarities: np.ndarray,
                features: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                recent: tuple[np.ndarray, np.ndarray] | None = None) -> list[Decision | None]:
        # Valid candidates come first in every row (best first) and padding after.
        feats = np.ascontiguousarray(features, dtype=np.float32)
        q_np = self._scores(states, feats)
        mix = self.options.prior_mix()
        own = own_recency(feats, *recent) if recent is not None and any(p.recency for p, _ in mix) else None
        # μ under each prior [P, B, K]; the mixture's marginal is what a propensity must be
        logits = np.stack([policy_logits_numpy(
            q_np, self.options.alpha, mask,
            retrieval_prior_numpy(states, feats, prior.similarity, prior.vote, mask, prior.recency, own))
            for prior, _ in mix])
        per_prior = np.stack([probs_from_logits_numpy(z, self.options.min_prob, mask).astype(np.float64)
                              for z in logits])
        shares = np.array([share for _, share in mix])
        marginal = per_prior[0] if len(mix) == 1 else np.tensordot(shares, per_prior, axes=1)
        ent = entropy_numpy(marginal).tolist()
        draws = rng.random(len(states))
        # drawn only when there is a choice of prior, so a single prior samples as it always did
        prior_draws = rng.random(len(states)) if len(mix) > 1 else np.zeros(len(states))
        out: list[Decision | None] = []
        for b, case_ids in enumerate(id_lists):
            n = len(case_ids)
            if n == 0:
                out.append(None)
                continue
            k = min(int(np.searchsorted(np.cumsum(shares), prior_draws[b], side="right")), len(mix) - 1)
            drawn = per_prior[k, b, :n] / per_prior[k, b, :n].sum()
            chosen = min(int(np.searchsorted(np.cumsum(drawn), draws[b], side="right")), n - 1)
            probs = marginal[b, :n] / marginal[b, :n].sum()
            out.append(Decision(state=states[b].copy(), case_ids=list(case_ids),
                                similarities=np.array(similarities[b, :n], copy=True),
                                features=feats[b, :n].copy(), q=q_np[b, :n].copy(), probs=probs,
                                chosen=chosen, policy_version=self.version, entropy=float(ent[b]),
                                prior=mix[k][0].key if len(mix) > 1 else None,
                                logits=logits[k, b, :n].copy()))
        return out
