"""One μ: a checkpoint carries the α, probability floor and K the learner trained for, and
serving's reload (and the evaluation's softq) samples exactly that μ. No broker: the checkpoint
follower is fed announcement records directly, with real checkpoint files."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from learner.service import LearnerService, LearnerServiceConfig
from learner.storage import ReplayTransition
from learner.trainer import SoftQConfig, SoftQLearner
from memento.checkpoint import PolicyParams, read_checkpoint, save_checkpoint, sha256_bytes
from memento.config import Settings
from memento.encoder import ItemEncoder, case_feature_vector
from memento.qnet import QNetwork
from memento.schemas import Case, encode
from memento.softq import policy_probs_numpy, retrieval_prior_numpy
from memory_store import CaseBank
from serving.app import ServingConfig, ServingService
from serving.followers import CheckpointFollower
from serving.policy import PolicyOptions
from support.common import RecordingProducer

torch.set_num_threads(1)

D = 4
FLAGS = PolicyOptions(top_k=8, alpha=0.1, min_prob=0.01, seed=3)


def _settings(tmp_path: Path, top_k: int = 8) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=D,
                    top_k=top_k)


def _two_case_rows(n: int, seed: int = 0) -> list[ReplayTransition]:
    """One state, two candidate cases (one pays more often), s′ = s: enough for α to move."""
    rng = np.random.default_rng(seed)
    state = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    good, bad = case_feature_vector(state, [0, 1, 0, 0], 1.0), case_feature_vector(state, [0, 0, 1, 0], 0.0)
    cands, mask = np.stack([good, bad]), np.ones(2, bool)
    rows = []
    for i in range(n):
        pick_good = rng.random() < 0.5
        reward = float(rng.random() < (0.7 if pick_good else 0.4))
        rows.append(ReplayTransition(f"t{i}", state, good if pick_good else bad, reward, False, 0.5,
                                     state, cands, mask, cands, mask))
    return rows


def _metadata(path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` of a checkpoint file."""
    raw = Path(path).read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]


def test_published_checkpoint_carries_the_learners_tuned_alpha_floor_and_k(tmp_path):
    config = SoftQConfig(top_k=2, hidden=16, alpha=0.1, target_entropy=0.6, lr=1e-2, min_prob=0.05,
                         batch_size=32, seed=0, vote_prior=4.0)
    service = LearnerService(_settings(tmp_path, top_k=2), config,
                             LearnerServiceConfig(learning_starts=32, publish_every=50, publish_min_interval_s=0.0))
    service.producer = RecordingProducer()
    assert service.loop.add(_two_case_rows(200)) == 200
    assert service.train(threading.Event()) == 200 and len(service.published) == 4
    ann = service.published[-1]
    assert ann.step == 200 == service.learner.steps           # the last update published
    policy = read_checkpoint(ann.path, ann.sha256, expect_state_dim=D).policy
    # the default alternative prior (nearness) is mixed in; no reward has come for either: even shares
    assert policy == PolicyParams(alpha=service.learner.alpha, min_prob=0.05, top_k=2, vote_prior=4.0,
                                  priors=((0.0, 4.0, 0.5), (1000.0, 0.0, 1000.0, 0.5)))
    assert abs(policy.alpha - 0.1) > 0.01                     # tuned away from its initial value
    assert json.loads(_metadata(ann.path)["policy"]) == {"alpha": policy.alpha, "min_prob": 0.05, "top_k": 2,
                                                         "similarity_prior": 0.0, "vote_prior": 4.0,
                                                         "priors": [[0.0, 4.0, 0.5], [1000.0, 0.0, 1000.0, 0.5]]}


def _learner_checkpoint(directory: Path, version: int, *, alpha: float, min_prob: float, top_k: int,
                        vote_prior: float = 2.0):
    """A learner whose α was tuned to ``alpha``, and its checkpoint, as the learner writes it."""
    learner = SoftQLearner(D, SoftQConfig(top_k=top_k, hidden=8, alpha=0.1, target_entropy=1.0,
                                          min_prob=min_prob, seed=version, vote_prior=vote_prior))
    with torch.no_grad():
        learner.log_alpha.fill_(math.log(alpha))
    return learner, learner.save_checkpoint(directory, version=version)


def _serving(tmp_path: Path) -> tuple[ServingService, CheckpointFollower, CaseBank]:
    settings = _settings(tmp_path)
    service = ServingService(settings, ServingConfig(options=FLAGS))
    bank = CaseBank(None, dim=D)
    rng, items = np.random.default_rng(0), ItemEncoder(D)
    states = rng.normal(size=(30, D)).astype(np.float32)
    states /= np.linalg.norm(states, axis=1, keepdims=True)
    bank.add([Case(f"c{i}", states[i].tolist(), f"i{i}", items.encode(f"i{i}").tolist(), float(i % 3), float(i))
              for i in range(30)])
    service.bank = bank
    follower = CheckpointFollower(settings, service.metrics, service._current_version, service._swap_in)
    return service, follower, bank


def _announce(follower: CheckpointFollower, ann, offset: int = 0) -> None:
    """What the follower's poll hands over: one record of the checkpoints topic."""
    follower._handle([SimpleNamespace(topic=follower.topic, partition=0, offset=offset, value=encode(ann))])


def _metric(service: ServingService, name: str, **labels) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels or None)


def test_serving_reload_adopts_the_checkpoints_alpha_floor_and_k(tmp_path):
    service, follower, bank = _serving(tmp_path)
    assert _metric(service, "memento_serving_policy_alpha") == FLAGS.alpha   # flags before any checkpoint
    learner, ann = _learner_checkpoint(tmp_path / "ckpt", 1, alpha=0.37, min_prob=0.05, top_k=3)
    _announce(follower, ann)

    assert service.policy.version == 1
    assert service.policy.options == PolicyOptions(top_k=3, alpha=learner.alpha, min_prob=0.05, vote_prior=2.0,
                                                   priors=((0.0, 2.0, 0.5), (1000.0, 0.0, 1000.0, 0.5)), seed=FLAGS.seed)
    for option in ("alpha", "min_prob", "top_k", "vote_prior", "priors"):
        assert _metric(service, "memento_serving_policy_overrides_total", option=option) == 1.0
    # the mix of retrieval priors the learner published, by prior
    assert _metric(service, "memento_serving_policy_prior_share", prior="1000:0:1000") == 0.5
    assert _metric(service, "memento_serving_policy_prior_share", prior="0:2") == 0.5
    assert _metric(service, "memento_serving_policy_alpha") == pytest.approx(learner.alpha)
    assert _metric(service, "memento_serving_policy_min_prob") == 0.05
    assert _metric(service, "memento_serving_policy_top_k") == 3
    assert _metric(service, "memento_serving_policy_vote_prior") == 2.0

    # the μ serving samples is the learner's: its K candidates, softmax(Q/α) times each of its
    # priors, with its floor, mixed in the published shares (the propensity is the mixture's)
    state = np.asarray(bank.get("c5").state, np.float32)
    decision = service.policy.recommend(state, np.random.default_rng(0))
    assert len(decision.case_ids) == 3 and decision.prior in ("0:2", "1000:0:1000")
    expected = sum(0.5 * policy_probs_numpy(decision.q[None], learner.alpha, 0.05, prior=retrieval_prior_numpy(
        decision.state[None], decision.features[None], beta, w))[0] for beta, w in ((0.0, 2.0), (1000.0, 0.0)))
    assert np.allclose(decision.probs, expected / expected.sum(), atol=1e-6)


def test_an_old_checkpoint_without_them_keeps_servings_flags(tmp_path):
    service, follower, _ = _serving(tmp_path)
    _, new = _learner_checkpoint(tmp_path / "ckpt", 1, alpha=0.37, min_prob=0.05, top_k=3)
    _announce(follower, new)
    torch.manual_seed(0)
    old = save_checkpoint(QNetwork(D, hidden=8), tmp_path / "ckpt", version=2, step=20)  # no policy entry
    assert sorted(_metadata(old.path)) == ["config", "step", "version"]     # the format before "policy"
    assert read_checkpoint(old.path, old.sha256, expect_state_dim=D).policy is None

    _announce(follower, old, offset=1)
    assert service.policy.version == 2 and service.policy.options == FLAGS
    assert _metric(service, "memento_serving_policy_overrides_total", option="alpha") == 1.0  # v1's only
    assert _metric(service, "memento_serving_policy_alpha") == FLAGS.alpha
    assert _metric(service, "memento_serving_policy_top_k") == FLAGS.top_k
    assert _metric(service, "memento_serving_reload_failures_total") == 0.0


@pytest.mark.parametrize("policy, why", [
    ('{"alpha": -1.0, "min_prob": 0.01, "top_k": 8}', "alpha must be a finite number > 0"),
    ('{"alpha": 0.1, "min_prob": 0.01, "top_k": 100000}', "top_k must be an integer in 1..1024"),
    ('{"alpha": 0.1, "min_prob": 0.01}', "lacks top_k"),
    ('[0.1, 0.01, 8]', "must be a JSON object"),
    ('{"alpha": 0.1, "min_prob": 0.01, "top_k": 8, "pad": "' + "x" * 2000 + '"}', "more than 1024"),
    ("not json", "Expecting value"),
])
def test_a_malformed_policy_entry_rejects_the_checkpoint(tmp_path, policy, why):
    service, follower, _ = _serving(tmp_path)
    _, good = _learner_checkpoint(tmp_path / "ckpt", 1, alpha=0.2, min_prob=0.02, top_k=4)
    _announce(follower, good)
    net = QNetwork(D, hidden=8)
    data = st_save({k: v.contiguous() for k, v in net.state_dict().items()},
                   metadata={"version": "2", "step": "0", "config": json.dumps(net.config()), "policy": policy})
    path = tmp_path / "ckpt" / "policy-v000002.safetensors"
    path.write_bytes(data)
    _announce(follower, dataclasses.replace(good, version=2, path=str(path), sha256=sha256_bytes(data), data=None),
              offset=1)
    assert service.policy.version == 1 and service.policy.options.alpha == pytest.approx(0.2)
    assert why in follower.rejected[2]
    assert _metric(service, "memento_serving_reload_failures_total") == 1.0


def test_the_evaluations_softq_publishes_what_serving_would_load(tmp_path):
    from evaluation.policies import SoftQPolicy

    config = SoftQConfig(top_k=3, hidden=8, alpha=0.1, target_entropy=1.0, min_prob=0.05, seed=0)
    policy = SoftQPolicy(None, D, config, LearnerServiceConfig())
    with torch.no_grad():
        policy.learner.log_alpha.fill_(math.log(0.37))
    assert policy._publish() and policy.policy.version == 1
    ann = policy.learner.save_checkpoint(tmp_path, version=1)
    loaded = read_checkpoint(ann.path, ann.sha256, expect_state_dim=D).policy
    assert policy.policy.options == policy.options.for_checkpoint(loaded)
    assert policy.policy.options.alpha == policy.learner.alpha != config.alpha
