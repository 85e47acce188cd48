"""Kafka plumbing shared by every process: client settings, topic creation, producers,
consumers and the dead-letter writer. Production uses these unchanged against Apache Kafka;
only :func:`client_kwargs` differs under the embedded profile."""

from __future__ import annotations

import logging
import time
from typing import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2
from kafka.serializer import Serializer
from kafka.errors import KafkaError, TopicAlreadyExistsError

from memento.config import TOPIC_PARTITIONS, Settings
from memento.schemas import MAX_ORIGINAL_BYTES, DeadLetter, encode

__all__ = ["client_kwargs", "wait_for_broker", "ensure_topics", "make_producer", "make_consumer", "poll",
           "throttle_aiokafka_empty_fetches",
           "DeadLetterWriter", "topic_specs", "fetch_kwargs", "partition_of"]

log = logging.getLogger(__name__)


def client_kwargs(settings: Settings) -> dict:
    kwargs: dict = {"bootstrap_servers": settings.bootstrap_servers.split(",")}
    return kwargs


def fetch_kwargs(settings: Settings) -> dict:
    """Options every kafka-python consumer of ``settings``' broker needs to read a backlog.

    noida answers a fetch with everything from the offset to the end of the partition, whatever
    ``fetch_max_bytes`` and ``max_partition_fetch_bytes`` ask (measured: one 150 MB answer for a
    150 MB partition; Tansu honours the limits). kafka-python refuses any answer over its 100 MB
    frame guard, reconnects, and asks again, forever, so a consumer with a large backlog (a
    restarted learner, the stream bench's reader) never moves. On noida the guard is raised to
    1 GiB: such a consumer then reads, at the cost of memory for the answer. Apache Kafka
    honours the limits and keeps the default guard."""
    return {"receive_message_max_bytes": 1 << 30} if settings.embedded_broker == "noida" else {}


def consumer_group_kwargs(settings: Settings) -> dict:
    if settings.embedded_broker:
        # Tansu settles a group join after about half the session timeout (embedded-brokers.md).
        return {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
    return {}


def partition_of(key: bytes, partitions: int) -> int:
    """The partition that Kafka's default partitioner (murmur2, as in the Java client and
    kafka-python) gives a record keyed ``key`` on a topic of ``partitions`` partitions.

    >>> partition_of(b"u1", 4), partition_of(b"u2", 4), partition_of(b"u3", 4)
    (0, 2, 2)
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def wait_for_broker(settings: Settings, timeout: float = 30.0) -> None:
    """Block until the broker answers a metadata request, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(**client_kwargs(settings), request_timeout_ms=3000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"no Kafka broker answered at {settings.bootstrap_servers} within "
                       f"{timeout:.0f}s (last error: {last})")


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name → partition count."""
    return {name: TOPIC_PARTITIONS[role] for role, name in settings.topics.all().items()}


def ensure_topics(settings: Settings, replication_factor: int = 1,
                  specs: dict[str, int] | None = None) -> dict[str, int]:
    """Create the project's topics (or those of ``specs``, name → partitions) that do not exist
    yet; returns name → partitions."""
    specs = topic_specs(settings) if specs is None else specs
    admin = KafkaAdminClient(**client_kwargs(settings))
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, n, replication_factor) for name, n in specs.items() if name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not set(specs) <= set(admin.list_topics()):
            time.sleep(0.1)
    finally:
        admin.close()
    return specs


class KeySerializer(Serializer):
    """Message keys are user or case ids: ``str`` keys are UTF-8 encoded, bytes pass through."""

    def serialize(self, topic, headers, data):
        return data.encode() if isinstance(data, str) else data


def make_producer(settings: Settings, **overrides) -> KafkaProducer:
    """A producer with ``acks=all``; keys may be ``str`` (encoded) or bytes."""
    kwargs = dict(acks="all", linger_ms=2, retries=5, key_serializer=KeySerializer())
    kwargs.update(overrides)
    return KafkaProducer(**client_kwargs(settings), **kwargs)


def make_consumer(settings: Settings, topics: Iterable[str], *, group_id: str | None,
                  from_beginning: bool = True, listener=None, **overrides) -> KafkaConsumer:
    kwargs = dict(group_id=group_id, auto_offset_reset="earliest" if from_beginning else "latest",
                  enable_auto_commit=group_id is not None, **consumer_group_kwargs(settings),
                  **fetch_kwargs(settings))
    kwargs.update(overrides)
    consumer = KafkaConsumer(**client_kwargs(settings), **kwargs)
    consumer.subscribe(list(topics), listener=listener)
    return consumer


class DeadLetterWriter:
    """Publishes a message that could not be processed, with the reason, to the dead-letter
    topic. Nothing else in the stream is held back by it."""

    def __init__(self, settings: Settings, producer: KafkaProducer):
        self.topic = settings.topics.dead_letter
        self.producer = producer

    @staticmethod
    def record(source_topic: str, partition: int, offset: int, reason: str, original: bytes | None) -> DeadLetter:
        """The dead letter of a message; of a message longer than ``MAX_ORIGINAL_BYTES`` only
        that many leading bytes are kept (and the reason says so), so that the dead letter of
        any record the broker accepted fits in a record itself.

        >>> d = DeadLetterWriter.record("t", 0, 5, "bad", b"x" * 100_000)
        >>> len(d.original), d.reason
        (65536, 'bad (original: first 65536 of 100000 bytes)')
        """
        original = original or b""
        if len(original) > MAX_ORIGINAL_BYTES:
            reason = f"{reason} (original: first {MAX_ORIGINAL_BYTES} of {len(original)} bytes)"
            original = original[:MAX_ORIGINAL_BYTES]
        text = original.decode("utf-8", errors="backslashreplace")
        return DeadLetter(source_topic=source_topic, partition=partition, offset=offset,
                          reason=reason, original=text, ts=time.time())

    def send(self, source_topic: str, partition: int, offset: int, reason: str, original: bytes | None) -> None:
        log.warning("dead-letter %s[%d]@%d: %s", source_topic, partition, offset, reason)
        self.producer.send(self.topic, value=encode(self.record(source_topic, partition, offset, reason, original)))


# -- embedded-broker profile -------------------------------------------------------------------
# noida-db answers a fetch at once when no data is there instead of waiting fetch_max_wait_ms, so
# a consumer that waits in poll() spins (measured: ~87% of a core for one idle kafka-python
# consumer, ~93% for an idle Faust worker). Under MEMENTO_EMBEDDED_BROKER=noida only, idle polls
# sleep instead. Production (Apache Kafka) never takes these paths.

EMPTY_FETCH_BACKOFF_S = 0.05


def spins_on_empty_fetch(settings: Settings) -> bool:
    return settings.embedded_broker == "noida"


def poll(consumer: KafkaConsumer, settings: Settings, timeout_ms: int, *,
         idle_backoff_s: float = EMPTY_FETCH_BACKOFF_S, **kwargs) -> dict:
    """``consumer.poll(timeout_ms)``, without busy-waiting on a broker that spins idle fetches
    (there, an empty poll sleeps ``min(timeout_ms, idle_backoff_s)``)."""
    if not spins_on_empty_fetch(settings) or not consumer.assignment():
        # a group member still joining makes progress only inside a blocking poll
        return consumer.poll(timeout_ms=timeout_ms, **kwargs)
    records = consumer.poll(timeout_ms=0, **kwargs)
    if not records and timeout_ms > 0:
        time.sleep(min(timeout_ms / 1000.0, idle_backoff_s))
    return records


def throttle_aiokafka_empty_fetches(settings: Settings) -> None:
    """Make aiokafka (under Faust) pause after a fetch that brought nothing, on brokers that do not
    honour ``fetch_max_wait_ms``. Idempotent; a no-op on other brokers."""
    if not spins_on_empty_fetch(settings):
        return
    import asyncio

    from aiokafka.consumer.fetcher import Fetcher

    if getattr(Fetcher._proc_fetch_request, "_memento_throttled", False):
        return
    original = Fetcher._proc_fetch_request

    async def proc_fetch_request(self, assignment, node_id, request):
        has_new_data = await original(self, assignment, node_id, request)
        if not has_new_data:
            try:
                await asyncio.sleep(EMPTY_FETCH_BACKOFF_S)
            except asyncio.CancelledError:  # closing: the fetcher awaits its cancelled tasks
                return False
        return has_new_data

    proc_fetch_request._memento_throttled = True
    Fetcher._proc_fetch_request = proc_fetch_request
