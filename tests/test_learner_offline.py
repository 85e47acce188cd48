"""The learner service without a broker: flags → configs, the publish guard, restore on start-up."""

from __future__ import annotations

import argparse

import pytest
import torch

from learner.service import LearnerService, LearnerServiceConfig, options_from_args, add_arguments
from learner.trainer import SoftQConfig
from memento.config import Settings

torch.set_num_threads(1)


def test_flags_build_the_configs():
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--gamma", "0.3", "--target-entropy", "1.5", "--grad-clip", "none",
                              "--loss", "huber", "--prioritized", "--publish-every", "50",
                              "--metrics-port", "0"])
    config = options_from_args(SoftQConfig, args, top_k=8)
    options = options_from_args(LearnerServiceConfig, args)
    assert (config.gamma, config.target_entropy, config.grad_clip, config.loss, config.top_k) == \
        (0.3, 1.5, None, "huber", 8)
    assert config.alpha == SoftQConfig().alpha and config.batch_size == 64   # unset flags: defaults
    assert options.prioritized and options.publish_every == 50 and options.learning_starts == 64
    assert options_from_args(SoftQConfig, parser.parse_args(["--top-k", "4"]), top_k=8).top_k == 4
    with pytest.raises(ValueError, match="loss must be 'mse' or 'huber'"):
        options_from_args(SoftQConfig, parser.parse_args(["--loss", "l1"]))


def test_unhealthy_learner_does_not_publish(tmp_path):
    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=4)
    service = LearnerService(settings, SoftQConfig(top_k=2, hidden=8), LearnerServiceConfig())
    with torch.no_grad():
        next(service.learner.q_net.parameters())[0, 0] = float("nan")
    assert service.publish() is None
    assert service.metrics.publish_refused._value.get() == 1
    assert service.version == -1 and not (tmp_path / "ckpt").exists()


def _settings(tmp_path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=4,
                    top_k=2)


def test_restore_resumes_versions_network_and_buffer(tmp_path):
    from learner.storage import ReplayTransition

    first = LearnerService(_settings(tmp_path), SoftQConfig(top_k=2, hidden=8, seed=0),
                           LearnerServiceConfig(buffer_capacity=16))
    for i in range(5):
        first.buffer.add(ReplayTransition.empty(f"t{i}", state_dim=4, top_k=2, reward=1.0))
    for v in range(3):   # what three publications would have left in the checkpoint dir
        first.learner.save_checkpoint(tmp_path / "ckpt", version=v)
    first.save_state()

    again = LearnerService(_settings(tmp_path), SoftQConfig(top_k=2, hidden=8, seed=5),
                           LearnerServiceConfig(buffer_capacity=16))
    again.restore()
    assert again.version == 2 and len(again.buffer) == 5 and not again.buffer.add(
        ReplayTransition.empty("t3", state_dim=4, top_k=2))
    for a, b in zip(first.learner.q_net.parameters(), again.learner.q_net.parameters()):
        assert torch.equal(a, b)

    (tmp_path / "data" / "learner" / "learner.pt").unlink()   # only the checkpoints are left
    from_checkpoint = LearnerService(_settings(tmp_path), SoftQConfig(top_k=2, hidden=8, seed=9),
                                     LearnerServiceConfig(buffer_capacity=16))
    from_checkpoint.restore()
    for a, b in zip(first.learner.q_net.parameters(), from_checkpoint.learner.q_net.parameters()):
        assert torch.equal(a, b)

    changed = LearnerService(_settings(tmp_path), SoftQConfig(top_k=2, hidden=16, seed=0),
                             LearnerServiceConfig(buffer_capacity=32))
    first.save_state()
    changed.restore()   # different --hidden and --buffer-capacity: start fresh, keep numbering
    assert changed.version == 2 and len(changed.buffer) == 0 and changed.learner.steps == 0
