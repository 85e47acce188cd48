"""Soft Q-learning of the retrieval policy μ(c|s) = softmax(Q(s, c)/α) over the top-K cases.

One update (CleanRL dqn.py shape): sample a batch, compute the TD target
y = r + γ(1 − done)·α·logsumexp(Q_target(s′, ·)/α) over s′'s candidates under ``no_grad``,
regress Q(s, c) on it (MSE or Huber, or cross-entropy against its HL-Gauss histogram when Q
is a histogram's mean; optionally importance-weighted), clip gradients, step,
then Polyak-average the target network. α is fixed or tuned so that the entropy of μ tracks a
target entropy (as in discrete SAC). The entropy is that of μ(·|s′) over s′'s candidates under
the target network, whose Q values the TD target computes anyway (the candidate set of s is
only scored when importance weights are on).

Guard rail: an update whose loss, Q values, target or gradient is not finite is skipped
(nothing is stepped), counted in ``skipped_updates``, and makes the learner unhealthy; an
unhealthy learner refuses to write a checkpoint until a finite update has happened.

>>> import numpy as np
>>> from learner.buffer import ReplayBuffer, ReplayTransition
>>> buffer = ReplayBuffer.create(capacity=16, state_dim=2, top_k=2, seed=0)
>>> for i in range(16):
...     _ = buffer.add(ReplayTransition.empty(f"t{i}", state_dim=2, top_k=2, reward=1.0, done=True))
>>> learner = SoftQLearner(state_dim=2, config=SoftQConfig(batch_size=8, hidden=8, seed=0))
>>> metrics = learner.update(buffer.sample(8))
>>> metrics["skipped"], learner.healthy, learner.steps
(0.0, True, 1)
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memento.atomic import write_atomic
from learner.drift import RewardDrift
from learner.storage import ReplayBatch
from memento.checkpoint import PolicyParams, save_checkpoint
from memento.qnet import QNetwork
from memento.schemas import CheckpointAnnouncement
from memento.config import (DEFAULT_ALPHA, DEFAULT_ALTERNATIVE_PRIORS, DEFAULT_MIN_PROB, DEFAULT_SIMILARITY_PRIOR,
                            DEFAULT_TOP_K, DEFAULT_VOTE_PRIOR)
from memento.options import option
from memento.priors import PriorSelector, RetrievalPrior, parse_priors
from memento.softq import entropy, histogram_mean, histogram_target, policy_probs, retrieval_prior, td_target

__all__ = ["SoftQConfig", "SoftQLearner", "UnhealthyLearnerError"]


@dataclass(frozen=True)
class SoftQConfig:
    """Every soft-Q hyperparameter, named and documented (``help`` doubles as the CLI help)."""

    gamma: float = option(0.5, "discount γ of the TD target")
    alpha: float = option(DEFAULT_ALPHA, "temperature α of μ = softmax(Q/α) and of the soft value "
                             "(initial value when target_entropy is set)")
    target_entropy: float | None = option(None, "None keeps α fixed; a number (nats) tunes log α so "
                                              "that the entropy of μ(·|s) tracks it")
    top_k: int = option(DEFAULT_TOP_K, "number of nearest cases the policy chooses among (for s and s′)")
    tau: float = option(0.01, "Polyak rate: target ← (1−τ)·target + τ·online after each update")
    lr: float = option(1e-3, "Adam learning rate (Q network and log α)")
    batch_size: int = option(64, "transitions per gradient update")
    loss: str = option("mse", "regression loss on the TD error: 'mse' or 'huber'")
    grad_clip: float | None = option(10.0, "max global gradient norm (None = no clipping)")
    min_prob: float = option(DEFAULT_MIN_PROB, "floor of μ(c|s) per candidate (uniform mixing, as in "
                                 "memento.softq.policy_probs)")
    similarity_prior: float = option(DEFAULT_SIMILARITY_PRIOR, "weight β of nearness in the retrieval prior: "
                                   "μ ∝ softmax(β·cos(s, c_state) + w·log(1 + V(c)))·exp(Q/α), and the soft "
                                   "value is taken under it (memento.softq.retrieval_prior; 0 = none)")
    vote_prior: float = option(DEFAULT_VOTE_PRIOR, "weight w of the neighbours' vote in the retrieval prior: V(c) "
                             "is what the retrieved cases that led to c's item paid "
                             "(memento.softq.neighbour_votes; 0 = none)")
    alternative_priors: str = option(DEFAULT_ALTERNATIVE_PRIORS, "retrieval priors μ may use instead of the one above, "
                                   "'similarity:vote[:recency]', comma-separated (recency weighs the user's own recent "
                                   "items; at the TD target's s′ it is absent: the learner keeps no histories): each "
                                   "request's prior is drawn by Thompson sampling on the priors' rewards "
                                   "(memento.priors; '' = the one prior only)")
    prior_half_life: float = option(2000.0, "transitions after which a reward counts half in the choice of prior")
    prior_min_share: float = option(0.005, "least share of requests each retrieval prior keeps (when there are several)")
    importance_weight_clip: float | None = option(None, "None = no off-policy correction; else each "
                                                      "sample's loss is weighted by "
                                                      "min(μ(c|s)/propensity, this)")
    seed: int = option(1, "seed of network initialisation and sampling")
    hidden: int = option(128, "width of the Q network's hidden layers")
    wide: bool = option(True, "add a linear (wide) term over [s*c_state, s*c_item, outcome] to the MLP")
    item_buckets: int = option(4096, "hash buckets of the learned per-item embedding and bias (0 = none)")
    item_embed: int = option(8, "width of the per-item embedding fed to the MLP")
    unit_scale: bool = option(False, "scale the Q network's inputs to components of order 1 (vectors by √D, "
                                  "their element-wise products by D)")
    value_bins: int = option(0, "0: Q is a number regressed with `loss`; N > 1: Q is the mean of a "
                              "histogram over N bins trained by cross-entropy on the TD target "
                              "(HL-Gauss; `loss` is then unused)")
    value_min: float = option(0.0, "lowest value of the histogram's support (value_bins > 1)")
    value_max: float = option(10.0, "highest value of the histogram's support: at least the largest "
                                  "reward / (1 − γ) (value_bins > 1)")

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.gamma < 1.0:
            problems.append(f"gamma must be in [0, 1), got {self.gamma}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.tau <= 1.0:
            problems.append(f"tau must be in (0, 1], got {self.tau}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.loss not in ("mse", "huber"):
            problems.append(f"loss must be 'mse' or 'huber', got {self.loss!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if not 0.0 <= self.min_prob < 1.0:
            problems.append(f"min_prob must be in [0, 1), got {self.min_prob}")
        for name in ("similarity_prior", "vote_prior"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        try:
            priors = self.priors()
            if not 0.0 <= self.prior_min_share <= 1.0 / len(priors):
                problems.append(f"prior_min_share must be in [0, 1/{len(priors)}] with {len(priors)} priors, "
                                f"got {self.prior_min_share}")
        except ValueError as exc:
            problems.append(f"alternative_priors: {exc}")
        if not self.prior_half_life > 0:
            problems.append(f"prior_half_life must be > 0, got {self.prior_half_life}")
        if self.importance_weight_clip is not None and not self.importance_weight_clip > 0:
            problems.append(f"importance_weight_clip must be > 0 or None, got {self.importance_weight_clip}")
        if self.hidden < 1:
            problems.append(f"hidden must be >= 1, got {self.hidden}")
        if self.value_bins == 1 or self.value_bins < 0 or (self.value_bins and not self.value_max > self.value_min):
            problems.append(f"value_bins must be 0 or > 1 with value_max > value_min, got {self.value_bins} "
                            f"bins on [{self.value_min}, {self.value_max}]")
        if self.item_buckets < 0 or self.item_embed < 0:
            problems.append(f"item_buckets and item_embed must be >= 0, got {self.item_buckets}, {self.item_embed}")
        if problems:
            raise ValueError("bad SoftQConfig: " + "; ".join(problems))

    def priors(self) -> tuple[RetrievalPrior, ...]:
        """The retrieval priors μ may use: (``similarity_prior``, ``vote_prior``) first, then the
        ``alternative_priors`` that differ from it (ValueError on a malformed list).

        >>> [p.key for p in SoftQConfig(vote_prior=20.0, alternative_priors="1000:0, 0:20").priors()]
        ['0:20', '1000:0']
        """
        first = RetrievalPrior(self.similarity_prior, self.vote_prior)
        return (first,) + tuple(p for p in parse_priors(self.alternative_priors) if p != first)

    def network(self) -> dict:
        """The Q network's options (:class:`memento.qnet.QNetwork` keyword arguments)."""
        return {"hidden": self.hidden, "wide": self.wide, "item_buckets": self.item_buckets,
                "item_embed": self.item_embed, "unit_scale": self.unit_scale, "value_bins": self.value_bins,
                "value_min": self.value_min, "value_max": self.value_max}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


SoftQConfig.__doc__ += "\n\n    Parameters\n    ----------\n" + "".join(
    f"    {name}\n        {text}\n" for name, text in SoftQConfig.help().items())


class UnhealthyLearnerError(RuntimeError):
    """The learner's last update was skipped as non-finite; it must not publish a checkpoint."""


class SoftQLearner:
    """Online network, target network, optimiser and (optionally tuned) temperature.

    Parameters
    ----------
    state_dim
        Dimension of states and item vectors (``Settings.item_dim``).
    config
        The hyperparameters.
    drift
        A reward-drift detector (:class:`learner.drift.RewardDrift`, fed by the training loop)
        whose exploration boost :meth:`policy_params` applies; None: the learner's μ as is.
        The boost changes only the published μ, never the TD target or the α tuning.
    """

    def __init__(self, state_dim: int, config: SoftQConfig | None = None, *, drift: RewardDrift | None = None):
        self.config = config = config or SoftQConfig()
        self.state_dim = state_dim
        self.drift = drift          # the reward-drift detector whose boost the published μ carries
        torch.manual_seed(config.seed)
        self.q_net = QNetwork(state_dim, **config.network())
        self.target_net = copy.deepcopy(self.q_net).requires_grad_(False)
        # foreach: the default per-parameter update's arithmetic in fewer calls (CPU defaults to the loop)
        self.optimizer = torch.optim.Adam(self.q_net.parameters(), lr=config.lr, foreach=True)
        self.log_alpha = torch.tensor(math.log(config.alpha), requires_grad=config.target_entropy is not None)
        self.alpha_optimizer = (torch.optim.Adam([self.log_alpha], lr=config.lr)
                                if config.target_entropy is not None else None)
        self.steps = 0              # successful gradient updates
        self.skipped_updates = 0    # updates skipped because something was not finite
        self._last_update_finite = True
        self.last_td_errors: np.ndarray | None = None
        priors = config.priors()
        # which prior each request uses, from the rewards; None with one prior
        self.prior_selector = PriorSelector(priors, half_life=config.prior_half_life,
                                            min_share=config.prior_min_share, seed=config.seed) \
            if len(priors) > 1 else None
        self.td_prior = priors[0]   # the prior the soft value is taken under: the leading one at the last publication

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def observe_priors(self, transitions) -> int:
        """Give each transition's reward to the prior its recommendation was drawn under
        (:mod:`memento.priors`); returns how many counted (none with a single prior)."""
        if self.prior_selector is None:
            return 0
        return sum(self.prior_selector.observe(t.prior, float(t.reward)) for t in transitions if t.prior)

    def policy_params(self) -> PolicyParams:
        """The μ this learner assumes (its current α, the floor, K, the priors and their shares),
        raised by the drift detector's exploration boost when it has one
        (:meth:`learner.drift.RewardDrift.apply`): what a checkpoint carries and what serving
        samples after loading it. With several priors, the shares are drawn afresh from their
        evidence, and the leading one becomes the prior of the TD target's soft value."""
        mix: tuple = ()
        if self.prior_selector is not None:
            shares = self.prior_selector.shares()
            self.td_prior = self.prior_selector.priors[int(np.argmax(shares))]
            mix = tuple(p.entry(s) for p, s in zip(self.prior_selector.priors, shares))
        params = PolicyParams(alpha=self.alpha, min_prob=self.config.min_prob, top_k=self.config.top_k,
                              similarity_prior=self.td_prior.similarity, vote_prior=self.td_prior.vote,
                              priors=mix)
        return params if self.drift is None else self.drift.apply(params)

    @property
    def healthy(self) -> bool:
        """True when the last update was finite and every weight is finite: safe to publish."""
        return self._last_update_finite and all(torch.isfinite(p).all() for p in self.q_net.parameters())

    @staticmethod
    def _tensors(batch: ReplayBatch) -> dict[str, torch.Tensor]:
        return {name: torch.as_tensor(np.asarray(getattr(batch, name))) for name in (
            "weights", "state", "case_features", "reward", "done", "propensity", "next_state",
            "candidate_features", "candidate_mask", "next_candidate_features", "next_candidate_mask")}

    def _prior(self, states: torch.Tensor, cases: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        return retrieval_prior(states, cases, self.td_prior.similarity, self.td_prior.vote, mask)

    @torch.no_grad()
    def compute_td_target(self, batch: ReplayBatch) -> torch.Tensor:
        """y = r + γ(1 − done)·α·logsumexp(Q_target(s′, ·)/α); 0 soft value where s′ has no candidate."""
        return self._td_target(self._tensors(batch), self.alpha)[0]

    @torch.no_grad()
    def _td_target(self, t: dict[str, torch.Tensor], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The TD target and the mean entropy of μ(·|s′) under the target network over the rows
        it was computed for that have a candidate (NaN when there are none).

        With α fixed the target network only scores the s′ of rows that bootstrap (not ``done``,
        γ > 0): a ``done`` row's target is its reward whatever V(s′) is, and on data where most
        sessions end after one step (the simulator) that is most of the update's work. Tuning α
        needs μ's entropy at every s′, so then every row is scored."""
        reward = t["reward"].float()
        done = t["done"].bool()
        if self.alpha_optimizer is not None:
            rows = torch.ones_like(done)
        elif self.config.gamma > 0:
            rows = ~done
        else:
            rows = torch.zeros_like(done)
        y = reward.clone()
        if not rows.any():
            return y, torch.tensor(float("nan"))
        index = rows.nonzero().squeeze(1)
        next_state, next_cases = t["next_state"][index], t["next_candidate_features"][index]
        next_q = self.target_net(next_state, next_cases)
        next_mask = t["next_candidate_mask"][index].bool()
        next_prior = self._prior(next_state, next_cases, next_mask)
        y[index] = td_target(reward[index], done[index], next_q, gamma=self.config.gamma,
                             alpha=alpha, next_mask=next_mask, next_prior=next_prior)
        has_candidates = next_mask.any(-1)
        if has_candidates.any():
            probs = policy_probs(next_q[has_candidates], alpha, self.config.min_prob, next_mask[has_candidates],
                                 None if next_prior is None else next_prior[has_candidates])
            next_entropy = entropy(probs).mean()
        else:
            next_entropy = torch.tensor(float("nan"))
        return y, next_entropy

    @torch.no_grad()
    def policy_at_state(self, t: dict[str, torch.Tensor], q_chosen: torch.Tensor,
                        alpha: float) -> torch.Tensor:
        """μ(c|s) of the chosen case under the current network, over s's candidates plus the
        chosen case (a candidate identical to the chosen case is counted once)."""
        cand, mask = t["candidate_features"], t["candidate_mask"].bool()
        q_cand = self.q_net(t["state"], cand)
        same = (cand - t["case_features"].unsqueeze(1)).abs().amax(-1) <= 1e-6
        mask = mask & ~same
        q = torch.cat([q_cand, q_chosen.unsqueeze(1)], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        prior = self._prior(t["state"], torch.cat([cand, t["case_features"].unsqueeze(1)], dim=1), full_mask)
        return policy_probs(q, alpha, self.config.min_prob, full_mask, prior)[:, -1]

    def update(self, batch: ReplayBatch) -> dict[str, float]:
        """One gradient step on ``batch``; returns loss, mean Q, mean target, α, policy entropy,
        importance-weight mean, gradient norm and ``skipped`` (1.0 when the guard skipped it)."""
        cfg = self.config
        t = self._tensors(batch)
        alpha = self.alpha
        y, policy_entropy = self._td_target(t, alpha)
        out = self.q_net.outputs(t["state"], t["case_features"].unsqueeze(1)).squeeze(1)
        if cfg.value_bins:
            q_chosen = histogram_mean(out, torch.as_tensor(self.q_net.support(), dtype=out.dtype))
        else:
            q_chosen = out.squeeze(-1)
        weights = t["weights"].float()
        if cfg.importance_weight_clip is not None:
            mu_chosen = self.policy_at_state(t, q_chosen.detach(), alpha)
            iw = (mu_chosen / t["propensity"].float().clamp(min=1e-6)).clamp(max=cfg.importance_weight_clip)
            weights = weights * iw
        td_error = q_chosen - y
        if cfg.value_bins:
            target = histogram_target(y, cfg.value_min, cfg.value_max, cfg.value_bins)
            per_sample = -(target * F.log_softmax(out, dim=-1)).sum(-1)
        elif cfg.loss == "mse":
            per_sample = td_error.pow(2)
        else:
            per_sample = F.smooth_l1_loss(q_chosen, y, reduction="none")
        loss = (weights * per_sample).mean()
        metrics = {"loss": float(loss.detach()), "q_mean": float(q_chosen.detach().mean()),
                   "target_mean": float(y.mean()), "alpha": alpha,
                   "entropy": float(policy_entropy), "importance_weight_mean": float(weights.mean()),
                   "grad_norm": float("nan"), "skipped": 0.0}

        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss) and torch.isfinite(q_chosen).all() and torch.isfinite(y).all()
                      and torch.isfinite(weights).all())
        if finite:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.q_net.parameters(), cfg.grad_clip if cfg.grad_clip is not None else float("inf"))
            metrics["grad_norm"] = float(grad_norm)
            finite = bool(torch.isfinite(grad_norm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            self._last_update_finite = False
            self.last_td_errors = None
            metrics["skipped"] = 1.0
            return metrics

        self.optimizer.step()
        with torch.no_grad():
            for p_target, p in zip(self.target_net.parameters(), self.q_net.parameters()):
                p_target.lerp_(p, cfg.tau)
        if self.alpha_optimizer is not None and torch.isfinite(policy_entropy):
            # discrete-SAC temperature loss: α·(H(μ) − H_target); raises α when μ is too peaked
            alpha_loss = self.log_alpha.exp() * (policy_entropy - cfg.target_entropy)
            self.alpha_optimizer.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_optimizer.step()
        self.steps += 1
        self._last_update_finite = True
        self.last_td_errors = td_error.detach().abs().numpy()
        return metrics

    def save_checkpoint(self, directory: str | Path, *, version: int, metrics: dict[str, float] | None = None,
                        policy: PolicyParams | None = None) -> CheckpointAnnouncement:
        """Write the online network as policy version ``version``, with ``policy`` (None:
        :meth:`policy_params`, which draws the priors' shares afresh); refuses when not
        :attr:`healthy`."""
        if not self.healthy:
            raise UnhealthyLearnerError(
                f"refusing to publish policy v{version}: the last update was skipped as non-finite "
                f"({self.skipped_updates} skipped so far) or the network holds non-finite weights")
        clean = {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(float(v))}
        return save_checkpoint(self.q_net, directory, version=version, step=self.steps, metrics=clean,
                               policy=self.policy_params() if policy is None else policy)

    def state_dict(self) -> dict:
        """Everything needed to resume training (tensors, numbers and strings only)."""
        return {"q_net": self.q_net.state_dict(), "target_net": self.target_net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "alpha_optimizer": self.alpha_optimizer.state_dict() if self.alpha_optimizer else None,
                "steps": self.steps, "skipped_updates": self.skipped_updates,
                "config": {k: v for k, v in asdict(self.config).items()}, "state_dim": self.state_dim,
                "prior_selector": None if self.prior_selector is None else self.prior_selector.state_dict(),
                "td_prior": self.td_prior.key}

    def load_state_dict(self, state: dict) -> None:
        mine = self.q_net.config()
        saved = {**QNetwork(state["state_dim"], hidden=state["config"]["hidden"]).config(),
                 **{k: state["config"][k] for k in mine if k in state["config"]}, "state_dim": state["state_dim"]}
        if saved != mine:
            raise ValueError(f"saved learner has network {saved}; this learner has {mine}")
        self.q_net.load_state_dict(state["q_net"])
        self.target_net.load_state_dict(state["target_net"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"] if self.alpha_optimizer else
                                 torch.tensor(math.log(self.config.alpha)))
        if self.alpha_optimizer is not None and state["alpha_optimizer"] is not None:
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.steps, self.skipped_updates = int(state["steps"]), int(state["skipped_updates"])
        if self.prior_selector is not None and state.get("prior_selector"):  # absent in older saves
            self.prior_selector.load_state_dict(state["prior_selector"])
        priors = {p.key: p for p in self.config.priors()}
        self.td_prior = priors.get(state.get("td_prior", ""), self.td_prior)

    def save(self, path: str | Path) -> None:
        """Save :meth:`state_dict` with ``torch.save`` (read back with ``weights_only=True``),
        durably: written to a temporary file, synced, renamed over ``path``, directory synced."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = io.BytesIO()
        torch.save(self.state_dict(), data)
        write_atomic(path, data.getvalue())

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, weights_only=True))

    def load_network(self, net: QNetwork) -> None:
        """Start from a published policy network (online and target); optimiser state resets."""
        if net.config() != self.q_net.config():
            raise ValueError(f"policy network has {net.config()}; learner expects {self.q_net.config()}")
        self.q_net.load_state_dict(net.state_dict())
        self.target_net.load_state_dict(net.state_dict())
