"""Several retrieval priors in μ, each request's drawn by Thompson sampling on their rewards
(memento.priors): the selector, serving's mixture, the learner's bookkeeping, the stream
worker's and the evaluation's plumbing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from learner.trainer import SoftQConfig, SoftQLearner
from memento.config import RewardWeights
from memento.encoder import ItemEncoder, StateEncoder
from memento.priors import PriorSelector, RetrievalPrior, check_prior_mix, parse_priors
from memento.qnet import QNetwork
from memento.schemas import Case, Recommendation, Transition
from memento.softq import policy_probs_numpy, retrieval_prior_numpy
from serving.policy import PolicyOptions, RetrievalPolicy
from streams.attribution import RewardAttribution

D = 4
VOTE, NEAR = RetrievalPrior(0.0, 20.0), RetrievalPrior(1000.0, 0.0)


def _feed(selector: PriorSelector, paying: str, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        for prior in selector.priors:
            mean = 1.0 if prior.key == paying else 0.6
            selector.observe(prior.key, float(rng.random() < mean / 2))


def test_the_selector_moves_to_the_prior_that_pays_and_back_when_the_other_does():
    selector = PriorSelector((VOTE, NEAR), half_life=300, min_share=0.02, seed=0)
    rng = np.random.default_rng(1)
    _feed(selector, "1000:0", 800, rng)
    shares = selector.shares()
    assert shares[1] > 0.9 and shares[0] >= 0.02 and shares.sum() == pytest.approx(1.0)
    _feed(selector, "0:20", 3000, rng)     # the world changes; old evidence fades (half-life 300)
    assert selector.shares()[0] > 0.9


def test_an_even_race_stays_near_even_and_evidence_survives_a_restart():
    selector = PriorSelector((VOTE, NEAR), half_life=2000, min_share=0.01, seed=3)
    for r in (0.0, 1.0) * 50:
        selector.observe("0:20", r)
        selector.observe("1000:0", r)
    assert 0.3 < selector.shares()[0] < 0.7
    restored = PriorSelector((NEAR, RetrievalPrior(5.0, 5.0)), half_life=2000, min_share=0.01, seed=3)     # another list: what applies is kept
    restored.load_state_dict(selector.state_dict())
    assert restored.count[0] == pytest.approx(selector.count[1]) and restored.count[1] == 0.0
    assert not selector.observe("7:7", 1.0) and not selector.observe("0:20", float("nan"))


@pytest.mark.parametrize("text, message", [
    ("0:20,abc", "similarity:vote"), ("-1:0", ">= 0"), ("1:2:3:4", "similarity:vote"), ("0:1,0:1.0", "twice"),
    (",".join(f"{i}:0" for i in range(9)), "at most 8")])
def test_a_malformed_prior_list_is_refused_with_its_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_priors(text)
    with pytest.raises(ValueError, match="alternative_priors"):
        SoftQConfig(alternative_priors=text)


@pytest.mark.parametrize("mix, message", [
    ([[0, 1, 0.7], [1, 0, 0.7]], "sum to 1"), ([[0, 1]], "each entry"), ([[0, 1, 1.5]], r"\[0, 1\]"),
    ([[0, 1, 0.5], [0, 1.0, 0.5]], "twice"), ("0:1", "list"), ([[float("nan"), 1, 1.0]], "finite")])
def test_a_malformed_mix_in_a_checkpoint_is_refused(mix, message):
    with pytest.raises(ValueError, match=message):
        check_prior_mix(mix)


def _bank_and_net():
    from memory_store import CaseBank
    bank = CaseBank(None, dim=D)
    rng = np.random.default_rng(0)
    cases = []
    for i in range(12):
        s = rng.normal(size=D).astype(np.float32)
        cases.append(Case(f"c{i}", (s / np.linalg.norm(s)).tolist(), f"item{i % 5}",
                          np.eye(D, dtype=np.float32)[i % D].tolist(), float(i % 3), float(i)))
    bank.add(cases)
    torch.manual_seed(0)
    return bank, QNetwork(D, 8)


def test_serving_draws_each_prior_in_its_share_and_logs_the_mixtures_propensity():
    bank, net = _bank_and_net()
    options = PolicyOptions(top_k=6, alpha=0.5, min_prob=0.01, vote_prior=2.0,
                            priors=((0.0, 2.0, 0.8), (1000.0, 0.0, 0.2)))
    policy = RetrievalPolicy(net, 1, bank, options)
    state = np.asarray(bank.get("c3").state, np.float32)
    rng = np.random.default_rng(5)
    decisions = [policy.recommend(state, rng) for _ in range(2000)]
    drawn = [d.prior for d in decisions]
    assert set(drawn) == {"0:2", "1000:0"}
    assert drawn.count("1000:0") / len(drawn) == pytest.approx(0.2, abs=0.03)
    d = decisions[0]
    per_prior = [policy_probs_numpy(d.q[None], 0.5, 0.01, prior=retrieval_prior_numpy(
        d.state[None], d.features[None], b, w))[0] for b, w in ((0.0, 2.0), (1000.0, 0.0))]
    marginal = 0.8 * per_prior[0] + 0.2 * per_prior[1]
    assert np.allclose(d.probs, marginal, atol=1e-6) and d.propensity == pytest.approx(marginal[d.chosen])
    # the cases drawn under the nearness prior are, up to the floor, the nearest one
    near = [x.chosen for x in decisions if x.prior == "1000:0"]
    assert np.mean(np.array(near) == 0) > 0.9


def test_a_single_prior_samples_as_before_and_names_none():
    bank, net = _bank_and_net()
    options = PolicyOptions(top_k=6, alpha=0.5, min_prob=0.01, vote_prior=2.0)
    state = np.asarray(bank.get("c3").state, np.float32)
    d = RetrievalPolicy(net, 1, bank, options).recommend(state, np.random.default_rng(5))
    prior = retrieval_prior_numpy(d.state[None], d.features[None], 0.0, 2.0)
    mu = policy_probs_numpy(d.q[None], 0.5, 0.01, prior=prior)[0].astype(np.float64)
    draw = np.random.default_rng(5).random()   # one uniform per request, as before priors were mixed
    assert d.prior is None and d.chosen == int(np.searchsorted(np.cumsum(mu / mu.sum()), draw, side="right"))


def _transition(tid: str, prior: str | None, reward: float) -> Transition:
    z = [0.0] * D
    return Transition(tid, "u", z, "c", [0.0] * (2 * D + 1), "i", 0.5, reward, z, True, 1, 0.0, prior=prior)


def test_the_learner_credits_each_prior_and_publishes_its_shares_and_keeps_them_across_a_restart(tmp_path):
    config = SoftQConfig(top_k=2, hidden=8, vote_prior=20.0, alternative_priors="1000:0", seed=0)
    learner = SoftQLearner(D, config)
    assert learner.policy_params().priors == ((0.0, 20.0, 0.5), (1000.0, 0.0, 0.5))
    counted = learner.observe_priors([_transition(f"n{i}", "1000:0", 1.0) for i in range(200)] +
                                     [_transition(f"v{i}", "0:20", 0.0) for i in range(200)] +
                                     [_transition("x", None, 1.0), _transition("y", "3:3", 1.0)])
    assert counted == 400
    params = learner.policy_params()
    assert params.priors[1][2] == pytest.approx(1 - config.prior_min_share) and (params.similarity_prior, params.vote_prior) == (1000.0, 0.0)
    assert learner.td_prior == NEAR            # the TD target's soft value follows the leading prior
    learner.save(tmp_path / "learner.pt")
    again = SoftQLearner(D, config)
    again.load(tmp_path / "learner.pt")
    assert again.policy_params() == params and again.td_prior == NEAR
    single = SoftQLearner(D, dataclasses.replace(config, alternative_priors=""))
    assert single.prior_selector is None and single.policy_params().priors == ()
    assert single.observe_priors([_transition("n", "1000:0", 1.0)]) == 0


def test_the_stream_worker_carries_the_recommendations_prior_to_its_transition():
    attribution = RewardAttribution(StateEncoder(ItemEncoder(D)), RewardWeights(), window_s=60.0,
                                    allowed_lateness_s=0.0)
    state = attribution.new_state()
    rec = Recommendation("r1", "u", "7", "c1", 0.25, 3, 100.0, [0.1] * D, [0.0] * (2 * D + 1), prior="1000:0")
    attribution.add_recommendation(state, RewardAttribution.recommendation_dict(rec))
    old = {**RewardAttribution.recommendation_dict(rec), "request_id": "r0"}
    del old["prior"]                           # a window kept by a worker from before priors
    attribution.add_recommendation(state, old)
    closed = {t.transition_id: t for t, _ in attribution.close_due(state, watermark=1000.0, now=0.0)}
    assert closed["r1"].prior == "1000:0" and closed["r0"].prior is None


def test_memento_eval_mixes_the_priors_and_the_learner_hears_every_reward():
    from evaluation.runner import EvalConfig, run_policy
    config = EvalConfig(source="synthetic", events=300)
    result = run_policy(config, "softq", seed=0)
    shares = {k: v for k, v in result.metrics.items() if k.startswith("prior_share[")}
    assert set(shares) == {"prior_share[0:20]", "prior_share[1000:0:1000]"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares != {"prior_share[0:20]": 0.5, "prior_share[1000:0:1000]": 0.5}   # evidence moved them


def test_the_prior_travels_in_recommendation_and_transition_records_and_older_ones_have_none():
    from memento.schemas import decode, encode
    t = _transition("t1", "1000:0", 1.0)
    assert decode(Transition, encode(t)) == t
    older = encode(dataclasses.replace(t, prior=None)).replace(b',"prior":null', b"")
    assert b"prior" not in older and decode(Transition, older).prior is None


def test_the_learner_service_counts_each_new_transition_once_and_exports_the_mix(tmp_path):
    from types import SimpleNamespace

    from learner.service import LearnerService, LearnerServiceConfig
    from memento.config import Settings
    from memento.schemas import encode
    from support.common import RecordingProducer

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=D, top_k=2)
    service = LearnerService(settings, SoftQConfig(top_k=2, hidden=8, seed=0),
                             LearnerServiceConfig(learning_starts=10_000, publish_min_interval_s=0.0))
    service.producer = RecordingProducer()
    service.bank, _ = _bank_and_net()                         # the bank replica run() would open
    topic = settings.topics.transitions
    records = [SimpleNamespace(topic=topic, partition=0, offset=i, value=encode(
        _transition(f"t{i}", "1000:0:1000" if i % 2 else "0:20", float(i % 2)))) for i in range(40)]
    assert service.handle(records) == 40
    assert service.handle(records[:10]) == 0                  # redelivered: already in the buffer
    selector = service.learner.prior_selector
    assert selector.observed == 40 and selector.means().tolist() == [0.0, 1.0]
    service.publish()
    share = lambda prior: service.metrics.registry.get_sample_value("memento_learner_prior_share", {"prior": prior})
    assert share("1000:0:1000") == pytest.approx(1 - 0.005) and share("0:20") == pytest.approx(0.005)
    assert service.metrics.registry.get_sample_value("memento_learner_prior_reward_mean", {"prior": "1000:0:1000"}) == 1.0
