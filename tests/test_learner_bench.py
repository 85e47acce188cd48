"""``memento bench learner`` at tiny sizes: the figures it must report, the same TD target in the
bare loop as in the learner, and a loud failure when the transitions it sends never reach the
replay buffer."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

import harness.learner_bench as bench
from learner.buffer import ReplayBuffer, ReplayTransition
from learner.trainer import SoftQConfig, SoftQLearner

TINY = ["--cases", "300", "--transitions", "150", "--items", "100", "--state-dim", "4", "--top-k", "4",
        "--batch-size", "8", "--poll-size", "64", "--updates", "6", "--warmup", "1", "--rounds", "2", "--quiet"]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_run_reports_ingest_updates_and_baseline(tmp_path):
    out = tmp_path / "learner.json"
    figures = bench.run(_args(TINY + ["--json", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert figures["ingest"]["transitions"] == figures["ingest"]["buffer_rows"] == 150
    assert figures["ingest"]["polls"] == 3 and figures["ingest"]["dead_letters"] == 0
    for value in (figures["ingest"]["transitions_per_s"], figures["updates_per_s"], figures["updates_samples_per_s"],
                  figures["update_ms"], figures["baseline"]["updates_per_s"],
                  figures["baseline"]["updates_samples_per_s"], figures["baseline"]["update_ms"],
                  figures["ratio_vs_baseline"]):
        assert _positive(value)
    assert figures["updates_samples_per_s"] == pytest.approx(8 * figures["updates_per_s"])
    assert figures["ratio_vs_baseline"] == pytest.approx(
        figures["updates_samples_per_s"] / figures["baseline"]["updates_samples_per_s"])
    assert figures["skipped_updates"] == 0 and len(figures["round_update_ms"]) == 2
    assert figures["host"]["torch_threads"] == 1 and figures["host"]["cpus"] >= 1
    assert figures["options"]["batch_size"] == 8 and figures["options"]["device"] == "cpu"


def test_cli_runs_the_bench(tmp_path):
    from cli.main import build_parser, main

    out = tmp_path / "cli.json"
    argv = ["bench", "learner", *TINY, "--json", str(out)]
    args = build_parser(argv).parse_args(argv)
    assert args.bench_module == "harness.learner_bench" and args.transitions == 150 and args.batch_size == 8
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert _positive(figures["updates_samples_per_s"]) and _positive(figures["baseline"]["updates_samples_per_s"])


def test_fails_loudly_when_no_transition_reaches_the_buffer(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "transition_records", lambda n, *a, **k: [b"not a transition"] * n)
    out = tmp_path / "never.json"
    with pytest.raises(bench.BenchError, match=r"0 of the 150 transitions sent reached the replay buffer "
                                               r"\(150 dead-lettered"):
        bench.run(_args(TINY + ["--json", str(out)]))
    assert not out.exists()
    assert bench.main(TINY) == 1
    assert "FAILED: 0 of the 150" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(bench.BenchError, match="torch.cuda.is_available"):
        bench.run(_args(TINY + ["--device", "cuda"]))


def test_bare_loop_computes_the_learners_td_target():
    """Same seed, same weights, same prior and α: the baseline does the learner's arithmetic."""
    d, k = 4, 5
    rng = np.random.default_rng(0)
    config = SoftQConfig(top_k=k, batch_size=16, hidden=16, item_buckets=64)
    buffer = ReplayBuffer.create(capacity=32, state_dim=d, top_k=k, seed=0)
    items = rng.normal(size=(3, d)).astype(np.float32)   # few items, so that votes pile up
    for i in range(32):
        def cases():
            f = np.concatenate([rng.normal(size=(k, d)), items[rng.integers(0, 3, k)],
                                rng.integers(0, 3, (k, 1))], axis=1).astype(np.float32)
            return f, rng.random(k) < 0.8
        (cf, cm), (ncf, ncm) = cases(), cases()
        buffer.add(ReplayTransition(f"t{i}", rng.normal(size=d).astype(np.float32), cf[0], float(i % 3),
                                    i % 7 == 0, 0.5, rng.normal(size=d).astype(np.float32), cf, cm, ncf, ncm))
    batch = buffer.sample(16)
    soft_q = SoftQLearner(d, config)
    bare = bench.BareLoop(d, config, alpha=soft_q.alpha, similarity=soft_q.td_prior.similarity,
                          vote=soft_q.td_prior.vote, batches=[batch])
    assert soft_q.td_prior.vote > 0   # the default prior has a vote term: it is exercised
    expected = soft_q.compute_td_target(batch)
    assert torch.allclose(bare.td_target(bare.batches[0]), expected, atol=1e-5)
    bare.step()
    assert bare.steps == 1
