"""Checkpoint announcements that must not be acted on. Before the fix serving read any announced
path (``/dev/zero`` included: a 1 GiB read of zeros), any file announced under any version,
and had no way to tell the learner's announcements from anyone's."""

from __future__ import annotations

import dataclasses
import os
from collections import namedtuple

import pytest

from memento.checkpoint import save_checkpoint, sign_announcement
from memento.config import Settings
from memento.qnet import QNetwork
from memento.schemas import encode
from serving.followers import CheckpointFollower
from serving.metrics import ServingMetrics
from support.common import RecordingProducer

pytestmark = pytest.mark.faults

Record = namedtuple("Record", "topic partition offset value")


def _follower(tmp_path, key: str = ""):
    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=4,
                        checkpoint_key=key)
    served = []
    follower = CheckpointFollower(settings, ServingMetrics(), lambda: served[-1][1].version if served else None,
                                  lambda checkpoint, ann: served.append((checkpoint, ann)))
    return follower, settings, served


def _announce(follower, ann, offset=0) -> None:
    follower._handle([Record(follower.topic, 0, offset, encode(ann))])


def test_only_the_learners_file_for_that_version_is_read(tmp_path):
    """Announcements by file only (a checkpoint over the inline limit, or an older learner)."""
    follower, settings, served = _follower(tmp_path)
    good = dataclasses.replace(save_checkpoint(QNetwork(4, 8), settings.checkpoint_dir, version=1, step=0), data=None)
    _announce(follower, dataclasses.replace(good, version=5))                       # an old file as a new version
    _announce(follower, dataclasses.replace(good, version=6, path="/dev/zero"))     # not a checkpoint file
    os.symlink("/dev/zero", os.path.join(settings.checkpoint_dir, "policy-v000007.safetensors"))
    _announce(follower, dataclasses.replace(good, version=7, path="/elsewhere/policy-v000007.safetensors"))
    assert served == []
    assert "is not policy-v000005.safetensors" in follower.rejected[5]
    assert "is not policy-v000006.safetensors" in follower.rejected[6]
    assert "not a regular file" in follower.rejected[7]
    assert follower.metrics.reload_failures._value.get() == 3
    # the learner's copy may live in another directory (a shared volume mounted elsewhere)
    _announce(follower, dataclasses.replace(good, path="/learner/ckpt/policy-v000001.safetensors"))
    assert [ann.version for _, ann in served] == [1]


def test_with_a_key_only_signed_announcements_are_served(tmp_path):
    follower, settings, served = _follower(tmp_path, key="s3cret")
    ann = save_checkpoint(QNetwork(4, 8), settings.checkpoint_dir, version=1, step=0)
    _announce(follower, ann)
    ann2 = save_checkpoint(QNetwork(4, 8), settings.checkpoint_dir, version=2, step=0)
    _announce(follower, dataclasses.replace(ann2, signature=sign_announcement(ann2, "other key")))
    assert served == [] and "not signed" in follower.rejected[1] and "wrong signature" in follower.rejected[2]
    ann3 = save_checkpoint(QNetwork(4, 8), settings.checkpoint_dir, version=3, step=0)
    _announce(follower, dataclasses.replace(ann3, signature=sign_announcement(ann3, "s3cret")))
    assert [a.version for _, a in served] == [3]
    assert "s3cret" not in repr(settings) and "s3cret" not in settings.describe()


def test_the_learner_signs_its_announcements(tmp_path):
    from learner.service import LearnerService, LearnerServiceConfig
    from learner.trainer import SoftQConfig
    from memento.checkpoint import announcement_problem

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=4,
                        top_k=2, checkpoint_key="s3cret")
    service = LearnerService(settings, SoftQConfig(top_k=2, hidden=8), LearnerServiceConfig(), metrics_port=None)
    service.producer = RecordingProducer()
    ann = service.publish()
    assert ann.signature and announcement_problem(ann, "s3cret") is None
    assert announcement_problem(ann, "other") == "announcement of version 0 has a wrong signature"


def test_a_full_disk_while_writing_a_checkpoint_is_counted_and_retried(tmp_path, monkeypatch):
    """Before the fix the OSError of a full disk left the learner's publish, ended its loop and
    the process, and left a partial ``.tmp`` file; now the version is not announced, the failure
    is counted, no partial file remains, and the next publication writes that version."""
    import errno

    from learner.service import LearnerService, LearnerServiceConfig
    from learner.trainer import SoftQConfig
    from memento import checkpoint as checkpoint_module

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ckpt"), item_dim=4, top_k=2)
    service = LearnerService(settings, SoftQConfig(top_k=2, hidden=8), LearnerServiceConfig(), metrics_port=None)
    service.producer = producer = RecordingProducer()
    sent = producer.sent
    assert service.publish().version == 0
    real_fsync = checkpoint_module.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", full)
    assert service.publish() is None and len(sent) == 1
    assert service.metrics.publish_failures._value.get() == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["policy-v000000.safetensors"]
    monkeypatch.setattr(checkpoint_module.os, "fsync", real_fsync)
    assert service.publish().version == 1 and len(sent) == 2


def test_the_checkpoint_travels_in_its_announcement_and_is_verified_before_it_is_parsed(tmp_path):
    """No volume shared with the learner: the announcement carries the file's bytes, serving's
    checkpoint directory does not have the file, and the checkpoint is served from the bytes.
    Bytes that do not match the (signed) sha256, or that are not base64, are rejected before
    any parsing; a checkpoint over the inline limit is announced by file only."""
    import base64

    from memento import checkpoint

    follower, settings, served = _follower(tmp_path, key="s3cret")
    learner_dir = tmp_path / "learner-only"
    ann = save_checkpoint(QNetwork(4, 8), learner_dir, version=1, step=0)
    assert ann.data is not None and not os.path.exists(os.path.join(settings.checkpoint_dir, "policy-v000001.safetensors"))
    _announce(follower, dataclasses.replace(ann, signature=sign_announcement(ann, "s3cret")))
    assert [a.version for _, a in served] == [1] and served[0][0].net.state_dim == 4

    ann2 = save_checkpoint(QNetwork(4, 8), learner_dir, version=2, step=0)
    raw = bytearray(base64.b64decode(ann2.data))
    raw[-1] ^= 1                                                                 # one bit flipped in a weight
    tampered = dataclasses.replace(ann2, data=base64.b64encode(bytes(raw)).decode())
    _announce(follower, dataclasses.replace(tampered, signature=sign_announcement(tampered, "s3cret")))
    ann3 = save_checkpoint(QNetwork(4, 8), learner_dir, version=3, step=0)
    garbled = dataclasses.replace(ann3, data="not base64!")
    _announce(follower, dataclasses.replace(garbled, signature=sign_announcement(garbled, "s3cret")))
    assert "does not match the announced" in follower.rejected[2]
    assert "not base64" in follower.rejected[3]
    assert [a.version for _, a in served] == [1]

    small = checkpoint.MAX_INLINE_CHECKPOINT_BYTES
    try:
        checkpoint.MAX_INLINE_CHECKPOINT_BYTES = 1000
        big = save_checkpoint(QNetwork(4, 8), learner_dir, version=4, step=0)
    finally:
        checkpoint.MAX_INLINE_CHECKPOINT_BYTES = small
    assert big.data is None and os.path.getsize(big.path) > 1000
