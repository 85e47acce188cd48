"""Which retrieval prior μ uses: several priors, each request's drawn by Thompson sampling.

μ's retrieval prior π0 (:func:`memento.softq.retrieval_prior`) says how the retrieved cases
rank themselves before Q has learned anything: by nearness (plain RAG's choice), by the user's
own recent items (on data where users come back to what they just had; :mod:`memento.personal`)
or by the neighbours' vote (a k-nearest-neighbour estimate over all K candidates: on data where
similar users' outcomes say what pays). Which one pays depends on the data, and a fixed choice
serves one kind and loses on the other (docs/evaluation.md has both).

So μ may hold several priors and choose among them from the rewards, the way one chooses among
models online: each prior is an arm of a discounted Gaussian Thompson sampler.
Every request draws a prior with probability ``share``, then a case from μ under that prior; the
recommendation names the prior, and its reward, when the window closes, is that prior's
evidence (an on-policy sample of its value: no importance weight is needed). The learner
computes the shares (the probability that each prior has the largest mean reward under the
posterior, floored at ``min_share``), publishes them in each checkpoint
(:class:`memento.checkpoint.PolicyParams`), and serving mixes exactly those shares, logging the
marginal μ(c|s) = Σ_k share_k·μ_k(c|s) as the propensity.

Older evidence is discounted (``half_life`` transitions), because the priors' values change as Q
learns and as the bank fills: a prior that lost early is tried again once its evidence has faded.

>>> priors = parse_priors("0:20,1000:0")
>>> [p.key for p in priors]
['0:20', '1000:0']
>>> selector = PriorSelector(priors, half_life=1000, min_share=0.02, seed=0)
>>> selector.shares().round(2).tolist()            # no evidence yet: even
[0.5, 0.5]
>>> for _ in range(300):
...     _ = selector.observe("0:20", 0.0); _ = selector.observe("1000:0", 1.0)
>>> selector.shares().round(2).tolist()            # the second pays: it gets all but the floor
[0.02, 0.98]
>>> selector.observe("5:5", 1.0)                   # a prior this learner does not have
False
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RetrievalPrior", "parse_priors", "PriorSelector", "check_prior_mix", "MAX_PRIORS"]

#: Most priors one policy may mix (bounds checkpoint metadata and serving's work per request).
MAX_PRIORS = 8


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class RetrievalPrior:
    """The weights of one retrieval prior π0 = softmax(``similarity``·cos(s, c_state) +
    ``vote``·log(1 + V(c)) + ``recency``·R(c)) (:func:`memento.softq.retrieval_prior`; R is the
    user's own recent items, :func:`memento.softq.own_recency`); all 0 is no prior.

    >>> RetrievalPrior(1000.0, 0.0).key, RetrievalPrior.parse(" 0.5 : 20 ")
    ('1000:0', RetrievalPrior(similarity=0.5, vote=20.0, recency=0.0))
    >>> RetrievalPrior.parse("1000:0:1000").key
    '1000:0:1000'
    >>> RetrievalPrior.parse("20")
    Traceback (most recent call last):
    ...
    ValueError: a retrieval prior is 'similarity:vote' or 'similarity:vote:recency' (numbers >= 0, e.g. 1000:0), got '20'
    """

    similarity: float = 0.0
    vote: float = 0.0
    recency: float = 0.0

    def __post_init__(self):
        for name in ("similarity", "vote", "recency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (math.isfinite(value) and value >= 0):
                raise ValueError(f"retrieval prior {name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def key(self) -> str:
        """``similarity:vote``, or ``similarity:vote:recency`` when it has a recency term: how
        recommendations name the prior they were drawn under."""
        key = f"{_number_text(self.similarity)}:{_number_text(self.vote)}"
        return key + f":{_number_text(self.recency)}" if self.recency else key

    @classmethod
    def parse(cls, text: str) -> "RetrievalPrior":
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            return cls(*(float(part) for part in parts))
        except ValueError:
            raise ValueError(f"a retrieval prior is 'similarity:vote' or 'similarity:vote:recency' (numbers "
                             f">= 0, e.g. 1000:0), got {text.strip()!r}") from None

    def entry(self, share: float) -> tuple[float, ...]:
        """This prior and its share as a checkpoint's mix holds it: ``(β, w, share)``, or
        ``(β, w, ρ, share)`` with a recency term (so older readers still read the others)."""
        weights = (self.similarity, self.vote, self.recency) if self.recency else (self.similarity, self.vote)
        return weights + (float(share),)

    @classmethod
    def from_entry(cls, entry) -> tuple["RetrievalPrior", float]:
        """The prior and share of one mix entry (:meth:`entry`'s inverse)."""
        return cls(*entry[:-1]), entry[-1]


def parse_priors(text: str) -> tuple[RetrievalPrior, ...]:
    """Comma-separated ``similarity:vote[:recency]`` priors (an empty string is none); repeats refused.

    >>> parse_priors(""), len(parse_priors("0:20, 1000:0"))
    ((), 2)
    >>> parse_priors("1:1,1:1.0")
    Traceback (most recent call last):
    ...
    ValueError: retrieval prior 1:1 is listed twice
    """
    priors = tuple(RetrievalPrior.parse(part) for part in text.split(",") if part.strip())
    seen: set[str] = set()
    for prior in priors:
        if prior.key in seen:
            raise ValueError(f"retrieval prior {prior.key} is listed twice")
        seen.add(prior.key)
    if len(priors) > MAX_PRIORS:
        raise ValueError(f"at most {MAX_PRIORS} retrieval priors, got {len(priors)}")
    return priors


class PriorSelector:
    """Thompson sampling over retrieval priors, from each prior's discounted rewards.

    The posterior of a prior's mean reward is Gaussian: the discounted mean of its rewards (the
    pooled mean while it has none), with variance σ²/(n + 1), σ² the pooled variance of all
    rewards and n the prior's discounted count. A prior's share is the probability that its
    draw is the largest (estimated from ``draws`` joint draws), floored at ``min_share``.

    Parameters
    ----------
    priors
        The priors (at least one; the first is the default while nothing is known).
    half_life
        Transitions after which a reward counts half (all priors' evidence decays together;
        the learner's ``SoftQConfig.prior_half_life``).
    min_share
        Least share of every prior (keeps evidence coming for each); at most 1/len(priors)
        (``SoftQConfig.prior_min_share``).
    draws
        Joint posterior draws per :meth:`shares`.
    seed
        Seeds the draws (the shares are reproducible).
    """

    def __init__(self, priors: tuple[RetrievalPrior, ...], *, half_life: float, min_share: float,
                 draws: int = 4000, seed: int = 0):
        if not priors:
            raise ValueError("PriorSelector needs at least one prior")
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        if not 0.0 <= min_share <= 1.0 / len(priors):
            raise ValueError(f"min_share must be in [0, 1/{len(priors)}], got {min_share}")
        self.priors = tuple(priors)
        self.index = {p.key: i for i, p in enumerate(self.priors)}
        self.decay = 0.5 ** (1.0 / half_life)
        self.min_share = min_share
        self.draws = draws
        self.seed = seed
        self.count = np.zeros(len(priors))
        self.total = np.zeros(len(priors))
        self.total_sq = np.zeros(len(priors))
        self.observed = 0

    def observe(self, key: str, reward: float) -> bool:
        """One reward of the request drawn under prior ``key``; False (ignored) when this
        selector has no such prior (a recommendation served under other settings)."""
        i = self.index.get(key)
        if i is None or not math.isfinite(reward):
            return False
        for acc in (self.count, self.total, self.total_sq):
            acc *= self.decay
        self.count[i] += 1.0
        self.total[i] += reward
        self.total_sq[i] += reward * reward
        self.observed += 1
        return True

    def means(self) -> np.ndarray:
        """Each prior's discounted mean reward (the pooled mean for a prior without evidence)."""
        n = self.count.sum()
        pooled = self.total.sum() / n if n > 0 else 0.0
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1e-12), pooled)

    def shares(self) -> np.ndarray:
        """The probability of drawing each prior, floored at ``min_share`` (sums to 1)."""
        k = len(self.priors)
        if k == 1:
            return np.ones(1)
        n = self.count.sum()
        if n <= 0:
            return np.full(k, 1.0 / k)
        pooled = self.total.sum() / n
        variance = max(self.total_sq.sum() / n - pooled * pooled, 1e-6)
        rng = np.random.default_rng([self.seed, self.observed])
        draws = rng.normal(self.means(), np.sqrt(variance / (self.count + 1.0)), size=(self.draws, k))
        wins = np.bincount(draws.argmax(axis=1), minlength=k) / self.draws
        return (1.0 - k * self.min_share) * wins + self.min_share

    def state_dict(self) -> dict:
        """The evidence (numbers and lists only), for the learner's saved state."""
        return {"priors": [p.key for p in self.priors], "count": self.count.tolist(),
                "total": self.total.tolist(), "total_sq": self.total_sq.tolist(), "observed": self.observed}

    def load_state_dict(self, state: dict) -> None:
        """Restore the evidence of the priors this selector shares with ``state`` (others start
        empty, so a changed prior list keeps what still applies)."""
        for j, key in enumerate(state["priors"]):
            i = self.index.get(key)
            if i is not None:
                self.count[i], self.total[i], self.total_sq[i] = (
                    float(state["count"][j]), float(state["total"][j]), float(state["total_sq"][j]))
        self.observed = int(state["observed"])


def check_prior_mix(mix) -> tuple[tuple[float, ...], ...]:
    """Validate a mix of priors, ``((similarity, vote, share), ...)`` or with a recency weight
    before the share (:meth:`RetrievalPrior.entry`), as a checkpoint carries it
    (:class:`memento.checkpoint.PolicyParams`): at most :data:`MAX_PRIORS` distinct priors,
    shares in [0, 1] summing to 1. Returns it as a tuple of float tuples; empty is allowed (μ
    then has the single prior of ``similarity_prior``/``vote_prior``).

    >>> check_prior_mix([[0, 20, 0.75], [1000, 0, 1000, 0.25]])
    ((0.0, 20.0, 0.75), (1000.0, 0.0, 1000.0, 0.25))
    >>> check_prior_mix([[0, 20, 0.5]])
    Traceback (most recent call last):
    ...
    ValueError: policy priors: the shares must sum to 1, got 0.5
    """
    if not isinstance(mix, (list, tuple)) or len(mix) > MAX_PRIORS:
        raise ValueError(f"policy priors must be a list of at most {MAX_PRIORS} [similarity, vote, share] "
                         f"entries, got {mix!r}"[:300])
    out, keys = [], set()
    for entry in mix:
        if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4):
            raise ValueError(f"policy priors: each entry is [similarity, vote, share] or [similarity, vote, "
                             f"recency, share], got {entry!r}"[:300])
        prior, share = RetrievalPrior.from_entry(entry)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"policy priors: share of {prior.key} must be a number in [0, 1], got {share!r}")
        if prior.key in keys:
            raise ValueError(f"policy priors: {prior.key} is listed twice")
        keys.add(prior.key)
        out.append(prior.entry(share))
    if out and abs(sum(e[-1] for e in out) - 1.0) > 1e-6:
        raise ValueError(f"policy priors: the shares must sum to 1, got {sum(e[-1] for e in out):g}")
    return tuple(out)
