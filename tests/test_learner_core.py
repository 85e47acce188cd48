"""Learning core: TD target, soft value, soft-Q on a two-case problem, non-finite guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(1)  # the machine has 2 cores shared by everything; OpenMP spinning costs more than it gains

from learner.buffer import ReplayBuffer
from learner.storage import ReplayBatch, ReplayTransition
from learner.trainer import SoftQConfig, SoftQLearner, UnhealthyLearnerError
from memento.checkpoint import load_checkpoint
from memento.encoder import case_feature_vector
from memento.softq import policy_probs, soft_value

D, K = 4, 2


class FixedQ(nn.Module):
    """A stand-in target network whose Q values are given, one row per state of ``keys`` (the
    batch's s′, distinct rows): the learner may score only some of them."""

    def __init__(self, q: torch.Tensor, keys: np.ndarray | None = None):
        super().__init__()
        self.q = q
        self.keys = None if keys is None else torch.as_tensor(keys)

    def forward(self, state, cases):
        if len(state) == len(self.q):
            return self.q
        rows = [int((self.keys == s).all(-1).nonzero()[0]) for s in state]
        return self.q[rows]


def _batch(reward, done, next_mask, propensity=None) -> ReplayBatch:
    n = len(reward)
    f = 2 * D + 1
    return ReplayBatch(
        indices=np.arange(n), weights=np.ones(n, np.float32),
        state=np.zeros((n, D), np.float32), case_features=np.zeros((n, f), np.float32),
        reward=np.asarray(reward, np.float32), done=np.asarray(done, bool),
        propensity=np.asarray(propensity if propensity is not None else [0.5] * n, np.float32),
        next_state=np.zeros((n, D), np.float32),
        candidate_features=np.zeros((n, K, f), np.float32), candidate_mask=np.zeros((n, K), bool),
        next_candidate_features=np.zeros((n, K, f), np.float32),
        next_candidate_mask=np.asarray(next_mask, bool))


def test_td_target_matches_hand_computation():
    learner = SoftQLearner(D, SoftQConfig(gamma=0.5, alpha=0.1, hidden=8))
    batch = _batch(reward=[1.0, 1.0, 0.5, 0.0], done=[False, True, False, False],
                   next_mask=[[True, True], [True, True], [False, False], [False, True]])
    batch.next_state[np.arange(4), np.arange(4)] = 1.0     # distinct s′ per row
    learner.target_net = FixedQ(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, -5.0]]), batch.next_state)
    y = learner.compute_td_target(batch).numpy()
    v0 = 0.1 * math.log(math.exp(1.0 / 0.1) + math.exp(0.0 / 0.1))   # α·logsumexp(Q/α)
    expected = [1.0 + 0.5 * v0,   # ordinary transition
                1.0,              # episode ended: no bootstrap
                0.5,              # s′ has no candidate case: soft value 0
                0.5 * -5.0]       # the masked-out candidate (Q=2) must not count
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_td_target_with_similarity_prior_is_the_kl_regularised_soft_value():
    """V(s′) = α·log Σ n·π0(c)·exp(Q/α) with π0 = softmax(β·cos(s′, c_state)) over the valid
    candidates; equal Q values give the same V with or without the prior (V = Q + α·log n)."""
    beta = 5.0
    learner = SoftQLearner(D, SoftQConfig(gamma=0.5, alpha=0.1, hidden=8, similarity_prior=beta, vote_prior=0.0))
    learner.target_net = FixedQ(torch.tensor([[1.0, 0.0], [0.3, 0.3]]))
    batch = _batch(reward=[0.0, 0.0], done=[False, False], next_mask=[[True, True], [True, True]])
    batch.next_state[:, 0] = 1.0                                   # s′ = e0
    batch.next_candidate_features[:, 0, 0] = 1.0                   # candidate 0: c_state = e0, cos 1
    batch.next_candidate_features[:, 1, 1] = 1.0                   # candidate 1: c_state = e1, cos 0
    y = learner.compute_td_target(batch).numpy()
    pi0 = np.exp([beta, 0.0]) / np.exp([beta, 0.0]).sum()
    v = 0.1 * math.log(sum(2 * p * math.exp(q / 0.1) for p, q in zip(pi0, (1.0, 0.0))))
    np.testing.assert_allclose(y, [0.5 * v, 0.5 * (0.3 + 0.1 * math.log(2))], rtol=1e-5)
    assert learner.policy_params().similarity_prior == beta


def test_td_target_with_vote_prior_weighs_what_the_neighbours_paid():
    """With the neighbours' vote, π0 ∝ (1 + V(c))^w where V(c) sums the outcomes of the
    candidates with c's item; the soft value is taken under π0 (the published μ carries w)."""
    w = 2.0
    learner = SoftQLearner(D, SoftQConfig(gamma=0.5, alpha=0.1, hidden=8, vote_prior=w))
    learner.target_net = FixedQ(torch.tensor([[1.0, 0.0]]))
    batch = _batch(reward=[0.0], done=[False], next_mask=[[True, True]])
    batch.next_candidate_features[0, 0, D] = 1.0                  # candidate 0: item e0, paid 0
    batch.next_candidate_features[0, 1, D + 1] = 1.0              # candidate 1: item e1, paid 3
    batch.next_candidate_features[0, 1, 2 * D] = 3.0
    y = learner.compute_td_target(batch).numpy()
    pi0 = np.array([1.0, 4.0 ** w]) / (1.0 + 4.0 ** w)
    v = 0.1 * math.log(sum(2 * p * math.exp(q / 0.1) for p, q in zip(pi0, (1.0, 0.0))))
    np.testing.assert_allclose(y, [0.5 * v], rtol=1e-5)
    assert learner.policy_params().vote_prior == w
    learner0 = SoftQLearner(D, SoftQConfig(gamma=0.5, alpha=0.1, hidden=8, vote_prior=0.0))
    learner0.target_net = learner.target_net
    v0 = 0.1 * math.log(math.exp(1.0 / 0.1) + 1.0)
    np.testing.assert_allclose(learner0.compute_td_target(batch).numpy(), [0.5 * v0], rtol=1e-5)


def test_soft_value_tends_to_max_as_alpha_shrinks():
    q = torch.tensor([[0.3, 1.7, -2.0, 1.2]])
    gaps = []
    for alpha in (1.0, 0.3, 0.1, 0.01, 0.001):
        v = float(soft_value(q, alpha))
        gap = v - 1.7
        assert 0.0 <= gap <= alpha * math.log(4) + 1e-6   # max ≤ V ≤ max + α·log K
        gaps.append(gap)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5


def _two_case_problem(n: int, seed: int, p_good=0.7, p_bad=0.4,
                      prioritized: bool = False) -> tuple[ReplayBuffer, np.ndarray, np.ndarray]:
    """One state s, two cases; the policy that logged the data was uniform (propensity 0.5).
    Case A pays 1 with probability p_good, case B with p_bad; s′ = s (continuing task)."""
    rng = np.random.default_rng(seed)
    state = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    good = case_feature_vector(state, [0, 1, 0, 0], 1.0)
    bad = case_feature_vector(state, [0, 0, 1, 0], 0.0)
    cands = np.stack([good, bad])
    mask = np.ones(2, bool)
    # β = 1: prioritized replay's importance weights fully undo its sampling bias
    buffer = ReplayBuffer.create(n, D, K, prioritized=prioritized, priority_beta=1.0, seed=seed)
    for i in range(n):
        pick_good = rng.random() < 0.5
        reward = float(rng.random() < (p_good if pick_good else p_bad))
        buffer.add(ReplayTransition(f"t{i}", state, good if pick_good else bad, reward, False, 0.5,
                                    state, cands, mask, cands, mask))
    return buffer, state, cands


@pytest.mark.parametrize("loss,iw_clip,prioritized", [("mse", None, False), ("huber", 5.0, True)])
def test_softq_learns_the_better_case(loss, iw_clip, prioritized):
    buffer, state, cands = _two_case_problem(400, seed=3, prioritized=prioritized)
    learner = SoftQLearner(D, SoftQConfig(gamma=0.5, alpha=0.1, tau=0.05, lr=3e-3, batch_size=64,
                                          hidden=32, loss=loss, importance_weight_clip=iw_clip, seed=0))
    s, c = torch.tensor(state)[None], torch.tensor(cands)[None]
    with torch.no_grad():
        before = policy_probs(learner.q_net(s, c), 0.1)[0, 0].item()
    for _ in range(600):
        batch = buffer.sample(64)
        metrics = learner.update(batch)
        assert metrics["skipped"] == 0.0
        buffer.update_priorities(batch.indices, learner.last_td_errors)
    with torch.no_grad():
        q = learner.q_net(s, c)
        p_good = policy_probs(q, 0.1)[0, 0].item()
    # both cases lead to the same s′, so Q(s, A) − Q(s, B) → the gap of their mean rewards
    rows = buffer.storage.get(np.arange(len(buffer)))
    chose_good = (rows["case_features"] == cands[0]).all(axis=1)
    empirical_gap = rows["reward"][chose_good].mean() - rows["reward"][~chose_good].mean()
    assert p_good > 0.9, (before, p_good, q)
    assert abs(float(q[0, 0] - q[0, 1]) - empirical_gap) < 0.05, (q, empirical_gap)
    assert learner.steps == 600 and learner.healthy


def test_importance_weight_uses_current_policy_over_the_candidates_of_s():
    class CandidateQ(nn.Module):
        def forward(self, state, cases):
            return torch.tensor([[2.0, 0.0]])

    cfg = SoftQConfig(alpha=1.0, min_prob=0.0, importance_weight_clip=3.0, hidden=8, vote_prior=0.0)
    learner = SoftQLearner(D, cfg)
    learner.q_net = CandidateQ()
    batch = _batch(reward=[0.0], done=[True], next_mask=[[False, False]], propensity=[0.25])
    chosen = np.arange(2 * D + 1, dtype=np.float32)
    batch.case_features[0] = chosen
    batch.candidate_features[0, 0] = chosen          # the chosen case is candidate 0: counted once
    batch.candidate_mask[0] = True
    mu = learner.policy_at_state(learner._tensors(batch), torch.tensor([2.0]), 1.0)
    assert float(mu[0]) == pytest.approx(math.exp(2) / (math.exp(2) + 1), rel=1e-6)   # over {c1, chosen}
    batch.candidate_mask[0] = False                  # no candidates known for s: μ(c|s) = 1
    mu = learner.policy_at_state(learner._tensors(batch), torch.tensor([2.0]), 1.0)
    assert float(mu[0]) == pytest.approx(1.0)


def test_alpha_tuning_moves_entropy_toward_target():
    buffer, state, cands = _two_case_problem(200, seed=5)
    learner = SoftQLearner(D, SoftQConfig(alpha=0.1, target_entropy=0.6, lr=1e-2, hidden=16, seed=0, vote_prior=0.0))
    for _ in range(300):
        metrics = learner.update(buffer.sample(64))
    # with two candidates the maximum entropy is log 2 = 0.69; the target 0.6 asks for a softer μ (no
    # prior: its vote for the case that paid would cap the entropy below the target)
    assert learner.alpha > 0.1
    assert abs(metrics["entropy"] - 0.6) < 0.1


def test_non_finite_update_is_skipped_and_blocks_publishing(tmp_path):
    buffer, _, _ = _two_case_problem(100, seed=1)
    learner = SoftQLearner(D, SoftQConfig(hidden=16, seed=0))
    learner.update(buffer.sample(32))
    ann = learner.save_checkpoint(tmp_path, version=1)
    assert load_checkpoint(ann.path, ann.sha256, expect_state_dim=D) is not None

    before = [p.detach().clone() for p in learner.q_net.parameters()]
    bad = buffer.sample(32)
    bad.reward[3] = np.nan                       # a NaN reward poisons the TD target
    metrics = learner.update(bad)
    assert metrics["skipped"] == 1.0 and learner.skipped_updates == 1 and learner.steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, learner.q_net.parameters()))
    assert not learner.healthy
    with pytest.raises(UnhealthyLearnerError, match="refusing to publish policy v2"):
        learner.save_checkpoint(tmp_path, version=2)
    assert not (tmp_path / "policy-v000002.safetensors").exists()

    learner.update(buffer.sample(32))            # a finite update restores health
    assert learner.healthy
    learner.save_checkpoint(tmp_path, version=2)

    with torch.no_grad():                         # NaN weights: every update is skipped
        next(learner.q_net.parameters())[0, 0] = float("nan")
    assert not learner.healthy
    for _ in range(3):
        assert learner.update(buffer.sample(32))["skipped"] == 1.0
    assert learner.skipped_updates == 4 and not learner.healthy
    with pytest.raises(UnhealthyLearnerError):
        learner.save_checkpoint(tmp_path, version=3)


def test_learner_state_round_trip(tmp_path):
    buffer, state, cands = _two_case_problem(100, seed=2)
    cfg = SoftQConfig(hidden=16, seed=0, target_entropy=0.5)
    learner = SoftQLearner(D, cfg)
    for _ in range(20):
        learner.update(buffer.sample(16))
    learner.save(tmp_path / "learner.pt")
    restored = SoftQLearner(D, SoftQConfig(hidden=16, seed=99, target_entropy=0.5))
    restored.load(tmp_path / "learner.pt")
    batch = buffer.sample(16)
    assert restored.steps == 20 and restored.alpha == pytest.approx(learner.alpha)
    a, b = learner.update(batch), restored.update(batch)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="hidden"):
        SoftQLearner(D, SoftQConfig(hidden=8)).load(tmp_path / "learner.pt")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="gamma must be in"):
        SoftQConfig(gamma=1.5)
    with pytest.raises(ValueError, match="loss must be 'mse' or 'huber'"):
        SoftQConfig(loss="l1")


def test_numpy_scoring_path_equals_the_torch_definitions():
    """Serving scores with FrozenQ and the numpy μ; they must be the network's and softq's
    functions, masks, floors and all."""
    import numpy as np

    from memento.qnet import FrozenQ, QNetwork
    from memento.softq import entropy, entropy_numpy, policy_probs, policy_probs_numpy

    torch.manual_seed(3)
    net = QNetwork(6, hidden=24)
    for p in net.parameters():  # away from the initialisation's small weights
        p.data.mul_(3.0)
    frozen = FrozenQ(net)
    rng = np.random.default_rng(0)
    states = rng.normal(size=(5, 6)).astype(np.float32)
    cases = rng.normal(size=(5, 7, 13)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(states), torch.from_numpy(cases)).numpy()
    got = frozen(states, cases)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zeros
    mask = np.arange(7)[None, :] < np.array([7, 3, 1, 5, 2])[:, None]
    for alpha, floor in ((0.1, 0.0), (0.5, 0.02), (2.0, 0.1)):
        t = policy_probs(torch.from_numpy(got), alpha, floor, torch.from_numpy(mask))
        n = policy_probs_numpy(got, alpha, floor, mask)
        np.testing.assert_allclose(n, t.numpy(), rtol=1e-5, atol=1e-7)
        assert np.allclose(n.sum(-1), 1.0, atol=1e-5) and (n[~mask] == 0).all()
        np.testing.assert_allclose(entropy_numpy(n), entropy(t).numpy(), rtol=1e-5, atol=1e-6)
    net.mlp[0].weight.data.zero_()  # a snapshot: later training does not reach it
    np.testing.assert_allclose(frozen(states, cases), got)


def test_the_target_network_scores_only_the_s_prime_that_bootstrap_unless_alpha_is_tuned():
    batch = _batch(reward=[1.0, 2.0, 3.0], done=[True, False, True], next_mask=[[True, True]] * 3)
    batch.next_state[np.arange(3), np.arange(3)] = 1.0
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5], [3.0, 0.0]])
    for target_entropy, scored in ((None, 1), (0.5, 3)):
        learner = SoftQLearner(D, SoftQConfig(gamma=0.5, alpha=0.1, hidden=8, target_entropy=target_entropy))
        seen = []
        fixed = FixedQ(q, batch.next_state)
        learner.target_net = lambda state, cases: seen.append(len(state)) or fixed(state, cases)
        y = learner.compute_td_target(batch).numpy()
        assert seen == [scored]
        v1 = 0.1 * math.log(2 * math.exp(0.5 / 0.1))
        np.testing.assert_allclose(y, [1.0, 2.0 + 0.5 * v1, 3.0], rtol=1e-6)
    fixed_gamma0 = SoftQLearner(D, SoftQConfig(gamma=0.0, alpha=0.1, hidden=8))
    fixed_gamma0.target_net = lambda state, cases: pytest.fail("γ = 0: nothing bootstraps")
    np.testing.assert_allclose(fixed_gamma0.compute_td_target(batch).numpy(), [1.0, 2.0, 3.0])
