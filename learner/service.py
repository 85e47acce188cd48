"""The learner process: Kafka transitions in, versioned soft-Q checkpoints out.

It consumes two topics in one consumer group: *cases* go into a local replica of the case bank,
*transitions* (s, c, μ(c|s), r, s′) get the top-K candidate cases of s and s′ from that replica
and go into the replay buffer (a repeated transition id is ignored and counted). Buffer and
pacing are :class:`learner.loop.TrainingLoop`, the loop ``memento eval`` trains with too: once
the buffer holds ``learning_starts`` transitions, each new transition buys
``updates_per_transition`` gradient updates (at most ``max_updates_per_poll`` between two polls,
at most ``max_update_backlog`` owed); every ``publish_every`` updates (and at most once per
``publish_min_interval_s``) the network is written with
:func:`memento.checkpoint.save_checkpoint`, with the μ it was trained for (the current α, the
floor ``min_prob`` and ``top_k``: serving samples exactly that μ), and announced on the
checkpoints topic. Version 0 (or, after a restart, the next version) is published at start-up
so serving can become ready.
Every new transition's reward also goes to a drift detector (:mod:`learner.drift`, options
:class:`learner.drift.DriftConfig`, ``--drift-detector off`` disables it): a detected drop of
the mean reward raises an exploration boost that the published μ carries (a warmer α, a higher
floor) and that decays back; ``memento_learner_drift_detections_total`` counts the drops and
``memento_learner_exploration_boost`` shows the boost. The detector's window is not saved: after
a restart it starts empty, with no boost.
Versions strictly increase across restarts, even when the checkpoint directory is lost (the
next version also follows the last one announced on the checkpoints topic). The replay buffer
and the optimiser state are saved (synced to disk) on shutdown and every
``state_save_interval_s``, and restored at start-up; a state file that cannot be read (torn,
empty) is skipped with a warning and the network comes from the latest checkpoint. Input offsets
are committed only after a save, and only up to the records handled before it: a crash loses
nothing, the restarted learner reads again what it had not saved (repeated transitions are
dropped by id). The cases topic is read from its start at every assignment, whatever the group
committed: the bank is a replica of it, refilled if its directory was lost or set aside.

Run it as ``memento learner`` (see :func:`add_arguments`) or::

    python -m learner.service --bootstrap-servers 127.0.0.1:9092 --metrics-port 9102
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, start_http_server

from learner.buffer import ReplayBuffer
from learner.candidates import with_candidates
from learner.drift import DriftConfig, RewardDrift
from learner.loop import TrainingLoop, replay_buffer
from learner.trainer import SoftQConfig, SoftQLearner
from memento.checkpoint import ANNOUNCEMENT_KEY, CHECKPOINT_NAME, CheckpointError, load_checkpoint, sign_announcement
from memento.config import Settings, add_settings_arguments, settings_from_args
from memento.options import add_dataclass_options, option, options_from_args
from memento.encoder import case_feature_dim
from memento.kafka_io import DeadLetterWriter, client_kwargs, fetch_kwargs, make_consumer, make_producer, poll
from memento.schemas import MAX_CHECKPOINT_RECORD_BYTES, Case, CheckpointAnnouncement, SchemaError, Transition, decode, encode
from memento.threads import limit_threads

__all__ = ["LearnerServiceConfig", "LearnerService", "LearnerMetrics", "latest_checkpoint",
           "add_arguments", "run_from_args", "main"]

log = logging.getLogger("memento.learner")



@dataclass(frozen=True)
class LearnerServiceConfig:
    """How the learner process feeds, paces and publishes the soft-Q learner."""

    buffer_capacity: int = option(10_000, "replay buffer rows (≈33 kB each at item_dim 32, top_k 64)")
    prioritized: bool = option(False, "prioritized (proportional) replay instead of uniform")
    priority_alpha: float = option(0.6, "prioritized replay: priority exponent")
    priority_beta: float = option(0.4, "prioritized replay: importance-weight exponent")
    learning_starts: int = option(64, "transitions in the buffer before the first update")
    updates_per_transition: float = option(1.0, "gradient updates per new transition (may be < 1)")
    max_updates_per_poll: int = option(256, "cap on updates between two polls (the rest waits)")
    max_update_backlog: int = option(4096, "cap on updates owed; beyond it they are dropped and counted")
    publish_every: int = option(20, "successful updates between two published checkpoints (publish_min_interval_s bounds the rate in the learner process)")
    publish_min_interval_s: float = option(2.0, "minimum seconds between two published checkpoints")
    keep_checkpoints: int = option(50, "checkpoint files kept in the checkpoint dir (older ones deleted)")
    state_save_interval_s: float = option(60.0, "seconds between saves of the replay buffer and optimiser")
    log_every_s: float = option(10.0, "seconds between progress log lines")
    poll_timeout_ms: int = option(200, "Kafka poll timeout")
    max_poll_records: int = option(500, "records per Kafka poll")
    group_id: str = option("memento-learner", "Kafka consumer group id")

    def __post_init__(self):
        if self.buffer_capacity < 1 or self.learning_starts < 1 or self.publish_every < 1:
            raise ValueError("buffer_capacity, learning_starts and publish_every must be >= 1")
        if self.updates_per_transition < 0 or self.max_updates_per_poll < 1 or self.max_update_backlog < 1:
            raise ValueError("updates_per_transition must be >= 0, max_updates_per_poll and "
                             "max_update_backlog >= 1")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


class _DefaultRegistryCollector:
    """Re-exports the default registry (process metrics, the case bank's metrics)."""

    def collect(self):
        yield from REGISTRY.collect()


class LearnerMetrics:
    """The learner's Prometheus metrics, on their own registry (so that several services can
    live in one test process), which also serves the default registry's metrics."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.registry.register(_DefaultRegistryCollector())
        r, p = self.registry, "memento_learner_"
        self.transitions = Counter(p + "transitions", "transitions consumed (valid)", registry=r)
        self.duplicates = Counter(p + "duplicate_transitions", "transitions ignored as duplicates", registry=r)
        self.dead_letters = Counter(p + "dead_letters", "malformed transitions sent to the dead-letter topic", registry=r)
        self.cases = Counter(p + "cases", "cases added to the bank replica", registry=r)
        self.cases_rejected = Counter(p + "cases_rejected", "cases that did not decode or had wrong dims", registry=r)
        self.updates = Counter(p + "updates", "successful gradient updates", registry=r)
        self.skipped = Counter(p + "skipped_updates", "updates skipped as non-finite", registry=r)
        self.dropped = Counter(p + "dropped_updates", "updates owed beyond the backlog cap, not run", registry=r)
        self.publish_refused = Counter(p + "publish_refused", "publications refused: learner unhealthy", registry=r)
        self.publish_failures = Counter(p + "publish_failures", "checkpoints that could not be written "
                                        "(disk full, I/O error); retried after the next update", registry=r)
        self.checkpoints = Counter(p + "checkpoints_published", "checkpoints announced", registry=r)
        self.loss = Gauge(p + "loss", "last update's loss", registry=r)
        self.q_mean = Gauge(p + "q_mean", "last update's mean Q(s, c)", registry=r)
        self.target_mean = Gauge(p + "target_mean", "last update's mean TD target", registry=r)
        self.alpha = Gauge(p + "alpha", "temperature α", registry=r)
        self.entropy = Gauge(p + "policy_entropy", "mean entropy of μ(·|s) in the last batch", registry=r)
        self.buffer_size = Gauge(p + "buffer_size", "transitions in the replay buffer", registry=r)
        self.bank_size = Gauge(p + "bank_size", "cases in the bank replica", registry=r)
        self.version = Gauge(p + "checkpoint_version", "last published policy version", registry=r)
        self.steps_per_s = Gauge(p + "steps_per_second", "gradient updates per second", registry=r)
        self.healthy = Gauge(p + "healthy", "1 when the learner may publish", registry=r)
        self.drift_detections = Counter(p + "drift_detections", "drops of the mean reward detected "
                                        "that raised the exploration boost", registry=r)
        self.drift_suppressed = Counter(p + "drift_suppressed", "drops of the mean reward detected "
                                        "inside the cooldown (no effect)", registry=r)
        self.exploration_boost = Gauge(p + "exploration_boost", "exploration boost in [0, 1] "
                                       "(1 at a detected drop, decaying)", registry=r)
        self.drift_reward_mean = Gauge(p + "drift_reward_mean", "mean reward of the drift "
                                       "detector's adaptive window", registry=r)
        self.published_alpha = Gauge(p + "published_alpha", "α of the last published μ "
                                     "(the boosted one while exploring)", registry=r)
        self.published_min_prob = Gauge(p + "published_min_prob", "per-candidate floor of the "
                                        "last published μ", registry=r)
        self.prior_share = Gauge(p + "prior_share", "share of requests drawn under each retrieval prior "
                                 "(similarity:vote[:recency]) in the last published μ", ["prior"], registry=r)
        self.prior_reward_mean = Gauge(p + "prior_reward_mean", "discounted mean reward of the requests "
                                       "drawn under each retrieval prior", ["prior"], registry=r)
        self.state_restore_failures = Counter(p + "state_restore_failures", "saved learner states "
                                              "that could not be read at start-up (skipped)", registry=r)
        self.committed_offsets = Counter(p + "offset_commits", "input offset commits (each after a state "
                                         "save)", registry=r)


class _CasesFromTheStart(ConsumerRebalanceListener):
    """Rebalance listener: each assigned partition of the cases topic is read from its start,
    whatever the group committed. The learner's bank is a replica of that topic (adding a known
    case is a no-op), so a lost or partly unreadable bank directory is made whole again at the
    next start, as serving's is."""

    def __init__(self, cases_topic: str):
        self.cases_topic = cases_topic
        self.consumer = None

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        cases = [tp for tp in assigned if tp.topic == self.cases_topic]
        if cases and self.consumer is not None:
            self.consumer.seek_to_beginning(*cases)


def last_announced_version(settings: Settings, timeout_s: float = 10.0, scan: int = 1000) -> int | None:
    """The highest version among the last ``scan`` announcements on the checkpoints topic (None
    when it holds none that decode)."""
    consumer = KafkaConsumer(**client_kwargs(settings), **fetch_kwargs(settings), group_id=None,
                             enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(settings.topics.checkpoints) or {0}
        tps = [TopicPartition(settings.topics.checkpoints, p) for p in partitions]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(0, ends[tp] - scan))
        best, deadline = None, time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    try:
                        version = decode(CheckpointAnnouncement, rec.value).version
                    except SchemaError:
                        continue
                    best = version if best is None else max(best, version)
        return best
    finally:
        consumer.close()


def latest_checkpoint(directory: str | Path) -> tuple[int, Path] | None:
    """The highest ``policy-v*.safetensors`` version in ``directory`` and its path.

    >>> import tempfile; from memento.checkpoint import save_checkpoint; from memento.qnet import QNetwork
    >>> d = tempfile.mkdtemp()
    >>> for v in (0, 2, 1):
    ...     _ = save_checkpoint(QNetwork(4, 8), d, version=v, step=0)
    >>> latest_checkpoint(d)[0], latest_checkpoint(d + "/missing")
    (2, None)
    """
    best = None
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.iterdir():
            m = CHECKPOINT_NAME.match(path.name)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), path)
    return best


class LearnerService:
    """The long-running learner.

    Parameters
    ----------
    settings
        Shared settings (bootstrap servers, topics, data and checkpoint dirs, item_dim).
    config
        Soft-Q hyperparameters.
    service
        Buffer, pacing and publishing options.
    drift
        Drift detection and exploration boost (default :class:`learner.drift.DriftConfig`).
    metrics_port
        Port of the Prometheus endpoint (0 picks a free one, None serves none).
    """

    def __init__(self, settings: Settings, config: SoftQConfig | None = None,
                 service: LearnerServiceConfig | None = None, drift: DriftConfig | None = None, *,
                 metrics_port: int | None = None):
        limit_threads(1)  # the demo machine's 2 cores are shared by every process
        self.settings, self.config = settings, config or SoftQConfig(top_k=settings.top_k)
        self.options = service or LearnerServiceConfig()
        self.state_dim = settings.item_dim
        if self.config.top_k != settings.top_k:
            log.warning("learner top_k=%d differs from settings.top_k=%d: serving samples among the "
                        "checkpoint's %d cases, but its bank's IVF probes are tuned for %d",
                        self.config.top_k, settings.top_k, self.config.top_k, settings.top_k)
        self.metrics = LearnerMetrics()
        self.metrics_port = metrics_port
        self.drift = RewardDrift.from_config(drift or DriftConfig())   # None when off
        self.learner = SoftQLearner(self.state_dim, self.config, drift=self.drift)
        self.loop = TrainingLoop(self._new_buffer(), self.options, clock=time.monotonic, drift=self.drift)
        self.state_dir = Path(settings.data_dir, "learner")
        self.checkpoint_dir = Path(settings.checkpoint_dir)
        self.version = -1                 # last published version
        self.published: list[CheckpointAnnouncement] = []
        self.transitions_consumed = 0
        self.duplicates = 0
        self.dead_letters = 0
        self._last_metrics: dict[str, float] = {}
        self._drift_counted = (0, 0)      # drift detections, suppressed drops already exported
        self.bank = None
        self.producer = None
        self.ready = threading.Event()    # set once the start-up checkpoint is announced
        self._handled: dict = {}          # TopicPartition → offset after the last record handled

    def _new_buffer(self) -> ReplayBuffer:
        return replay_buffer(self.options, self.state_dim, self.config.top_k, self.config.seed)

    @property
    def buffer(self) -> ReplayBuffer:
        """The replay buffer (the training loop's)."""
        return self.loop.buffer

    # -- state ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Restore the replay buffer, optimiser state and the latest version number."""
        latest = latest_checkpoint(self.checkpoint_dir)
        if latest is not None:
            self.version = latest[0]
        learner_path = self.state_dir / "learner.pt"
        restored = False
        if learner_path.exists():
            try:
                self.learner.load(learner_path)
                restored = True
                log.info("restored learner state (%d updates) from %s", self.learner.steps, learner_path)
            except Exception as exc:  # --hidden changed since, or a torn or empty file (EOFError, BadZipFile)
                log.warning("not restoring the learner state from %s: %r", learner_path, exc)
                self.metrics.state_restore_failures.inc()
                self.learner = SoftQLearner(self.state_dim, self.config, drift=self.drift)
        if not restored and latest is not None:
            data = latest[1].read_bytes()
            try:
                net = load_checkpoint(latest[1], hashlib.sha256(data).hexdigest(),
                                      expect_state_dim=self.state_dim)
                self.learner.load_network(net)
                log.info("restored policy network from %s", latest[1])
            except (CheckpointError, ValueError) as exc:
                log.warning("not restoring the network from %s: %s", latest[1], exc)
        try:
            self.buffer.load(self.state_dir / "replay")
            log.info("restored replay buffer: %d transitions", len(self.buffer))
        except FileNotFoundError:
            pass
        except Exception as exc:  # --buffer-capacity or --top-k changed since, or a torn file
            log.warning("starting with an empty replay buffer: the saved one cannot be used (%r)", exc)
            self.metrics.state_restore_failures.inc()
            self.loop.buffer = self._new_buffer()

    def continue_versions(self) -> None:
        """Make the next version follow the last one announced on the checkpoints topic too (a
        lost checkpoint directory must not restart versions at 0: serving ignores any version
        not above the one it serves)."""
        announced = last_announced_version(self.settings)
        if announced is not None and announced > self.version:
            log.warning("the checkpoints topic announced version %d, above the last file here (%d): "
                        "continuing from it", announced, self.version)
            self.version = announced

    def save_state(self) -> None:
        self.buffer.save(self.state_dir / "replay")
        self.learner.save(self.state_dir / "learner.pt")

    def _mark_handled(self, records: Sequence) -> None:
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            self._handled[tp] = max(self._handled.get(tp, 0), rec.offset + 1)

    def save_and_commit(self, consumer) -> None:
        """Save the state, then commit the offsets of the records handled before it (never
        further: a record polled but not handled is read again after a restart)."""
        self.save_state()
        if consumer is not None and self._handled:
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._handled.items()})
            self.metrics.committed_offsets.inc()

    # -- publishing -----------------------------------------------------------------------
    def publish(self) -> CheckpointAnnouncement | None:
        """Save and announce the next version; None (and counted) if the learner is unhealthy."""
        if not self.learner.healthy:
            self.metrics.publish_refused.inc()
            log.warning("not publishing: the learner is unhealthy (%d skipped updates)",
                        self.learner.skipped_updates)
            return None
        version = self.version + 1
        published = self.learner.policy_params()   # once: the checkpoint and the gauges show the same μ
        try:
            ann = self.learner.save_checkpoint(self.checkpoint_dir, version=version, metrics=self._last_metrics,
                                               policy=published)
        except OSError as exc:  # disk full, I/O error: serving keeps the last version; retried later
            self.metrics.publish_failures.inc()
            log.error("could not write policy v%d (%r); serving keeps v%d, retrying after the next update",
                      version, exc, self.version)
            return None
        if self.settings.checkpoint_key:
            ann = dataclasses.replace(ann, signature=sign_announcement(ann, self.settings.checkpoint_key))
        self.producer.send(self.settings.topics.checkpoints, key=ANNOUNCEMENT_KEY, value=encode(ann))
        self.producer.flush(timeout=10)
        self.version = version
        self.published.append(ann)
        self.metrics.checkpoints.inc()
        self.metrics.version.set(version)
        self.metrics.published_alpha.set(published.alpha)
        self.metrics.published_min_prob.set(published.min_prob)
        selector = self.learner.prior_selector
        if selector is not None:
            for prior, entry, mean in zip(selector.priors, published.priors, selector.means()):
                self.metrics.prior_share.labels(prior.key).set(entry[-1])
                self.metrics.prior_reward_mean.labels(prior.key).set(mean)
        log.info("published policy v%d (step %d) %s", version, ann.step, ann.path)
        self._prune_checkpoints()
        return ann

    def _prune_checkpoints(self) -> None:
        versions = sorted((int(m.group(1)), p) for p in self.checkpoint_dir.iterdir()
                          if (m := CHECKPOINT_NAME.match(p.name)))
        for _, path in versions[: -self.options.keep_checkpoints]:
            path.unlink(missing_ok=True)

    # -- ingestion ------------------------------------------------------------------------
    def _decode_case(self, raw: bytes) -> Case | None:
        try:
            case = decode(Case, raw)
        except SchemaError as exc:
            log.warning("ignoring case: %s", exc)
            return None
        if len(case.state) != self.state_dim or len(case.item_vec) != self.state_dim:
            log.warning("ignoring case %s: state/item_vec have %d/%d dims, expected %d", case.case_id,
                        len(case.state), len(case.item_vec), self.state_dim)
            return None
        return case

    def _check_transition(self, t: Transition) -> None:
        d, f = self.state_dim, case_feature_dim(self.state_dim)
        for name, expected in (("state", d), ("next_state", d), ("case_features", f)):
            if len(getattr(t, name)) != expected:
                raise SchemaError(f"Transition: field {name!r} has {len(getattr(t, name))} values, "
                                  f"expected {expected} (item_dim {d})")
        if not 0.0 < t.propensity <= 1.0:
            raise SchemaError(f"Transition: field 'propensity' must be in (0, 1], got {t.propensity}")

    def handle(self, records: Sequence) -> int:
        """Process one poll's records (cases first, then transitions); returns new transitions."""
        topics = self.settings.topics
        cases, transitions = [], []
        for rec in records:
            if rec.topic == topics.cases:
                case = self._decode_case(rec.value)
                if case is None:
                    self.metrics.cases_rejected.inc()
                else:
                    cases.append(case)
            elif rec.topic == topics.transitions:
                try:
                    t = decode(Transition, rec.value)
                    self._check_transition(t)
                except SchemaError as exc:
                    self.dead_letters += 1
                    self.metrics.dead_letters.inc()
                    self.dead_letter.send(rec.topic, rec.partition, rec.offset, str(exc), rec.value)
                    continue
                transitions.append(t)
        if cases:
            self.metrics.cases.inc(self.bank.add(cases))
            self.metrics.bank_size.set(len(self.bank))
        return self._ingest(transitions) if transitions else 0

    def _ingest(self, transitions: list[Transition]) -> int:
        n = len(transitions)
        dropped = self.loop.dropped
        added = self.loop.add(with_candidates(transitions, self.bank, self.config.top_k),
                              on_new=lambda i: self.learner.observe_priors(transitions[i:i + 1]))
        self._drift_metrics()
        self.duplicates += n - added
        self.metrics.duplicates.inc(n - added)
        self.metrics.dropped.inc(self.loop.dropped - dropped)
        self.transitions_consumed += n
        self.metrics.transitions.inc(n)
        self.metrics.buffer_size.set(len(self.buffer))
        return added

    def _drift_metrics(self) -> None:
        """Bring the drift counters and gauges up to the detector's state."""
        d, m = self.drift, self.metrics
        if d is None:
            return
        m.drift_detections.inc(d.detections - self._drift_counted[0])
        m.drift_suppressed.inc(d.suppressed - self._drift_counted[1])
        self._drift_counted = (d.detections, d.suppressed)
        m.exploration_boost.set(d.boost)
        if math.isfinite(d.window_mean):
            m.drift_reward_mean.set(d.window_mean)

    # -- training -------------------------------------------------------------------------
    def train(self, stop: threading.Event) -> int:
        """Spend the update credit, at most ``max_updates_per_poll``; returns the updates run."""
        return self.loop.step(self._update, self.publish, batch_size=self.config.batch_size,
                              max_updates=self.options.max_updates_per_poll, stop=stop)

    def _update(self, batch) -> np.ndarray | None:
        """One soft-Q update, with its metrics; the TD errors, or None when it was skipped."""
        m = self.learner.update(batch)
        self.metrics.healthy.set(1.0 if self.learner.healthy else 0.0)
        if m["skipped"]:
            self.metrics.skipped.inc()
            log.warning("skipped a non-finite update (loss=%s, q_mean=%s)", m["loss"], m["q_mean"])
            return None
        self.metrics.updates.inc()
        self._last_metrics = {k: m[k] for k in ("loss", "q_mean", "target_mean", "alpha", "entropy")}
        self.metrics.loss.set(m["loss"])
        self.metrics.q_mean.set(m["q_mean"])
        self.metrics.target_mean.set(m["target_mean"])
        self.metrics.alpha.set(m["alpha"])
        self.metrics.entropy.set(m["entropy"])
        return self.learner.last_td_errors

    # -- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume, train and publish until ``stop`` is set; saves its state on the way out."""
        from memory_store import CaseBank  # imported here: the bank pulls in faiss

        server = None
        consumer = None
        self.bank = CaseBank(self.settings.path("learner-bank"), dim=self.state_dim)
        try:
            self.restore()
            self.metrics.buffer_size.set(len(self.buffer))
            self.metrics.bank_size.set(len(self.bank))
            if self.metrics_port is not None:
                server, _ = start_http_server(self.metrics_port, registry=self.metrics.registry)
                self.metrics_port = server.server_port
                log.info("metrics on :%d/metrics", self.metrics_port)
            self.producer = make_producer(self.settings, max_request_size=MAX_CHECKPOINT_RECORD_BYTES)
            self.dead_letter = DeadLetterWriter(self.settings, self.producer)
            self.continue_versions()
            if self.publish() is None:
                raise RuntimeError("could not publish the start-up version (non-finite weights, or the "
                                   "checkpoint could not be written: see the log); refusing to start")
            self.loop.mark_published()
            self.ready.set()
            topics = self.settings.topics
            listener = _CasesFromTheStart(topics.cases)
            consumer = make_consumer(self.settings, [topics.transitions, topics.cases],
                                     group_id=self.options.group_id, enable_auto_commit=False,
                                     max_poll_records=self.options.max_poll_records, listener=listener)
            listener.consumer = consumer
            last_log = last_save = time.monotonic()
            steps_at_log = self.learner.steps
            while not stop.is_set():
                # do not idle in poll while updates are owed
                polled = poll(consumer, self.settings, 0 if self.loop.owed else self.options.poll_timeout_ms)
                records = [rec for recs in polled.values() for rec in recs]
                if records:
                    self.handle(records)
                    self.producer.flush(timeout=10)  # dead letters out before the offsets can move
                    self._mark_handled(records)
                self.train(stop)
                now = time.monotonic()
                if now - last_log >= self.options.log_every_s:
                    rate = (self.learner.steps - steps_at_log) / (now - last_log)
                    self.metrics.steps_per_s.set(rate)
                    m = self._last_metrics
                    log.info("transitions %d (dup %d, dead %d) buffer %d bank %d | updates %d "
                             "(skipped %d) %.1f steps/s | loss %.4f Q %.3f target %.3f alpha %.3f "
                             "entropy %.3f | policy v%d", self.transitions_consumed, self.duplicates,
                             self.dead_letters, len(self.buffer), len(self.bank), self.learner.steps,
                             self.learner.skipped_updates, rate, m.get("loss", math.nan),
                             m.get("q_mean", math.nan), m.get("target_mean", math.nan),
                             self.learner.alpha, m.get("entropy", math.nan), self.version)
                    if self.drift is not None and (self.drift.boost or self.drift.detections):
                        log.info("reward drift: %d drops detected, exploration boost %.2f, window "
                                 "mean reward %.3f (before the last drop %.3f)", self.drift.detections,
                                 self.drift.boost, self.drift.window_mean, self.drift.reference)
                    last_log, steps_at_log = now, self.learner.steps
                if now - last_save >= self.options.state_save_interval_s:
                    self.save_and_commit(consumer)
                    last_save = now
        finally:
            try:
                self.save_and_commit(consumer)
            except Exception as exc:  # the group may be gone on shutdown; the next start reads again
                log.warning("final save or offset commit failed: %r", exc)
            finally:
                if consumer is not None:
                    consumer.close(autocommit=False)
                if self.producer is not None:
                    self.producer.flush(timeout=10)
                    self.producer.close(timeout=10)
                self.bank.close()
                if server is not None:
                    server.shutdown()
                    server.server_close()
            log.info("learner stopped at policy v%d after %d updates", self.version, self.learner.steps)


# -- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``memento learner`` flags; unset flags fall back to MEMENTO_* env vars, then defaults."""
    add_settings_arguments(parser)
    parser.add_argument("--metrics-port", type=int, default=9102,
                        help="Prometheus port (0 = any free port, -1 = none; default 9102)")
    add_dataclass_options(parser, SoftQConfig, "soft-Q hyperparameters")
    add_dataclass_options(parser, LearnerServiceConfig, "replay, pacing and publishing")
    add_dataclass_options(parser, DriftConfig, "reward drift detection and exploration boost")
    return parser


def run_from_args(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Build the service from parsed flags and env vars, run it until SIGINT/SIGTERM."""
    settings = settings_from_args(args)
    config = options_from_args(SoftQConfig, args, top_k=settings.top_k)
    options = options_from_args(LearnerServiceConfig, args)
    drift = options_from_args(DriftConfig, args)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    log.info("learner starting: %s | %s | %s | %s", settings.bootstrap_servers, config, options, drift)
    port = None if args.metrics_port is not None and args.metrics_port < 0 else args.metrics_port
    LearnerService(settings, config, options, drift, metrics_port=port).run(stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="memento learner", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
