"""The policies ``memento eval`` compares, each a small class behind :class:`EvalPolicy`.

For every request the evaluation retrieves the ``top_k`` cases nearest to the user's state (the
same bank search serving does) and hands them to the policy as a :class:`Request`; the policy
answers a :class:`Choice`: a ranked list of distinct items, the first being the
recommendation, the candidate case it chose (case policies) and the probability it gave that
choice. When a reward window closes, the policies that learn get the transition, exactly what
the learner process would consume.

* ``random`` — a uniformly random item of the catalogue.
* ``popularity`` — the items with the most reward so far (all users), most popular first.
* ``cosine`` — plain RAG: the nearest case's item, then the next nearest cases' items.
* ``greedy-q`` — Memento's parametric memory: a success classifier P(r > 0 | s, c) on the same
  network architecture (γ = 0, binary cross-entropy), argmax over the candidates.
* ``linucb`` — a contextual bandit: LinUCB with one linear model shared by all candidate cases
  over the features of (s, c). River's ``LinUCBDisjoint`` keeps one model per arm over a fixed
  arm set; here the arms are the retrieved cases and change with every request, so the shared
  (Li et al. 2010, eq. 6 without the disjoint part) form is written here.
* ``softq`` — the product: :class:`serving.policy.RetrievalPolicy` (μ = softmax(Q/α) with the
  probability floor, sampled) trained by :class:`learner.trainer.SoftQLearner` in the learner
  process's training loop (:class:`learner.loop.TrainingLoop`: replay buffer, learning starts,
  updates per transition, a new policy version every ``publish_every`` updates); a new
  version samples the μ its checkpoint would carry (the learner's α, floor and K, raised by
  the reward-drift detector's exploration boost, :mod:`learner.drift`), as a serving reload does.

The industry baselines ``recent``, ``itemknn`` and ``vw`` (Vowpal Wabbit's ``--cb_explore_adf``)
live in :mod:`evaluation.baselines`.

>>> import numpy as np
>>> req = Request("u", 0.0, np.ones(2, np.float32), ["c1", "c2"], np.array([0.9, 0.5]),
...               np.zeros((2, 5), np.float32), ["7", "8"], ["9"])
>>> CosinePolicy().choose(req, np.random.default_rng(0)).items
['7', '8', '9']
"""

from __future__ import annotations

import abc
import copy
import heapq
from collections import Counter
from itertools import chain
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from learner.candidates import with_candidates
from learner.drift import DriftConfig, RewardDrift
from learner.loop import TrainingLoop, replay_buffer
from learner.service import LearnerServiceConfig
from learner.storage import ReplayTransition
from learner.trainer import SoftQConfig, SoftQLearner
from memento.encoder import case_item, case_outcome, case_state
from memento.qnet import QNetwork
from memento.schemas import Transition
from serving.generator import first_distinct
from serving.policy import PolicyOptions, RetrievalPolicy

__all__ = ["Request", "Choice", "EvalPolicy", "RandomPolicy", "PopularityPolicy", "CosinePolicy",
           "GreedyQPolicy", "LinUCBPolicy", "SoftQPolicy", "POLICY_NAMES", "items_in_order"]

POLICY_NAMES = ("random", "popularity", "cosine", "greedy-q", "linucb", "softq", "recent", "itemknn", "vw")


@dataclass(frozen=True)
class Request:
    """One recommendation request with its retrieved candidates.

    Parameters
    ----------
    user_id, ts
        Who asks, and when (event time).
    state
        The user's state s, ``[D]``; any float array, kept as C-contiguous float32.
    case_ids, similarities, features, case_items
        The ``top_k`` nearest cases, most similar first: ids, cosine with s, feature vectors
        ``[n, 2D+1]`` (kept as C-contiguous float32) and items.
    extra_items
        Items of the next nearest cases beyond the top K, nearest first (to fill a list).
    recent
        The user's recent distinct items' vectors [R, D], newest first, and their mask [R]
        (:func:`memento.personal.recent_vectors`): the recency term of softq's prior; None: none.

    States and case features are float32 everywhere (the Q networks' dtype); a request is where
    every policy reads them, so a float64 state from any source is converted here once.
    """

    user_id: str
    ts: float
    state: np.ndarray
    case_ids: list[str]
    similarities: np.ndarray
    features: np.ndarray
    case_items: list[str]
    extra_items: list[str] = field(default_factory=list)
    recent: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self):
        object.__setattr__(self, "state", np.ascontiguousarray(self.state, dtype=np.float32))
        object.__setattr__(self, "features", np.ascontiguousarray(self.features, dtype=np.float32))


@dataclass(frozen=True)
class Choice:
    """A policy's answer.

    Parameters
    ----------
    items
        Distinct items, best first; ``items[0]`` is recommended.
    case_index
        The chosen candidate (index into the request's cases), None for item policies.
    propensity
        Probability with which the policy made this choice (1 for a deterministic policy).
    distribution
        π(item | s) over the items the policy may recommend; None means uniform over
        ``catalogue_size`` items.
    catalogue_size
        Size of the catalogue (for a uniform distribution).
    greedy_item
        The item the policy ranks best, when it samples its recommendation (softq: the item of
        μ's most probable candidate: the argmax of Q/α plus the prior); None when ``items[0]``
        is already its best. The simulator reports
        its expected reward beside the sampled one, separating ranking from exploration cost.
    prior
        The retrieval prior the choice was drawn under, when the policy mixes several (softq;
        :mod:`memento.priors`), carried by the recommendation; None otherwise.
    """

    items: list[str]
    case_index: int | None
    propensity: float
    distribution: dict[str, float] | None
    catalogue_size: int = 0
    greedy_item: str | None = None
    prior: str | None = None

    def prob_of(self, item: str) -> float:
        """π(item | s): the probability that the policy recommends ``item``."""
        if self.distribution is None:
            return 1.0 / self.catalogue_size
        return min(1.0, self.distribution.get(item, 0.0))  # a per-item sum may round above 1

    def expectation(self, value: Callable[[str], float], catalogue: Sequence[str]) -> float:
        """Σ_a π(a | s)·value(a)."""
        if self.distribution is None:
            return float(np.mean([value(a) for a in catalogue]))
        return float(sum(p * value(a) for a, p in self.distribution.items()))


def items_in_order(request: Request, order: Sequence[int], list_size: int) -> list[str]:
    """Distinct items of the candidates in ``order``, then of the next nearest cases: the rule
    of :class:`serving.generator.CaseItemGenerator` (:func:`serving.generator.first_distinct`)."""
    return first_distinct(chain((request.case_items[int(i)] for i in order), request.extra_items), list_size)


def _deterministic(items: list[str]) -> dict[str, float]:
    return {items[0]: 1.0}


class EvalPolicy(abc.ABC):
    """A retrieval or recommendation policy under evaluation. Subclasses implement
    :meth:`_choose`; learning policies also override :meth:`learn`."""

    name = ""

    def choose(self, request: Request, rng: np.random.Generator, list_size: int = 10) -> Choice:
        """A ranked list of at most ``list_size`` distinct items for ``request``."""
        choice = self._choose(request, rng, list_size)
        if not choice.items or len(set(choice.items)) != len(choice.items):
            raise RuntimeError(f"policy {self.name!r} returned {choice.items!r}: the list must be "
                               f"non-empty and without repeats")
        return choice

    @abc.abstractmethod
    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice: ...

    def observe(self, user_id: str, item_id: str, reward: float) -> None:
        """An action seen in the stream (organic or a response), with its reward weight."""

    def learn(self, transitions: Sequence[Transition]) -> None:
        """Transitions whose reward windows just closed."""

    def stats(self) -> dict[str, float]:
        """Training figures to report (updates, policy versions)."""
        return {}


class RandomPolicy(EvalPolicy):
    """A uniformly random list of catalogue items.

    Parameters
    ----------
    catalogue
        The items to draw from.
    """

    name = "random"

    def __init__(self, catalogue: Sequence[str]):
        if not catalogue:
            raise ValueError("random policy: the catalogue is empty")
        self.catalogue = list(catalogue)

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        n = len(self.catalogue)
        picks = rng.choice(n, size=min(list_size, n), replace=False)
        return Choice([self.catalogue[int(i)] for i in picks], None, 1.0 / n, None, n)


class PopularityPolicy(EvalPolicy):
    """The items with the most reward so far over all users (ties: seen first ranks first);
    random catalogue items until anything was seen.

    Parameters
    ----------
    catalogue
        Fallback items.
    """

    name = "popularity"

    def __init__(self, catalogue: Sequence[str]):
        self.catalogue = list(catalogue)
        self.totals: Counter[str] = Counter()
        self._first_seen: dict[str, int] = {}

    def observe(self, user_id: str, item_id: str, reward: float) -> None:
        self._first_seen.setdefault(item_id, len(self._first_seen))
        self.totals[item_id] += reward

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        top = heapq.nsmallest(list_size, self.totals, key=lambda i: (-self.totals[i], self._first_seen[i]))
        if len(top) < list_size:
            rest = [i for i in self.catalogue if i not in self.totals]
            if rest:
                picks = rng.choice(len(rest), size=min(len(rest), list_size - len(top)), replace=False)
                top += [rest[int(i)] for i in picks]
        return Choice(top, None, 1.0, _deterministic(top))


class CosinePolicy(EvalPolicy):
    """Plain RAG: the nearest case's item first, then the next nearest cases' items."""

    name = "cosine"

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        items = items_in_order(request, range(len(request.case_ids)), list_size)
        return Choice(items, 0 if request.case_ids else None, 1.0, _deterministic(items))


class _TrainedCasePolicy(EvalPolicy):
    """A case policy trained from replayed transitions in the learner process's training loop
    (:class:`learner.loop.TrainingLoop`). The evaluation has no wall clock: a version is
    published exactly every ``publish_every`` successful updates (``publish_min_interval_s``
    does not apply).

    Parameters
    ----------
    bank
        The evaluation's case bank (candidates of s and s′ for each transition).
    state_dim
        Dimension of states and item vectors.
    top_k
        Candidates per state.
    pacing
        Buffer size, learning starts, updates per transition, ``publish_every``.
    seed
        Seeds the buffer's sampler.
    """

    #: Whether training reads the candidates of s and s′ (the soft value does); without, replay
    #: rows hold none and no bank search is made for them.
    needs_candidates = True

    def __init__(self, bank, state_dim: int, top_k: int, pacing: LearnerServiceConfig, seed: int):
        self.bank, self.state_dim, self.top_k, self.pacing = bank, state_dim, top_k, pacing
        self.loop = TrainingLoop(replay_buffer(pacing, state_dim, top_k if self.needs_candidates else 0, seed), pacing)  # no clock

    @property
    def versions(self) -> int:
        """Policy versions published so far."""
        return self.loop.published

    def _replay_rows(self, transitions: Sequence[Transition]) -> list[ReplayTransition]:
        if self.needs_candidates:
            return with_candidates(transitions, self.bank, self.top_k)
        f = 2 * self.state_dim + 1
        none, no_mask = np.zeros((0, f), np.float32), np.zeros(0, bool)
        return [ReplayTransition(t.transition_id, np.asarray(t.state, np.float32),
                                 np.asarray(t.case_features, np.float32), t.reward, t.done, t.propensity,
                                 np.asarray(t.next_state, np.float32), none, no_mask, none, no_mask)
                for t in transitions]

    def learn(self, transitions: Sequence[Transition]) -> None:
        self.loop.add(self._replay_rows(transitions), on_new=lambda i: self._new_transition(transitions[i]))
        self.loop.step(self._update, self._publish, batch_size=self._batch_size())

    def _new_transition(self, transition: Transition) -> None:
        """A transition the buffer had not seen (for what a policy learns outside the buffer)."""

    @abc.abstractmethod
    def _batch_size(self) -> int: ...

    @abc.abstractmethod
    def _update(self, batch) -> np.ndarray | None:
        """One gradient step; the absolute errors per row, or None when it was skipped."""

    @abc.abstractmethod
    def _publish(self) -> bool:
        """Make the trained network the one that serves, as version ``self.versions + 1``;
        False when it refuses (retried after the next update)."""

    def stats(self) -> dict[str, float]:
        return {"updates": float(self.loop.updates), "skipped_updates": float(self.loop.skipped),
                "policy_versions": float(self.versions)}


class SoftQPolicy(_TrainedCasePolicy):
    """μ = softmax(Q/α) over the candidates, sampled, as serving does; Q trained by soft
    Q-learning as the learner process does. See :class:`_TrainedCasePolicy` for the parameters;
    ``config`` holds the soft-Q hyperparameters and ``min_prob``/``alpha`` of μ; ``drift`` the
    reward-drift detector's options (None or ``drift_detector="off"``: no detector), wired as in
    the learner process."""

    name = "softq"

    def __init__(self, bank, state_dim: int, config: SoftQConfig, pacing: LearnerServiceConfig,
                 drift: DriftConfig | None = None):
        super().__init__(bank, state_dim, config.top_k, pacing, config.seed)
        self.loop.drift = RewardDrift.from_config(drift)
        self.learner = SoftQLearner(state_dim, config, drift=self.loop.drift)
        self.options = PolicyOptions(top_k=config.top_k, alpha=config.alpha, min_prob=config.min_prob,
                                     similarity_prior=config.similarity_prior, vote_prior=config.vote_prior)
        # version 0 already mixes the priors evenly, as the learner's first checkpoint does
        self.policy = RetrievalPolicy(copy.deepcopy(self.learner.q_net), 0, bank,
                                      self.options.for_checkpoint(self.learner.policy_params()))

    def _batch_size(self) -> int:
        return self.learner.config.batch_size

    def _new_transition(self, transition: Transition) -> None:
        self.learner.observe_priors([transition])

    def _update(self, batch) -> np.ndarray | None:
        if self.learner.update(batch)["skipped"]:
            return None
        return self.learner.last_td_errors

    def _publish(self) -> bool:
        if not self.learner.healthy:  # the learner refuses to write such a checkpoint
            return False
        # serving's reload path: μ's α, floor and K are what the checkpoint carries
        options = self.options.for_checkpoint(self.learner.policy_params())
        self.policy = RetrievalPolicy(copy.deepcopy(self.learner.q_net), self.versions + 1, self.bank, options)
        return True

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        decision = self.policy.decide(request.state, request.case_ids, request.similarities,
                                      request.features, rng, request.recent)
        items = items_in_order(request, decision.ranked(), list_size)
        by_item: dict[str, float] = {}
        for item, p in zip(request.case_items, decision.probs):
            by_item[item] = by_item.get(item, 0.0) + float(p)
        return Choice(items, decision.chosen, decision.propensity, by_item,
                      greedy_item=request.case_items[int(np.argmax(decision.probs))], prior=decision.prior)

    def stats(self) -> dict[str, float]:
        drift = self.loop.drift
        out = super().stats()
        if drift is not None:
            out.update(drift_detections=float(drift.detections), drift_suppressed=float(drift.suppressed))
        if self.policy.options.priors:   # the last published share of each retrieval prior
            out.update({f"prior_share[{prior.key}]": share for prior, share in self.policy.options.prior_mix()})
        return out


class GreedyQPolicy(_TrainedCasePolicy):
    """Memento's parametric case memory: a classifier of success P(r > 0 | s, c) with the Q
    network's architecture, trained with binary cross-entropy (no bootstrapping, γ = 0), and
    the argmax case chosen.

    Parameters
    ----------
    bank, state_dim, top_k, pacing
        As :class:`_TrainedCasePolicy`.
    network, lr, batch_size, seed
        The Q network's options (softq's, :meth:`learner.trainer.SoftQConfig.network`), Adam
        learning rate, batch size and seed.
    """

    name = "greedy-q"
    needs_candidates = False  # γ = 0: no soft value over the candidates of s′

    def __init__(self, bank, state_dim: int, top_k: int, pacing: LearnerServiceConfig, *,
                 network: dict | None = None, lr: float = 1e-3, batch_size: int = 64, seed: int = 1):
        super().__init__(bank, state_dim, top_k, pacing, seed)
        torch.manual_seed(seed)
        self.net = QNetwork(state_dim, **(network or {}))
        # foreach: the same arithmetic as the default per-parameter loop, in fewer calls
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, foreach=True)
        self.batch_size = batch_size
        self.serving_net = copy.deepcopy(self.net).eval()

    def _batch_size(self) -> int:
        return self.batch_size

    def _update(self, batch) -> np.ndarray | None:
        state = torch.as_tensor(batch.state)
        case = torch.as_tensor(batch.case_features).unsqueeze(1)
        label = torch.as_tensor(batch.reward > 0, dtype=torch.float32)
        logits = self.net(state, case).squeeze(1)
        loss = (torch.as_tensor(batch.weights) * F.binary_cross_entropy_with_logits(
            logits, label, reduction="none")).mean()
        if not torch.isfinite(loss):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
        self.optimizer.step()
        return (torch.sigmoid(logits.detach()) - label).abs().numpy()

    def _publish(self) -> bool:
        self.serving_net = copy.deepcopy(self.net).eval()
        return True

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        with torch.inference_mode():
            scores = self.serving_net(torch.as_tensor(request.state)[None],
                                      torch.as_tensor(request.features)[None])[0].numpy()
        order = np.argsort(-scores, kind="stable")
        items = items_in_order(request, order, list_size)
        return Choice(items, int(order[0]), 1.0, _deterministic(items))


class LinUCBPolicy(EvalPolicy):
    """LinUCB with one linear reward model over the features of each (s, c) pair:
    ``x = [s ⊙ c_state, s ⊙ c_item, outcome, 1]``; choose argmax θᵀx + α·sqrt(xᵀA⁻¹x), with
    A = λI + Σ x xᵀ and θ = A⁻¹ Σ r x (A⁻¹ kept by Sherman–Morrison updates).

    Parameters
    ----------
    state_dim
        Dimension of states and item vectors.
    alpha
        Width of the confidence bonus.
    ridge
        λ of the ridge prior.
    """

    name = "linucb"

    def __init__(self, state_dim: int, alpha: float = 1.0, ridge: float = 1.0):
        if alpha < 0 or ridge <= 0:
            raise ValueError(f"linucb needs alpha >= 0 and ridge > 0, got alpha={alpha}, ridge={ridge}")
        self.d = state_dim
        self.alpha = alpha
        n = 2 * state_dim + 2
        self.a_inv = np.eye(n) / ridge
        self.b = np.zeros(n)
        self.updates = 0

    def _x(self, state: np.ndarray, cases: np.ndarray) -> np.ndarray:
        cases = np.atleast_2d(cases).astype(np.float64)
        s = np.asarray(state, np.float64)
        return np.concatenate([case_state(cases) * s, case_item(cases) * s, case_outcome(cases)[:, None],
                               np.ones((len(cases), 1))], axis=1)

    def _choose(self, request: Request, rng: np.random.Generator, list_size: int) -> Choice:
        x = self._x(request.state, request.features)
        theta = self.a_inv @ self.b
        bonus = np.sqrt(np.einsum("ij,jk,ik->i", x, self.a_inv, x).clip(min=0.0))
        order = np.argsort(-(x @ theta + self.alpha * bonus), kind="stable")
        items = items_in_order(request, order, list_size)
        return Choice(items, int(order[0]), 1.0, _deterministic(items))

    def learn(self, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            x = self._x(np.asarray(t.state), np.asarray(t.case_features))[0]
            ax = self.a_inv @ x
            self.a_inv -= np.outer(ax, ax) / (1.0 + x @ ax)
            self.b += t.reward * x
            self.updates += 1

    def stats(self) -> dict[str, float]:
        return {"updates": float(self.updates)}
