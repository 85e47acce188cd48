"""The Faust stream worker: joins served recommendations with users' later actions and emits
transitions (s, c, μ(c|s), r, s′) and new cases.

One agent consumes the actions, recommendations and ticks topics together. All three are keyed
by user id and co-partitioned, so a user's events meet on one partition and one table shard.
Per-user state (history, open windows, recently seen ids) lives in a changelog-backed Faust
table (RocksDB store by default), so a restarted worker recovers it. Windows close in event time,
by a per-partition watermark (:meth:`TransitionWorker.watermark`); ticks (one per partition every
``tick_interval_s``, produced by the worker's own timer) let a partition close its windows when
no new user event arrives. The rules themselves are in :mod:`streams.attribution`.

Delivery is at-least-once; transition ids are request ids and case ids derive from request and
event ids, so every consumer downstream is idempotent (docs/streams.md).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from prometheus_client import Counter, Gauge

from memento.config import TOPIC_PARTITIONS, Settings
from memento.encoder import ItemEncoder, StateEncoder, load_products
from memento.kafka_io import DeadLetterWriter, throttle_aiokafka_empty_fetches
from memento.schemas import Action, Recommendation, SchemaError, decode, encode
from streams.attribution import RewardAttribution

__all__ = ["TransitionWorker", "EVENTS", "DEAD_LETTERS", "TRANSITIONS", "CASES", "ATTRIBUTION"]

log = logging.getLogger(__name__)

EVENTS = Counter("memento_stream_events_total", "Events consumed by the stream worker", ["type"])
DEAD_LETTERS = Counter("memento_stream_dead_letters_total", "Messages sent to the dead-letter topic", ["reason"])
TRANSITIONS = Counter("memento_stream_transitions_total", "Transitions emitted")
REWARD = Counter("memento_stream_reward_total", "Sum of the rewards of emitted transitions")
CASES = Counter("memento_stream_cases_total", "Cases emitted", ["source"])
ATTRIBUTION = Counter("memento_stream_attribution_total", "Attribution outcomes", ["outcome"])
OPEN_WINDOWS = Gauge("memento_stream_open_windows", "Recommendations whose reward window is open")
WATERMARK = Gauge("memento_stream_watermark_seconds", "Event-time watermark by partition", ["partition"])


def _reason_kind(reason: str) -> str:
    if "not valid JSON" in reason:
        return "invalid_json"
    if "missing field" in reason:
        return "missing_field"
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
        the watermark back.
    tansu_safe_recovery
        Embedded Tansu only: send one record per producer batch so that table recovery after a
        worker restart is complete (Tansu's ListOffsets defect). Costs most of the worker's
        throughput on Tansu; a run that never restarts a worker can turn it off.
    """

    INPUTS = ("action", "recommendation")

    def __init__(self, settings: Settings, *, worker_id: str = "0", store: str = "rocksdb://",
                 tick_interval_s: float = 0.5, idle_timeout_s: float = 5.0, app_id: str = "memento-worker",
                 tansu_safe_recovery: bool = True):
        self.settings = settings
        self.tick_interval_s = tick_interval_s
        catalogue = load_products(settings.products) if settings.products else {}
        encoder = StateEncoder(ItemEncoder(settings.item_dim, catalogue), max_len=settings.history_len)
        self.attribution = RewardAttribution(
            encoder, settings.rewards, window_s=settings.window_s,
            allowed_lateness_s=settings.allowed_lateness_s, history_len=settings.history_len)
        self.partitions = TOPIC_PARTITIONS["actions"]
        self.idle_timeout_s = idle_timeout_s
        self.tansu_safe_recovery = tansu_safe_recovery
        self.watermarks: dict[int, float] = {}
        self._input_latest: dict[int, dict[str, tuple[float, float]]] = {}
        self._due: dict[int, dict[str, float]] = {}
        self.app = self._build_app(app_id, worker_id, store)

    def _build_app(self, app_id: str, worker_id: str, store: str) -> faust.App:
        s = self.settings
        throttle_aiokafka_empty_fetches(s)
        extra: dict[str, Any] = {}
        if s.embedded_broker:
            extra.update(broker_session_timeout=6.0, broker_heartbeat_interval=1.0)
        if s.embedded_broker == "tansu" and self.tansu_safe_recovery:
            # Tansu answers ListOffsets with the last batch's first offset + 1: one record per
            # batch keeps changelog recovery complete (docs/embedded-brokers.md), at a large cost
            # in producer throughput.
            extra.update(producer_max_batch_size=1)
        app = faust.App(
            app_id,
            broker=[f"kafka://{b}" for b in s.bootstrap_servers.split(",")],
            store=store,
            datadir=str(s.path("worker", worker_id)),
            topic_partitions=self.partitions,
            topic_replication_factor=1,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            processing_guarantee="at_least_once",
            **extra,
        )
        t = s.topics
        source = app.topic(t.actions, t.recommendations, t.ticks, key_serializer="raw", value_serializer="raw")
        self.transitions_topic = app.topic(t.transitions, key_serializer="raw", value_serializer="raw")
        self.cases_topic = app.topic(t.cases, key_serializer="raw", value_serializer="raw")
        self.dead_letter_topic = app.topic(t.dead_letter, key_serializer="raw", value_serializer="raw")
        self.ticks_topic = app.topic(t.ticks, key_serializer="raw", value_serializer="raw")
        self.users = app.Table("memento-users", default=None, partitions=self.partitions)

        @app.agent(source)
        async def join(stream):
            async for event in stream.events():
                await self.handle(event.message.topic, event.message.partition, event.message.offset,
                                  event.message.key, event.value)

        @app.timer(interval=self.tick_interval_s)
        async def tick():
            for p in range(self.partitions):
                await self.ticks_topic.send(value=b"{}", partition=p)

        @app.on_partitions_revoked.connect
        async def on_revoked(app, revoked, **kwargs):
            self._due.clear()

        return app

    async def handle(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        t = self.settings.topics
        try:
            if topic == t.ticks:
                await self._close_partition(partition)
            elif topic == t.actions:
                await self._on_action(partition, decode(Action, value))
            elif topic == t.recommendations:
                await self._on_recommendation(partition, decode(Recommendation, value))
        except SchemaError as exc:
            reason = str(exc)
            DEAD_LETTERS.labels(_reason_kind(reason)).inc()
            ATTRIBUTION.labels("malformed").inc()
            log.warning("dead-letter %s[%d]@%d: %s", topic, partition, offset, reason)
            record = DeadLetterWriter.record(topic, partition, offset, reason, value)
            await self.dead_letter_topic.send(key=key, value=encode(record))

    def _advance(self, source: str, partition: int, ts: float) -> None:
        latest = self._input_latest.setdefault(partition, {})
        previous = latest.get(source)
        latest[source] = (ts if previous is None else max(ts, previous[0]), time.monotonic())

    def watermark(self, partition: int) -> float | None:
        """Event-time watermark of a partition: the smallest, over the input topics, of the largest
        event time consumed from that topic's partition. Faust does not interleave topics in event
        time, so one topic may be read ahead of the other; the minimum keeps a window open until
        both have passed its end. An input that delivered nothing for ``idle_timeout_s`` is idle
        and does not hold the watermark back (when all are idle, the largest time counts)."""
        latest = self._input_latest.get(partition)
        if not latest:
            return None
        now = time.monotonic()
        active = [ts for ts, seen in latest.values() if now - seen < self.idle_timeout_s]
        if len(latest) < len(self.INPUTS) and active:
            return None  # an input not heard from yet may still hold earlier events
        wm = min(active) if active else max(ts for ts, _ in latest.values())
        wm = max(wm, self.watermarks.get(partition, float("-inf")))
        self.watermarks[partition] = wm
        return wm

    def _load(self, user_id: str, partition: int) -> dict[str, Any]:
        state = self.users.get(user_id)
        if state is None:
            state = self.attribution.new_state()
        state["p"] = partition
        return state

    def _save(self, user_id: str, state: dict[str, Any]) -> None:
        self.users[user_id] = state
        due = self._due.get(state["p"])
        if due is not None:
            nxt = self.attribution.next_close(state)
            if nxt is None:
                due.pop(user_id, None)
            else:
                due[user_id] = nxt

    async def _on_action(self, partition: int, action: Action) -> None:
        EVENTS.labels("action").inc()
        watermark = self.watermarks.get(partition)
        self._advance("action", partition, action.ts)
        state = self._load(action.user_id, partition)
        outcome = self.attribution.add_action(state, action.event_id, action.item_id, action.action,
                                              action.ts, watermark)
        if outcome == "duplicate":
            ATTRIBUTION.labels("duplicate").inc()
            return
        if outcome == "late":
            ATTRIBUTION.labels("late").inc()
        if action.request_id is None:
            case = self.attribution.organic_case(state, action.event_id, action.item_id, action.action, action.ts)
            await self.cases_topic.send(key=case.case_id.encode(), value=encode(case))
            CASES.labels("action").inc()
        self._save(action.user_id, state)

    async def _on_recommendation(self, partition: int, rec: Recommendation) -> None:
        EVENTS.labels("recommendation").inc()
        self._advance("recommendation", partition, rec.ts)
        state = self._load(rec.user_id, partition)
        if self.attribution.add_recommendation(state, RewardAttribution.recommendation_dict(rec)) == "duplicate":
            ATTRIBUTION.labels("duplicate").inc()
            return
        OPEN_WINDOWS.inc()
        self._save(rec.user_id, state)

    def _due_index(self, partition: int) -> dict[str, float]:
        due = self._due.get(partition)
        if due is None:
            due = {}
            for user_id, state in self.users.items():
                if state and state.get("p") == partition:
                    nxt = self.attribution.next_close(state)
                    if nxt is not None:
                        due[user_id] = nxt
            self._due[partition] = due
        return due

    async def _close_partition(self, partition: int) -> None:
        EVENTS.labels("tick").inc()
        watermark = self.watermark(partition)
        if watermark is None:
            return
        WATERMARK.labels(str(partition)).set(watermark)
        due = self._due_index(partition)
        now = time.time()
        for user_id in [u for u, t in due.items() if t < watermark]:
            state = self.users.get(user_id)
            if state is None:
                due.pop(user_id, None)
                continue
            for transition, case in self.attribution.close_due(state, watermark, now):
                key = transition.user_id.encode()
                await self.transitions_topic.send(key=key, value=encode(transition))
                await self.cases_topic.send(key=case.case_id.encode(), value=encode(case))
                TRANSITIONS.inc()
                REWARD.inc(transition.reward)
                CASES.labels("recommendation").inc()
                ATTRIBUTION.labels("hit" if transition.reward > 0 else "miss").inc()
                OPEN_WINDOWS.dec()
            self._save(user_id, state)
