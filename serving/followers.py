"""Background Kafka consumers that keep a serving process current.

Every follower reads its topic from the beginning without a consumer group: each serving process
(and each of its workers) needs the whole stream, and re-reading is harmless because what they
feed is idempotent (the case bank by case id, the policy by version) or bounded (histories).

* :class:`ActionFollower` folds actions into per-user histories (the state encoder's input);
* :class:`CaseFollower` appends new cases to the serving case bank, in batches;
* :class:`CheckpointFollower` loads each newer announced checkpoint off the event loop and hands
  it over (the network and the μ it was trained for) for an atomic swap; a checkpoint failing
  verification is rejected and counted.

Each runs one :class:`kafka.KafkaConsumer` in its own thread; :meth:`TopicFollower.stop` ends it.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import Callable

from kafka.errors import KafkaError

from memento.checkpoint import Checkpoint, CheckpointError, announcement_problem, read_announced
from memento.config import Settings
from memento.encoder import HistoryEntry
from memento.history import UserHistories
from memento.kafka_io import DeadLetterWriter, make_consumer, poll
from memento.schemas import MAX_CHECKPOINT_RECORD_BYTES, Action, Case, CheckpointAnnouncement, SchemaError, decode
from serving.metrics import ServingMetrics

__all__ = ["TopicFollower", "ActionFollower", "CaseFollower", "CheckpointFollower"]

log = logging.getLogger(__name__)


class TopicFollower(threading.Thread, abc.ABC):
    """Polls one topic from the beginning and hands each batch to :meth:`_handle`.

    Parameters
    ----------
    settings
        Bootstrap servers and topic names.
    topic
        The topic to follow.
    metrics
        Where malformed messages are counted.
    poll_timeout_ms
        Longest wait of one poll (bounds how long :meth:`stop` takes, and how long a new
        message can wait unseen on an embedded broker that answers empty fetches at once;
        there, polling more often cost measurable CPU in every serving process).
    max_records
        Largest batch handed to :meth:`_handle`.
    """

    def __init__(self, settings: Settings, topic: str, metrics: ServingMetrics, *,
                 poll_timeout_ms: int = 200, max_records: int = 1000, consumer_options: dict | None = None):
        super().__init__(name=f"follow-{topic}", daemon=True)
        self.consumer_options = consumer_options or {}
        self.settings = settings
        self.topic = topic
        self.metrics = metrics
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self.records_seen = 0
        self._stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                consumer = make_consumer(self.settings, [self.topic], group_id=None,
                                         from_beginning=True, max_poll_records=self.max_records,
                                         **self.consumer_options)
            except (KafkaError, OSError) as exc:
                log.warning("%s: cannot connect to Kafka at %s (%s); retrying", self.name,
                            self.settings.bootstrap_servers, exc)
                self._stop_event.wait(1.0)
                continue
            try:
                while not self._stop_event.is_set():
                    batches = poll(consumer, self.settings, self.poll_timeout_ms,
                                   idle_backoff_s=self.poll_timeout_ms / 1000.0, max_records=self.max_records)
                    records = [r for part in batches.values() for r in part]
                    if records:
                        self.records_seen += len(records)
                        self._handle(records)
                return
            except KafkaError as exc:
                log.warning("%s: Kafka error (%s); reconnecting from the last position", self.name, exc)
            except Exception as exc:  # a handler bug must be visible, not a silently dead thread
                log.exception("%s stopped on an unexpected error", self.name)
                self.error = exc
                return
            finally:
                consumer.close()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def _malformed(self, record, reason: str) -> None:
        self.metrics.malformed.labels(self.topic).inc()
        log.warning("%s[%d]@%d malformed: %s", record.topic, record.partition, record.offset, reason)

    @abc.abstractmethod
    def _handle(self, records: list) -> None:
        """Process a batch of consumer records (in topic-partition order)."""


class ActionFollower(TopicFollower):
    """Feeds the actions topic into ``histories``. Malformed actions are counted here and
    dead-lettered by the stream worker, which owns that topic's dead letters."""

    def __init__(self, settings: Settings, histories: UserHistories, metrics: ServingMetrics, **kwargs):
        super().__init__(settings, settings.topics.actions, metrics, **kwargs)
        self.histories = histories

    def _handle(self, records: list) -> None:
        for record in records:
            try:
                action = decode(Action, record.value)
            except SchemaError as exc:
                self.metrics.malformed.labels(self.topic).inc()
                log.debug("actions[%d]@%d malformed: %s", record.partition, record.offset, exc)
                continue
            self.histories.add(action.user_id, HistoryEntry(action.item_id, action.action, action.ts, action.event_id))
            self.metrics.actions_seen.inc()


class CaseFollower(TopicFollower):
    """Appends the cases topic to ``bank`` in batches (idempotent by case id).

    Parameters
    ----------
    bank
        ``memory_store.CaseBank`` of dimension ``settings.state_dim``.
    dead_letters
        Optional writer for malformed case messages.
    """

    def __init__(self, settings: Settings, bank, metrics: ServingMetrics,
                 dead_letters: DeadLetterWriter | None = None, **kwargs):
        super().__init__(settings, settings.topics.cases, metrics, **kwargs)
        self.bank = bank
        self.dim = settings.state_dim
        self.dead_letters = dead_letters

    def _handle(self, records: list) -> None:
        cases = []
        for record in records:
            try:
                case = decode(Case, record.value)
                if len(case.state) != self.dim or len(case.item_vec) != self.dim:
                    raise SchemaError(f"Case: fields 'state' and 'item_vec' must have {self.dim} "
                                      f"values, got {len(case.state)} and {len(case.item_vec)}")
            except SchemaError as exc:
                self._malformed(record, str(exc))
                if self.dead_letters is not None:
                    self.dead_letters.send(record.topic, record.partition, record.offset, str(exc),
                                           record.value)
                continue
            cases.append(case)
        if cases:
            added = self.bank.add(cases)
            self.metrics.cases_appended.inc(added)
            self.metrics.cases.set(len(self.bank))


class CheckpointFollower(TopicFollower):
    """Loads announced checkpoints newer than the serving version and calls ``on_policy``.

    Within one batch only the newest loadable announcement is built (a restarted server does
    not replay every old version). A rejected version is never retried.

    Parameters
    ----------
    current_version
        Returns the version now serving (None before the first).
    on_policy
        Called with ``(checkpoint, announcement)`` from this thread after a successful load
        (:class:`memento.checkpoint.Checkpoint`: the network and the μ it was trained for).
    checkpoint_dir
        Where checkpoint files are read, by the announced file's name only (the announced
        directory is the learner's, and may be a shared volume mounted elsewhere); default
        ``settings.checkpoint_dir``.
    """

    def __init__(self, settings: Settings, metrics: ServingMetrics,
                 current_version: Callable[[], int | None],
                 on_policy: Callable[[Checkpoint, CheckpointAnnouncement], None],
                 checkpoint_dir: str | None = None, **kwargs):
        # an announcement carries its checkpoint: let one fetch hold the largest
        kwargs.setdefault("consumer_options", {"max_partition_fetch_bytes": MAX_CHECKPOINT_RECORD_BYTES,
                                               "fetch_max_bytes": MAX_CHECKPOINT_RECORD_BYTES})
        super().__init__(settings, settings.topics.checkpoints, metrics, **kwargs)
        self.current_version = current_version
        self.on_policy = on_policy
        self.checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else settings.checkpoint_dir
        self.rejected: dict[int, str] = {}

    def _read(self, ann: CheckpointAnnouncement) -> Checkpoint:
        """The checkpoint of ``ann``, once its file name is the one the learner writes for that
        version and, with a checkpoint key, the announcement is signed with it: from the bytes
        the announcement carries, else from the file of that name in serving's checkpoint
        directory (a shared volume may be mounted elsewhere than the learner's);
        CheckpointError otherwise."""
        problem = announcement_problem(ann, self.settings.checkpoint_key)
        if problem is not None:
            raise CheckpointError(problem)
        return read_announced(ann, self.checkpoint_dir, expect_state_dim=self.settings.state_dim)

    def _handle(self, records: list) -> None:
        announcements = []
        for record in records:
            try:
                announcements.append(decode(CheckpointAnnouncement, record.value))
            except SchemaError as exc:
                self._malformed(record, str(exc))
        current = self.current_version()
        newer = sorted((a for a in announcements
                        if (current is None or a.version > current) and a.version not in self.rejected),
                       key=lambda a: a.version, reverse=True)
        for ann in newer:
            started = time.perf_counter()
            try:
                if ann.state_dim != self.settings.state_dim:
                    raise CheckpointError(f"announced state_dim {ann.state_dim} != serving's "
                                          f"{self.settings.state_dim}")
                checkpoint = self._read(ann)
            except Exception as exc:  # CheckpointError, or a reader bug: either way not served, and counted
                self.rejected[ann.version] = str(exc)
                self.metrics.reload_failures.inc()
                log.error("rejected checkpoint version %d (%s); still serving version %s",
                          ann.version, exc, current)
                continue
            self.metrics.reload_seconds.observe(time.perf_counter() - started)
            self.on_policy(checkpoint, ann)
            return
