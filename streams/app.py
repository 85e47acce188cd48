"""The Faust stream worker: joins served recommendations with users' later actions and emits
transitions (s, c, μ(c|s), r, s′) and new cases.

One agent consumes the actions, recommendations and ticks topics together. All three are keyed
by user id and co-partitioned, so a user's events meet on one partition and one table shard.
Per-user state (history, open windows, recently seen ids) lives in a changelog-backed Faust
table (RocksDB store by default), so a restarted worker recovers it. Windows close in event time,
by a per-partition watermark (:mod:`streams.watermarks`): right after the event that
moves the watermark past them, and on ticks (one per partition every ``tick_interval_s``,
produced by the worker's own timer), which let a partition close its windows when no new user
event arrives. The rules themselves, session ends (``done``) included, are in
:mod:`streams.attribution`. The agent takes events in batches and handles them one by one;
each changed user state is written to the table once per batch, and the batch's outputs are sent
together (:meth:`TransitionWorker.handle_batch`).

A consumer can get stuck without failing (seen after a broker restart: the worker went on
reading its ticks and never again its input partitions, whose unread records it knew of). Two
signals say so, each after ``stall_timeout_s``: the worker's own ticks, accepted by the broker,
stop coming back (:func:`streams.health.consumer_stalled`), or an input partition holds unread records and none
is read (:class:`streams.health.StallWatch`). The worker then stops (gracefully: it leaves its group and
commits only what it processed) and the process exits with :data:`EXIT_CANNOT_DELIVER`, so that
the orchestrator restarts it.

Delivery is at-least-once; transition ids are request ids and case ids derive from request and
event ids, so every consumer downstream is idempotent (docs/streams.md).

Beside this module: the metrics (:mod:`streams.metrics`), lag and stall signals
(:mod:`streams.health`), watermarks (:mod:`streams.watermarks`) and every access to Faust's and
aiokafka's internals (:mod:`streams.compat`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Sequence

import faust
import msgspec
from faust.types import TP, EventT

from memento.config import TOPIC_PARTITIONS, Settings
from memento.encoder import ItemEncoder, RowStateEncoder, case_feature_dim, load_products
from memento.kafka_io import DeadLetterWriter, ssl_context, throttle_aiokafka_empty_fetches
from memento.schemas import (Action, Recommendation, SchemaError, decode, encode, future_time_problem,
                             packed_length)
from streams import compat
from streams.attribution import RewardAttribution
from streams.health import EXIT_CANNOT_DELIVER, StallWatch, consumer_lags, consumer_stalled
from streams.metrics import (ACTION_EVENTS, ASSIGNED, ATTRIBUTION, COMMIT_REFUSALS, CONSUMER_LAG, DEAD_LETTERS,
                             HELD_WINDOWS, HITS, MISSES, OPEN_WINDOWS, ORGANIC_CASES, READ_LAG, RECOMMENDATION_CASES,
                             RECOMMENDATION_EVENTS, REWARD, SESSION_ENDS, STALLS, TICK_EVENTS, TRANSITIONS, WATERMARK)
from streams.watermarks import Watermarks, unread_count

__all__ = ["TransitionWorker", "faust_app_kwargs", "faust_credentials", "USERS_TABLE", "encode_state", "decode_state"]

log = logging.getLogger(__name__)

USERS_TABLE = "memento-users"  # the changelog topic is ``<app id>-memento-users-changelog``

# A user's state in the table (and its changelog): MessagePack of the state dict (msgspec), which
# holds nothing but dicts, lists, strings, numbers, booleans and None. It writes a state in about
# a twentieth of compact JSON's time and reads it in under half (the history's event times, as
# JSON floats, were most of JSON's cost; a state is written once per changed user per batch, more
# than once per input event), floats exactly, and its reader builds plain data only.
_STATE_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(dict)


def encode_state(state: dict[str, Any]) -> bytes:
    """A user's state as the table stores it (:func:`decode_state` reads it back).

    >>> s = {"history": [["7", "click", 1796310303.2355635, "e1"]], "pending": [], "p": 2}
    >>> decode_state(encode_state(s)) == s
    True
    >>> encode_state({"history": [object()]})
    Traceback (most recent call last):
    ...
    TypeError: Encoding objects of type object is unsupported
    """
    return _STATE_ENCODER.encode(state)


def decode_state(raw: bytes | None) -> dict[str, Any] | None:
    """A table value: :func:`encode_state`'s bytes, or the compact JSON that workers wrote before
    2026-12-03 (a rolling upgrade restores those from the changelog; JSON starts with ``{``, which
    is no MessagePack map). Raises ``msgspec.DecodeError`` for anything else.

    >>> decode_state(b'{"history":[],"pending":[],"held":[],"closed":[],"seen":[],"p":1}')["p"]
    1
    >>> decode_state(b"\\x93\\x01\\x02\\x03")
    Traceback (most recent call last):
    ...
    msgspec.ValidationError: Expected `object`, got `array`
    """
    if raw is None:
        return None
    if raw[:1] == b"{":
        return json.loads(raw)
    return _STATE_DECODER.decode(raw)


def faust_app_kwargs(settings: Settings) -> dict[str, Any]:
    """``faust.App`` keyword arguments every stream app of this project uses on ``settings``'
    broker (the worker, and the bench's trivial agent so that both consume alike).

    >>> sorted(faust_app_kwargs(Settings(embedded_broker="noida")))[:3]
    ['broker', 'broker_heartbeat_interval', 'broker_session_timeout']
    """
    throttle_aiokafka_empty_fetches(settings)
    kwargs: dict[str, Any] = dict(
        broker=[f"kafka://{b}" for b in settings.bootstrap_servers.split(",")],
        topic_partitions=TOPIC_PARTITIONS["actions"],
        topic_replication_factor=settings.kafka_replication_factor,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        processing_guarantee="at_least_once",
        # Every input event of the worker writes a changelog record and about half emit a
        # transition and a case: lingering sends them in fewer, larger produce requests, at most
        # 50 ms later (figures in docs/benchmarks.md). Shared so that the bench's producing
        # trivial agent produces alike.
        producer_linger=0.05,
        producer_max_batch_size=256 * 1024,
    )
    if settings.embedded_broker:
        kwargs.update(broker_session_timeout=6.0, broker_heartbeat_interval=1.0)
    credentials = faust_credentials(settings)
    if credentials is not None:
        kwargs["broker_credentials"] = credentials
    return kwargs


def faust_credentials(settings: Settings):
    """Faust's broker credentials for ``settings``' security protocol (None: plaintext): the same
    SASL mechanism, user and password, and TLS context (:func:`memento.kafka_io.ssl_context`),
    that kafka-python gets from :func:`memento.kafka_io.client_kwargs`.

    >>> c = faust_credentials(Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
    ...                                kafka_sasl_username="u", kafka_sasl_password="p"))
    >>> c.protocol.value, c.mechanism.value, c.username
    ('SASL_PLAINTEXT', 'PLAIN', 'u')
    """
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(username=settings.kafka_sasl_username, password=settings.kafka_sasl_password,
                                 mechanism=settings.kafka_sasl_mechanism, ssl_context=context)


def _reason_kind(reason: str) -> str:
    if "not valid JSON" in reason:
        return "invalid_json"
    if "missing field" in reason:
        return "missing_field"
    if "max_windows_per_user" in reason:
        return "over_cap"
    if "max_future_skew_s" in reason:
        return "future_ts"
    return "invalid_field"


class TransitionWorker:
    """Builds the Faust app for one worker process.

    Parameters
    ----------
    settings
        Shared settings (topics, window, rewards, broker).
    worker_id
        Distinguishes workers' local data directories.
    store
        Faust table store URL: ``rocksdb://`` (default) or ``memory://``.
    tick_interval_s
        Wall-clock period of the watermark ticks.
    idle_timeout_s
        Wall-clock seconds after which an input partition that delivered nothing stops holding
        the watermark back, once the consumer knows of no unread message in it.
    tansu_safe_recovery
        Embedded Tansu only: send one record per producer batch so that table recovery after a
        worker restart is complete (Tansu's ListOffsets defect). Costs most of the worker's
        throughput on Tansu; a run that never restarts a worker can turn it off.
    app_id
        Faust application id: the consumer group and the prefix of the changelog topic.
    lag_interval_s
        Wall-clock period of the consumer-lag gauges' update.
    cache_size
        Users whose decoded state is kept in memory in front of the table.
    batch_size, batch_within_s
        The agent takes up to ``batch_size`` events at a time, waiting at most
        ``batch_within_s`` for a batch to fill: events are processed one by one, in arrival
        order, but each user's table entry is written once per batch and the batch's
        transitions and cases are sent together after it.
    stall_timeout_s
        Seconds the worker's own ticks may go unhandled, while the broker accepts new ones and
        the worker holds a ticks partition, before it ends itself to be restarted
        (:func:`consumer_stalled`); 0 = never.

    >>> from memento.config import Settings
    >>> w = TransitionWorker(Settings(data_dir="/tmp/memento-doctest"), store="memory://")
    >>> (w.app.conf.id, w.attribution.session_gap_s)
    ('memento-worker', 1800.0)
    """

    INPUTS = ("action", "recommendation")

    def __init__(self, settings: Settings, *, worker_id: str = "0", store: str = "rocksdb://",
                 tick_interval_s: float = 0.5, idle_timeout_s: float = 5.0, app_id: str = "memento-worker",
                 tansu_safe_recovery: bool = True, lag_interval_s: float = 1.0, cache_size: int = 100_000,
                 batch_size: int = 1000, batch_within_s: float = 0.05, stall_timeout_s: float = 300.0):
        if batch_size < 1 or not batch_within_s > 0:
            raise ValueError(f"TransitionWorker: batch_size must be >= 1 and batch_within_s > 0, got "
                             f"{batch_size} and {batch_within_s}")
        self.settings = settings
        self.batch_size = batch_size
        self.batch_within_s = batch_within_s
        self.tick_interval_s = tick_interval_s
        self.lag_interval_s = lag_interval_s
        if stall_timeout_s < 0:
            raise ValueError(f"TransitionWorker: stall_timeout_s must be >= 0, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        # monotonic times: the last tick handled, and the send time of the last tick the broker accepted
        self._tick_seen_at: float | None = None
        self._tick_delivered_at: float | None = None
        self._stall_watch = StallWatch(stall_timeout_s)
        self.stalled = False  # set when it stopped itself on a stall: the process then exits 70
        catalogue = load_products(settings.products) if settings.products else {}
        encoder = RowStateEncoder(ItemEncoder(settings.item_dim, catalogue), max_len=settings.history_len)
        self.attribution = RewardAttribution(
            encoder, settings.rewards, window_s=settings.window_s,
            allowed_lateness_s=settings.allowed_lateness_s, history_len=settings.history_len,
            session_gap_s=settings.session_gap_s, max_windows=settings.max_windows_per_user)
        self.partitions = TOPIC_PARTITIONS["actions"]
        self.tansu_safe_recovery = tansu_safe_recovery
        self.watermarks = Watermarks(self.INPUTS, idle_timeout_s)
        # (input topic, partition) → (last offset handled, wall time it was handled)
        self._processed: dict[tuple[str, int], tuple[int, float]] = {}
        # input partition → the offset the broker last accepted as committed, where Faust's own
        # record says otherwise (:meth:`_watch_commits`)
        self._broker_committed: dict[TP, int | None] = {}
        self._watched_consumer = None
        # per partition: user → watermark after which close_due has work, and a heap of
        # (time, user) entries of which those that disagree with the dict are stale
        self._due: dict[int, dict[str, float]] = {}
        self._due_heap: dict[int, list[tuple[float, str]]] = {}
        # window occupancy of the indexed partitions: user → (windows not yet emitted, of them
        # held), and the totals the gauges report (so a restarted or rebalanced worker counts
        # the windows it recovered, and stops counting those of partitions it gave up)
        self._windows: dict[int, dict[str, tuple[int, int]]] = {}
        self._window_totals = [0, 0]
        OPEN_WINDOWS.set_function(lambda: self._window_totals[0])
        HELD_WINDOWS.set_function(lambda: self._window_totals[1])
        # decoded states of recently used users (LRU), emptied whenever partitions are revoked:
        # only this worker writes its partitions' states, so the cache cannot go stale otherwise
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.cache_size = cache_size
        # within a batch: states changed and not yet written to the table (user → state), an
        # event of each partition seen (table writes go to the current event's partition), and
        # the messages to send ((topic, key, value), in the order they were made)
        self._dirty: dict[str, dict[str, Any]] = {}
        self._partition_events: dict[int, EventT] = {}
        self._outbox: list[tuple[str, bytes, bytes]] = []
        self.app = self._build_app(app_id, worker_id, store)

    def _build_app(self, app_id: str, worker_id: str, store: str) -> faust.App:
        s = self.settings
        extra = faust_app_kwargs(s)
        if s.embedded_broker == "tansu" and self.tansu_safe_recovery:
            # Tansu answers ListOffsets with the last batch's first offset + 1: one record per
            # batch keeps changelog recovery complete (docs/embedded-brokers.md), at a large cost
            # in producer throughput.
            extra.update(producer_max_batch_size=1)
        app = faust.App(app_id, store=store, datadir=str(s.path("worker", worker_id)), **extra)
        # Table writes queue their changelog records in Faust's producer buffer; past 100 queued
        # records Faust stops delivering events until the buffer is drained, record by record,
        # and with a record per event that stalled the stream for seconds ("producer buffer
        # full"). A deeper buffer lets it drain while events flow; commits still flush it first.
        compat.set_producer_buffer(app, 10_000)
        t = s.topics
        source = app.topic(t.actions, t.recommendations, t.ticks, key_serializer="raw", value_serializer="raw")
        self.ticks_topic = app.topic(t.ticks, key_serializer="raw", value_serializer="raw")
        # values are bytes, written and read by this class (encode_state, decode_state; a cache
        # in front keeps the decoded states of recently active users)
        self.users = app.Table(USERS_TABLE, default=None, partitions=self.partitions, value_type=bytes)
        compat.without_write_ahead_log(self.users)  # the changelog is its log

        @app.agent(source)
        async def join(stream):
            # Faust acknowledges a batch's events (so commits their offsets) once the loop body
            # has processed it; it flushes the producer before committing.
            self._watch_commits(app.consumer)
            async for events in stream.take_events(self.batch_size, within=self.batch_within_s):
                await self.process_batch(events)

        @app.timer(interval=self.tick_interval_s)
        async def tick():
            sent_at = time.monotonic()
            for p in range(self.partitions):
                pending = await self.ticks_topic.send(value=b"{}", partition=p)
            self._on_tick_delivery(pending, sent_at)

        @app.timer(interval=self.lag_interval_s)
        async def lag():
            self.check_stalled(self.update_lag_metrics())

        @app.on_partitions_revoked.connect
        async def on_revoked(app, revoked, **kwargs):
            self._forget()  # (a batch in progress keeps its own changed states in _dirty)
            for tp in revoked:
                if tp.topic in (t.actions, t.recommendations):
                    self.watermarks.forget(tp.partition)
                    self._processed.pop((tp.topic, tp.partition), None)
                    self._broker_committed.pop(tp, None)  # a new assignment seeks to the broker's
                for gauge in (CONSUMER_LAG, READ_LAG):
                    try:
                        gauge.remove(tp.topic, str(tp.partition))
                    except KeyError:
                        pass

        return app

    def _forget(self) -> None:
        """Drop the cached states and the indexes derived from them (rebuilt from the table)."""
        self._due.clear()
        self._due_heap.clear()
        self._windows.clear()
        self._window_totals[:] = [0, 0]
        self._cache.clear()

    def _watch_commits(self, consumer) -> None:
        """Keep the broker's view of committed offsets where Faust's differs: Faust's consumer
        records a commit as done even when the broker refused it (``_commit_offsets`` updates
        ``_committed_offset`` whatever ``_commit`` returned), so after a refusal the lag gauge
        would read 0 for records a restart reads again. A refused commit is counted
        (``memento_stream_commit_refusals_total``) and the partition's lag counts from the
        offset committed before it, until a commit there succeeds."""
        if self._watched_consumer is consumer:
            return
        self._watched_consumer = consumer

        def watch(offsets, before, done: bool) -> None:
            if done:
                for tp in offsets:
                    self._broker_committed.pop(tp, None)
            else:
                COMMIT_REFUSALS.inc()
                log.warning("the broker refused the commit of %s; those records will be read again", dict(offsets))
                for tp, offset in before.items():
                    self._broker_committed.setdefault(tp, offset)

        compat.on_commit_result(consumer, watch)

    def committed_offset(self, tp) -> int | None:
        """The offset the broker holds as committed for input partition ``tp`` (as far as this
        worker knows), None when nothing is."""
        if tp in self._broker_committed:
            return self._broker_committed[tp]
        return compat.committed_offset(self._watched_consumer or self.app.consumer, tp)

    def _on_tick_delivery(self, pending, sent_at: float) -> None:
        """Record ``sent_at`` once the broker has accepted the tick (``pending``: Faust's future
        of the send, or its result)."""
        def accepted(future) -> None:
            if not future.cancelled() and future.exception() is None:
                self._tick_delivered_at = max(self._tick_delivered_at or sent_at, sent_at)

        if isinstance(pending, asyncio.Future):
            pending.add_done_callback(accepted)
        else:
            self._tick_delivered_at = sent_at

    def _holds_a_ticks_partition(self) -> bool:
        try:
            return any(tp.topic == self.settings.topics.ticks for tp in self.app.consumer.assignment())
        except Exception:  # between generations: as if it held one (a stuck rejoin is the case to catch)
            return True

    def check_stalled(self, lags: dict | None = None) -> bool:
        """Stop the worker (:meth:`_stop_stalled`) when its consumer is stuck: its ticks stopped
        coming back (:func:`consumer_stalled`; a worker that holds no ticks partition expects
        none, and one restoring its tables is not stalled) or input partitions of ``lags`` (:meth:`update_lag_metrics`) hold unread records
        that are not read (:class:`StallWatch`)."""
        now = time.monotonic()
        if getattr(self.app, "in_recovery", False):   # restoring tables may take long: not a stall
            if self._tick_seen_at is not None:
                self._tick_seen_at = now
            self._stall_watch.update(now, {})
            return False
        if self._tick_seen_at is not None and not self._holds_a_ticks_partition():
            self._tick_seen_at = now
        if consumer_stalled(self._tick_seen_at, self._tick_delivered_at, self.stall_timeout_s):
            STALLS.labels("ticks").inc()
            self._stop_stalled(f"none of its own ticks came back for "
                               f"{self._tick_delivered_at - self._tick_seen_at:.0f} s while the broker accepted new ones")
            return True
        stuck = self._stall_watch.update(now, {key: (read_lag, self._read_position(key))
                                              for key, (_, read_lag) in (lags or {}).items()})
        if stuck:
            STALLS.labels("input").inc()
            self._stop_stalled(f"input partitions {sorted(stuck)} hold unread records and none was read for "
                               f"{self.stall_timeout_s:g} s")
            return True
        return False

    def _read_position(self, key: tuple[str, int]) -> int | None:
        try:
            return compat.read_offset(self.app.consumer, TP(*key))
        except Exception:
            return None

    def _stop_stalled(self, reason: str) -> None:
        """Stop gracefully (Faust's SIGTERM path: the worker leaves its group and commits only
        what it processed; a batch cut short is not acknowledged, :meth:`process_batch`), and
        let ``memento worker`` exit with :data:`EXIT_CANNOT_DELIVER`; if the stop itself hangs,
        end the process after 30 s."""
        if self.stalled:
            return
        self.stalled = True
        log.critical("stream worker stops: its consumer is stuck (%s); a restart reads the uncommitted input "
                     "again", reason)
        timer = threading.Timer(30.0, os._exit, args=(EXIT_CANNOT_DELIVER,))
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)

    def update_lag_metrics(self) -> dict:
        """Set the lag gauges of every assigned input partition and return the lags
        (:func:`consumer_lags`; empty while the assignment is unknown)."""
        t = self.settings.topics
        consumer = self.app.consumer
        inputs = (t.actions, t.recommendations)
        try:
            assignment = [tp for tp in consumer.assignment() if tp.topic in inputs]
        except Exception:  # not started or between generations: try again next time
            return {}
        for topic in inputs:
            ASSIGNED.labels(topic).set(sum(tp.topic == topic for tp in assignment))
        lags = consumer_lags(assignment, consumer.highwater, self.committed_offset,
                             lambda tp: compat.read_offset(consumer, tp))
        for (topic, partition), (committed_lag, read_lag) in lags.items():
            CONSUMER_LAG.labels(topic, str(partition)).set(committed_lag)
            READ_LAG.labels(topic, str(partition)).set(read_lag)
        return lags

    async def process_batch(self, events: Sequence[EventT]) -> None:
        """:meth:`handle_batch`, and what a failure of it means: Faust's ``take_events`` acknowledges
        a batch even when the loop body raised (its ``finally`` acks every event), which would
        commit input whose outputs were never sent. So the events of a failed batch are marked
        as acknowledged already (their offsets never reach the consumer's commit list), and the
        process ends (:meth:`_exit`): the orchestrator restarts it and it reads them again. A
        cancelled batch (the worker stopping) is marked the same way and the cancellation goes on."""
        try:
            await self.handle_batch(events)
        except BaseException as exc:
            compat.mark_acknowledged(events)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._exit(f"a batch of {len(events)} events could not be processed: {exc!r}")
            raise

    def _exit(self, reason: str) -> None:
        """End the process at once, before Faust can commit anything more (a graceful stop
        would commit what the failed batch's ``finally`` acknowledged)."""
        log.critical("stream worker stops: %s; a restart reads the uncommitted input again", reason)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_CANNOT_DELIVER)

    async def handle_batch(self, events: Sequence[EventT]) -> None:
        """Process consumed events in arrival order, then send the transitions and cases they
        made and write each changed user state to the table once (in that order: a state that
        records a window as closed is never written before its transition is sent).

        Must run inside the agent: the table's reads and writes go to the partition of the
        current event, which is set, before each, to an event of the user's partition
        (:meth:`_table_partition`).
        """
        try:
            partition_events = self._partition_events
            for event in events:
                message = event.message
                partition_events[message.partition] = event
                self.handle(message.topic, message.partition, message.offset, message.key, event.value)
            await self._flush()
        except BaseException:
            # states may have changed without being written: forget them and what was derived
            # from them (process_batch keeps the events from being acknowledged)
            self._forget()
            self._dirty.clear()
            self._outbox.clear()
            raise
        finally:
            self._partition_events.clear()

    def handle(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        """Process one consumed message: update the user's state (in memory) and queue what it
        makes due; :meth:`handle_batch` sends and writes."""
        t = self.settings.topics
        if topic == t.actions or topic == t.recommendations:
            self._processed[(topic, partition)] = (offset, time.time())
        try:
            if topic == t.ticks:
                TICK_EVENTS.inc()
                self._tick_seen_at = time.monotonic()
            elif topic == t.actions:
                self._on_action(partition, decode(Action, value))
            elif topic == t.recommendations:
                self._on_recommendation(partition, decode(Recommendation, value, packed=True))
            else:
                return
            self._close_partition(partition, tick=topic == t.ticks)
        except SchemaError as exc:
            reason = str(exc)
            DEAD_LETTERS.labels(_reason_kind(reason)).inc()
            ATTRIBUTION.labels("malformed").inc()
            log.warning("dead-letter %s[%d]@%d: %s", topic, partition, offset, reason)
            record = DeadLetterWriter.record(topic, partition, offset, reason, value)
            self._outbox.append((t.dead_letter, key, encode(record)))

    async def _flush(self) -> None:
        producer = self.app.producer
        for topic, key, value in self._outbox:
            fut = await producer.send(topic, key, value, partition=None, timestamp=None, headers=None)
            fut.add_done_callback(self._on_delivery)
        self._outbox.clear()
        users = self.users
        by_partition: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for user_id, state in self._dirty.items():
            by_partition.setdefault(state["p"], []).append((user_id, state))
        for partition, changed in by_partition.items():
            self._table_partition(partition)
            for user_id, state in changed:
                users[user_id] = encode_state(state)
        self._dirty.clear()

    def _table_partition(self, partition: int) -> None:
        """Send the table's next reads and writes to ``partition``: make an event of it, of the
        batch being handled, the current event (none outside a batch: a memory store, as in the
        tests that call :meth:`handle` directly, has no partitions)."""
        event = self._partition_events.get(partition)
        if event is not None:
            compat.set_current_event(event)

    def _on_delivery(self, fut) -> None:
        # The producer gave up on this record (its own retries are done): Faust flushes the
        # producer and then commits, so the input that made the record would be committed
        # unless the process ends before that commit.
        if not fut.cancelled() and fut.exception() is not None:
            self._exit(f"an output could not be delivered: {fut.exception()!r}")

    def watermark(self, partition: int) -> float | None:
        """Event-time watermark of a partition (:class:`streams.watermarks.Watermarks`; an input is
        caught up when the consumer knows of no unread message in it, :meth:`_caught_up`)."""
        return self.watermarks.watermark(partition, time.monotonic(), lambda source: self._caught_up(source, partition))

    def _caught_up(self, source: str, partition: int) -> bool:
        """Whether input ``source`` has nothing more in ``partition`` as far as the consumer
        knows: a fetch answered since the last message handled from it, with a high watermark at
        most one offset past the next message to handle (the last offset may be a transaction's
        commit marker, which is never delivered). A partition that Faust stopped fetching (its
        buffer full, the other input being served) has no fresh answer, so it is not caught up
        however close its last high watermark was. Before any message of it is handled, an
        unknown count counts as caught up (an input may have no message at all)."""
        unread = self._unread(source, partition)
        if unread is None:
            return tuple(self._input_tp(source, partition)) not in self._processed
        return unread <= 1

    def _input_tp(self, source: str, partition: int) -> TP:
        t = self.settings.topics
        return TP(t.actions if source == "action" else t.recommendations, partition)

    def _unread(self, source: str, partition: int) -> int | None:
        """Offsets of input ``source``'s ``partition`` that the consumer's latest fetch answer says
        exist past the last one handled (or the committed offset, before any); None when that
        answer is older than the last message handled, or unknown (not fetched yet, not
        assigned, nothing handled or committed)."""
        tp = self._input_tp(source, partition)
        consumer = self.app.consumer
        try:
            highwater = consumer.highwater(tp)
        except Exception:  # not assigned (any more), or the consumer is not started
            return None
        try:
            answered_ms = compat.fetch_answered_ms(consumer, tp)
        except AttributeError:  # another consumer driver: the high watermark alone
            answered_ms = math.inf
        except Exception:
            return None
        handled = self._processed.get(tuple(tp))
        if handled is not None:
            return unread_count(highwater, handled[0] + 1, answered_ms, handled[1])
        return unread_count(highwater, compat.committed_offset(consumer, tp), answered_ms, None)

    def _load(self, user_id: str, partition: int) -> dict[str, Any]:
        cache = self._cache
        state = cache.get(user_id)
        if state is None:
            state = self._dirty.get(user_id)
            if state is None:
                self._table_partition(partition)
                state = decode_state(self.users.get(user_id)) or self.attribution.new_state()
            cache[user_id] = state
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(user_id)
        state["p"] = partition
        return state

    def _save(self, user_id: str, state: dict[str, Any]) -> None:
        """Record a changed state: written to the table at the end of the batch, re-indexed by
        its next close time now."""
        self._dirty[user_id] = state
        partition = state["p"]
        due = self._due.get(partition)
        if due is not None:
            self._count_windows(partition, user_id, state)
            nxt = self.attribution.next_close(state)
            if nxt is None:
                due.pop(user_id, None)
            elif due.get(user_id) != nxt:
                due[user_id] = nxt
                heap = self._due_heap[partition]
                heapq.heappush(heap, (nxt, user_id))
                if len(heap) > 2 * len(due) + 1024:
                    self._due_heap[partition] = heap = [(t, u) for u, t in due.items()]
                    heapq.heapify(heap)

    def _count_windows(self, partition: int, user_id: str, state: dict[str, Any]) -> None:
        counts = self._windows.setdefault(partition, {})
        held = len(state.get("held", ()))
        new = (len(state["pending"]) + held, held)
        old = counts.pop(user_id, (0, 0))
        if new != (0, 0):
            counts[user_id] = new
        totals = self._window_totals
        totals[0] += new[0] - old[0]
        totals[1] += new[1] - old[1]

    def _check_time(self, what: str, ts: float) -> None:
        problem = future_time_problem(ts, time.time(), self.settings.max_future_skew_s)
        if problem is not None:
            raise SchemaError(f"{what}: {problem}")

    def _on_action(self, partition: int, action: Action) -> None:
        ACTION_EVENTS.inc()
        self._check_time("Action", action.ts)
        watermark = self.watermarks.last(partition)
        self.watermarks.advance("action", partition, action.ts, time.monotonic())
        state = self._load(action.user_id, partition)
        outcome = self.attribution.add_action(state, action.event_id, action.item_id, action.action,
                                              action.ts, watermark)
        if outcome == "duplicate":
            ATTRIBUTION.labels("duplicate").inc()
            return
        if outcome == "late":
            ATTRIBUTION.labels("late").inc()
        if action.request_id is None:
            case = self.attribution.organic_case(state, action.event_id, action.item_id, action.action, action.ts,
                                                 packed=True)
            self._outbox.append((self.settings.topics.cases, case.case_id.encode(), encode(case)))
            ORGANIC_CASES.inc()
        self._save(action.user_id, state)

    def _on_recommendation(self, partition: int, rec: Recommendation) -> None:
        RECOMMENDATION_EVENTS.inc()
        d = self.settings.item_dim
        n_state, n_features = packed_length(rec.state), packed_length(rec.case_features)
        if n_state != d or n_features != case_feature_dim(d):
            raise SchemaError(f"Recommendation: fields 'state' and 'case_features' must have {d} and "
                              f"{case_feature_dim(d)} values, got {n_state} and {n_features}")
        self._check_time("Recommendation", rec.ts)
        self.watermarks.advance("recommendation", partition, rec.ts, time.monotonic())
        state = self._load(rec.user_id, partition)
        outcome = self.attribution.add_recommendation(state, RewardAttribution.recommendation_dict(rec))
        if outcome == "duplicate":
            ATTRIBUTION.labels("duplicate").inc()
            return
        if outcome == "over_cap":
            raise SchemaError(f"Recommendation: user {rec.user_id!r} already has "
                              f"{self.attribution.max_windows} reward windows (max_windows_per_user)")
        self._save(rec.user_id, state)

    def _due_index(self, partition: int) -> tuple[dict[str, float], list[tuple[float, str]]]:
        due = self._due.get(partition)
        if due is None:
            due = {}
            self._table_partition(partition)
            states = ((u, decode_state(raw)) for u, raw in self.users.items() if u not in self._dirty)
            self._windows[partition] = {}
            for user_id, state in itertools.chain(states, self._dirty.items()):
                if state and state.get("p") == partition:
                    self._count_windows(partition, user_id, state)
                    nxt = self.attribution.next_close(state)
                    if nxt is not None:
                        due[user_id] = nxt
            self._due[partition] = due
            self._due_heap[partition] = heap = [(t, u) for u, t in due.items()]
            heapq.heapify(heap)
        return due, self._due_heap[partition]

    def _close_partition(self, partition: int, tick: bool = False) -> None:
        """Emit every transition of the partition that its watermark has made due."""
        due, heap = self._due_index(partition)  # built at the partition's first event
        if not tick:
            # fast path after an event: no watermark can pass the earliest due time before the
            # largest event time of every input has
            if not heap:
                return
            largest = self.watermarks.largest_event_time(partition)
            if largest is None or heap[0][0] >= largest:
                return
        watermark = self.watermark(partition)
        if watermark is None:
            return
        if tick:
            WATERMARK.labels(str(partition)).set(watermark)
        now = time.time()
        outbox, topics = self._outbox, self.settings.topics
        while heap and heap[0][0] < watermark:
            t, user_id = heapq.heappop(heap)
            if due.get(user_id) != t:
                continue  # stale entry: the user's due time changed since
            state = self._load(user_id, partition)
            emitted = self.attribution.close_due(state, watermark, now, packed=True)
            for transition, case in emitted:
                outbox.append((topics.transitions, transition.user_id.encode(), encode(transition)))
                outbox.append((topics.cases, case.case_id.encode(), encode(case)))
                TRANSITIONS.inc()
                REWARD.inc(transition.reward)
                RECOMMENDATION_CASES.inc()
                (HITS if transition.reward > 0 else MISSES).inc()
                if transition.done:
                    SESSION_ENDS.inc()
            due.pop(user_id, None)  # _save re-indexes the user
            self._save(user_id, state)
