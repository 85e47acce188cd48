"""Retrieval policy, generators and request validation, without a broker."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

from harness.broker import free_port
from memento.encoder import ItemEncoder
from memento.qnet import QNetwork
from memento.schemas import Case
from memento.softq import policy_probs
from memory_store import CaseBank
from serving.generator import CaseItemGenerator, ChatCompletionGenerator
from serving.policy import NoCandidatesError, PolicyOptions, RetrievalPolicy
from serving.validation import RequestError, parse_feedback, parse_recommend

DIM = 8


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Serving scores with one thread (ServingConfig.compute_threads); on a shared 2-core
    machine more threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _bank(n: int = 40, seed: int = 0, items: int | None = None) -> CaseBank:
    rng = np.random.default_rng(seed)
    enc = ItemEncoder(DIM)
    bank = CaseBank(None, dim=DIM)
    cases = []
    for i in range(n):
        s = rng.normal(size=DIM).astype(np.float32)
        s /= np.linalg.norm(s)
        item = f"item{i % (items or n)}"
        cases.append(Case(f"c{i}", s.tolist(), item, enc.encode(item).tolist(), float(i % 4), float(i)))
    bank.add(cases)
    return bank


def _policy(bank, top_k=8, alpha=0.5, min_prob=0.01, version=3) -> RetrievalPolicy:
    torch.manual_seed(0)
    return RetrievalPolicy(QNetwork(DIM, hidden=16), version, bank,
                           PolicyOptions(top_k=top_k, alpha=alpha, min_prob=min_prob, vote_prior=0.0))


def _state(seed=1) -> np.ndarray:
    s = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return s / np.linalg.norm(s)


def test_decision_matches_q_network_and_bank():
    bank = _bank()
    policy = _policy(bank)
    state = _state()
    d = policy.recommend(state, np.random.default_rng(0))
    _, ids = bank.search(state[None], 8)
    assert d.case_ids == ids[0] and d.policy_version == 3
    feats = torch.from_numpy(bank.features(d.case_ids))[None]
    q = policy.net(torch.from_numpy(state)[None], feats)
    np.testing.assert_allclose(d.q, q[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    mu = policy_probs(q, 0.5, 0.01)[0].detach().numpy()
    np.testing.assert_allclose(d.probs, mu, rtol=1e-5)
    assert d.propensity == pytest.approx(mu[d.chosen]) and d.probs.min() >= 0.01 - 1e-9
    np.testing.assert_allclose(d.case_features, bank.features([d.case_id])[0])
    assert 0 < d.entropy <= np.log(8) + 1e-6


def test_sampling_follows_mu_and_is_seeded():
    bank = _bank()
    policy = _policy(bank, alpha=0.05)
    state = _state()
    rng = np.random.default_rng(7)
    draws = [policy.recommend(state, rng) for _ in range(1500)]
    probs = draws[0].probs
    counts = np.bincount([d.chosen for d in draws], minlength=len(probs)) / len(draws)
    # Binomial standard error at n=1500 is below 0.013; allow about 4 of them.
    np.testing.assert_allclose(counts, probs, atol=0.05)
    assert all(d.propensity == pytest.approx(probs[d.chosen]) for d in draws[:50])
    again = [policy.recommend(state, np.random.default_rng(7)).chosen for _ in range(1)]
    assert again[0] == draws[0].chosen
    seq_a = [policy.recommend(state, r).chosen for r in [np.random.default_rng(11)] for _ in range(20)]
    seq_b = [policy.recommend(state, r).chosen for r in [np.random.default_rng(11)] for _ in range(20)]
    assert seq_a == seq_b


def test_small_alpha_is_greedy_and_floor_holds():
    bank = _bank()
    policy = _policy(bank, alpha=1e-4, min_prob=0.02)
    d = policy.recommend(_state(), np.random.default_rng(0))
    best = int(np.argmax(d.q))
    assert d.probs[best] == pytest.approx(1 - 0.02 * 8 + 0.02, abs=1e-6)
    assert np.all(d.probs >= 0.02 - 1e-9)


def test_fewer_cases_than_top_k_and_empty_bank():
    bank = _bank(n=3)
    d = _policy(bank, top_k=8).recommend(_state(), np.random.default_rng(0))
    assert len(d.case_ids) == 3 and d.probs.sum() == pytest.approx(1.0)
    with pytest.raises(NoCandidatesError):
        _policy(CaseBank(None, dim=DIM)).recommend(_state(), np.random.default_rng(0))


def test_case_item_generator_distinct_items_and_fill_from_bank():
    bank = _bank(n=40, items=10)  # 4 cases per item
    policy = _policy(bank, top_k=4)
    d = policy.recommend(_state(), np.random.default_rng(0))
    gen = CaseItemGenerator(bank)
    one = gen.generate(d, 1)
    assert one == [bank.get(d.case_id).item_id]
    many = gen.generate(d, 7)
    assert many[0] == one[0] and len(many) == 7 and len(set(many)) == 7
    with pytest.raises(ValueError):
        gen.generate(d, 0)


class _ChatHandler(BaseHTTPRequestHandler):
    answer = "[]"
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


def test_chat_generator_uses_endpoint_and_falls_back():
    bank = _bank(n=40, items=10)
    d = _policy(bank, top_k=4).recommend(_state(), np.random.default_rng(0))
    default = CaseItemGenerator(bank)
    fallbacks = []
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        gen = ChatCompletionGenerator(url, "m", default, api_key="k", on_fallback=lambda: fallbacks.append(1))
        candidate_items = list(dict.fromkeys(bank.get(d.case_ids[i]).item_id for i in d.ranked()))
        pick = candidate_items[-1]
        _ChatHandler.answer = f'Sure: ["{pick}", "not-an-item"]'
        assert gen.generate(d, 2) == [pick]
        path, auth, body = _ChatHandler.seen[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "m"
        assert pick in body["messages"][1]["content"]
        assert not fallbacks
        _ChatHandler.answer = "I cannot help with that"
        assert gen.generate(d, 1) == default.generate(d, 1) and len(fallbacks) == 1
    finally:
        server.shutdown()
        server.server_close()
    unreachable = ChatCompletionGenerator(f"http://127.0.0.1:{free_port()}/v1", "m", default, timeout_s=1.0,
                                          on_fallback=lambda: fallbacks.append(1))
    assert unreachable.generate(d, 2) == default.generate(d, 2) and len(fallbacks) == 2


@pytest.mark.parametrize("body, field", [
    ({}, "'user_id'"),
    ({"user_id": "u", "k": 2.5}, "'k'"),
    ({"user_id": "u", "ts": float("nan")}, "'ts'"),
    ({"user_id": "u", "context": {"recent_items": [1]}}, "'context.recent_items[0]'"),
    ({"user_id": "u", "context": {"recent_items": [{"item_id": "", "action": "click"}]}},
     "'context.recent_items[0].item_id'"),
    ({"user_id": "u", "context": {"recent_items": [{"item_id": "i", "action": "click", "ts": "x"}]}},
     "'context.recent_items[0].ts'"),
])
def test_recommend_validation_names_field(body, field):
    with pytest.raises(RequestError) as err:
        parse_recommend(body)
    assert err.value.status == 422 and field in str(err.value)


def test_validation_defaults_and_aliases():
    req = parse_recommend({"user_id": "u", "context": {"recent_items": [{"item_id": "i", "action": "alipay"}]}},
                          now=50.0)
    assert (req.ts, req.k, req.explain) == (50.0, 1, False)
    assert req.recent_items[0].action == "purchase" and req.recent_items[0].ts == 50.0
    action = parse_feedback({"user_id": "u", "item_id": "i", "action": "Click"}, now=9.0)
    assert action.action == "click" and action.ts == 9.0 and action.event_id and action.request_id is None


def test_serving_options_reject_a_non_positive_nprobe():
    from serving.app import ServingConfig
    from serving.cli import add_arguments, run_from_args

    with pytest.raises(ValueError, match="bank_nprobe"):
        ServingConfig(bank_nprobe=0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match="memento serve: bank_nprobe must be >= 1"):
        run_from_args(parser.parse_args(["--bank-nprobe", "0"]))


def test_serving_flags_come_from_the_option_dataclasses():
    """Every option of PolicyOptions and ServingConfig a person sets has its flag, its value
    reaches the config, and an unset flag leaves the dataclass's default (written once)."""
    from dataclasses import fields

    from memento.config import Settings
    from serving.app import ServingConfig
    from serving.cli import add_arguments, config_from_args
    from serving.policy import PolicyOptions

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in fields(PolicyOptions)} - flags == {"priors"}
    assert {f.name for f in fields(ServingConfig)} - flags == {"options", "api_tokens", "chat_api_key", "worker_index"}
    args = parser.parse_args(["--alpha", "0.25", "--own-cases", "3", "--max-users", "7", "--bank-nprobe", "none",
                              "--bank-encoding", "flat", "--top-k", "9"])
    config = config_from_args(args, Settings(top_k=9), worker_index=2)
    assert (config.options.alpha, config.options.own_cases, config.options.top_k) == (0.25, 3, 9)
    assert (config.max_users, config.bank_nprobe, config.bank_encoding, config.worker_index) == (7, None, "flat", 2)
    default = config_from_args(parser.parse_args([]), Settings(top_k=5))
    assert default.options == PolicyOptions(top_k=5) and default.max_batch == ServingConfig().max_batch
    with pytest.raises(SystemExit):
        parser.parse_args(["--bank-encoding", "int8"])


def test_similarity_prior_makes_an_untrained_q_plain_retrieval():
    """With Q equal on every candidate, μ is the prior softmax(β·cos(s, c_state)): the nearest
    case is the most probable and probabilities fall with similarity; the learner's μ (torch)
    gives the same numbers; β = 0 leaves μ uniform."""
    from memento.softq import retrieval_prior

    bank = _bank()
    net = QNetwork(DIM, hidden=16)
    torch.nn.init.zeros_(net.mlp[-1].weight)
    torch.nn.init.zeros_(net.mlp[-1].bias)  # Q(s, c) = 0 for every pair
    state = _state()
    flat = RetrievalPolicy(net, 1, bank, PolicyOptions(top_k=8, alpha=0.1, min_prob=0.0, vote_prior=0.0))
    d = flat.recommend(state, np.random.default_rng(0))
    np.testing.assert_allclose(d.probs, 1 / 8, rtol=1e-5)

    prior = RetrievalPolicy(net, 1, bank, PolicyOptions(top_k=8, alpha=0.1, min_prob=0.0, similarity_prior=20.0,
                                                        vote_prior=0.0))
    d = prior.recommend(state, np.random.default_rng(0))
    assert (np.diff(d.similarities) <= 0).all()          # search order: most similar first
    assert (np.diff(d.probs) <= 1e-7).all() and d.probs[0] > 2 * d.probs[-1]
    expected = np.exp(20.0 * d.similarities) / np.exp(20.0 * d.similarities).sum()
    np.testing.assert_allclose(d.probs, expected, rtol=1e-4)
    s, c = torch.from_numpy(d.state)[None], torch.from_numpy(d.features)[None]
    mu = policy_probs(net(s, c), 0.1, 0.0, prior=retrieval_prior(s, c, 20.0))[0].detach().numpy()
    np.testing.assert_allclose(d.probs, mu, rtol=1e-4)


def test_vote_prior_ranks_an_untrained_q_by_what_the_neighbours_paid():
    """With Q equal on every candidate, μ ∝ (1 + V(c))^w: a case whose item other retrieved
    cases also led to, and that paid, is more probable; serving's numpy μ equals the learner's
    torch μ; w = 0 leaves μ uniform."""
    from memento.softq import neighbour_votes, retrieval_prior

    bank = _bank(n=60, items=6)   # 6 items, 10 cases each, outcomes 0..3
    net = QNetwork(DIM, hidden=16)
    torch.nn.init.zeros_(net.mlp[-1].weight)
    torch.nn.init.zeros_(net.mlp[-1].bias)
    state = _state()
    flat = RetrievalPolicy(net, 1, bank, PolicyOptions(top_k=16, alpha=0.1, min_prob=0.0, vote_prior=0.0))
    np.testing.assert_allclose(flat.recommend(state, np.random.default_rng(0)).probs, 1 / 16, rtol=1e-5)

    voted = RetrievalPolicy(net, 1, bank, PolicyOptions(top_k=16, alpha=0.1, min_prob=0.0, vote_prior=3.0))
    d = voted.recommend(state, np.random.default_rng(0))
    items = [bank.get(c).item_id for c in d.case_ids]
    outcomes = d.features[:, 2 * DIM]
    paid = {i: sum(float(o) for j, o in zip(items, outcomes) if j == i) for i in set(items)}
    votes = np.array([paid[i] for i in items])
    np.testing.assert_allclose(neighbour_votes(d.features[None])[0], votes, rtol=1e-6)
    expected = (1 + votes) ** 3.0 / ((1 + votes) ** 3.0).sum()
    np.testing.assert_allclose(d.probs, expected, rtol=1e-4)
    assert len(set(votes.tolist())) > 1   # the bank gives the items different votes
    s, c = torch.from_numpy(d.state)[None], torch.from_numpy(d.features)[None]
    mu = policy_probs(net(s, c), 0.1, 0.0, prior=retrieval_prior(s, c, 0.0, 3.0))[0].detach().numpy()
    np.testing.assert_allclose(d.probs, mu, rtol=1e-4)


def test_ranked_follows_mus_logits_past_the_floor_and_the_drawn_prior():
    """A sharp prior (β = 1000) leaves every candidate but the nearest at the floor: their
    probabilities tie, and in a mixture the other prior's favourites outrank them. The list
    (``ranked``) still follows μ's order under the prior the case was drawn from: nearest first.
    Before, the tail came in candidate order or in the other prior's order."""
    bank = _bank(n=60, items=6)   # items shared by several cases: the vote prior has favourites
    net = QNetwork(DIM, hidden=16)
    torch.nn.init.zeros_(net.mlp[-1].weight)
    torch.nn.init.zeros_(net.mlp[-1].bias)   # Q = 0: μ is the prior
    state = _state()
    sharp = RetrievalPolicy(net, 1, bank, PolicyOptions(top_k=16, alpha=0.1, min_prob=0.01, similarity_prior=1000.0,
                                                        vote_prior=0.0))
    d = sharp.recommend(state, np.random.default_rng(0))
    assert np.isclose(d.probs[1:], d.probs[-1]).sum() >= 10           # the floor ties the tail
    by_nearness = list(np.argsort(-d.similarities, kind="stable"))
    assert d.ranked() == [d.chosen] + [i for i in by_nearness if i != d.chosen]

    mixed = RetrievalPolicy(net, 1, bank, PolicyOptions(top_k=16, alpha=0.1, min_prob=0.01, similarity_prior=1000.0,
                                                        vote_prior=0.0, priors=((1000.0, 0.0, 0.5), (0.0, 3.0, 0.5))))
    rng = np.random.default_rng(1)
    drawn = {}
    for _ in range(20):
        d = mixed.recommend(state, rng)
        drawn[d.prior] = d
    near = drawn["1000:0"]
    assert list(np.argsort(-near.probs, kind="stable")) != by_nearness   # the mixture's order is not μ's
    assert near.ranked() == [near.chosen] + [i for i in by_nearness if i != near.chosen]
