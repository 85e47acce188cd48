"""Kafka plumbing shared by every process: client settings, topic creation, producers,
consumers and the dead-letter writer. Production uses these unchanged against Apache Kafka;
only :func:`client_kwargs` differs under the embedded profile."""

from __future__ import annotations

import logging
import ssl
import time
from typing import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2
from kafka.serializer import Serializer
from kafka.errors import KafkaError, TopicAlreadyExistsError

from memento.config import TOPIC_CONFIGS, TOPIC_PARTITIONS, Settings
from memento.schemas import MAX_ORIGINAL_BYTES, DeadLetter, encode

__all__ = ["client_kwargs", "wait_for_broker", "ensure_topics", "make_producer", "make_consumer", "poll",
           "throttle_aiokafka_empty_fetches",
           "DeadLetterWriter", "topic_specs", "topic_configs", "fetch_kwargs", "partition_of", "ssl_context"]

log = logging.getLogger(__name__)


def client_kwargs(settings: Settings) -> dict:
    """kafka-python's connection options for ``settings``' brokers: the servers, and the security
    protocol, SASL credentials and TLS files (the one place they are read; Faust's aiokafka gets
    the same through :func:`ssl_context` and ``streams.app.faust_app_kwargs``).

    >>> s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
    ...              kafka_sasl_username="memento", kafka_sasl_password="pw", kafka_ssl_cafile="/ca.pem")
    >>> kw = client_kwargs(s)
    >>> kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"], kw["ssl_cafile"]
    ('SASL_SSL', 'SCRAM-SHA-512', 'memento', '/ca.pem')
    >>> client_kwargs(Settings())
    {'bootstrap_servers': ['127.0.0.1:9092']}
    """
    kwargs: dict = {"bootstrap_servers": settings.bootstrap_servers.split(",")}
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return kwargs
    kwargs["security_protocol"] = protocol
    if protocol.startswith("SASL_"):
        kwargs.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                      sasl_plain_password=settings.kafka_sasl_password)
    if protocol.endswith("SSL"):
        kwargs.update({f"ssl_{name}": value for name, value in (
            ("cafile", settings.kafka_ssl_cafile), ("certfile", settings.kafka_ssl_certfile),
            ("keyfile", settings.kafka_ssl_keyfile)) if value})
        kwargs["ssl_check_hostname"] = True
    return kwargs


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of ``settings`` (None without TLS): the CA bundle (or the system's), the
    client certificate for mutual TLS, hostname checks on."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None)
    return context


def fetch_kwargs(settings: Settings) -> dict:
    """Options every kafka-python consumer of ``settings``' broker needs to read a backlog.

    noida answers a fetch with everything from the offset to the end of the partition, whatever
    ``fetch_max_bytes`` and ``max_partition_fetch_bytes`` ask (docs/benchmarks.md, "Measurements
    behind code choices"; Tansu honours the limits). kafka-python refuses any answer over its 100 MB
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


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic name → the configs it is created with (:data:`memento.config.TOPIC_CONFIGS`, and
    ``min.insync.replicas`` when set).

    >>> topic_configs(Settings(kafka_replication_factor=3, kafka_min_insync_replicas=2))["memento.cases"]
    {'cleanup.policy': 'compact', 'min.insync.replicas': '2'}
    """
    extra = {"min.insync.replicas": str(settings.kafka_min_insync_replicas)} if settings.kafka_min_insync_replicas else {}
    return {name: {**TOPIC_CONFIGS[role], **extra} for role, name in settings.topics.all().items()}


def ensure_topics(settings: Settings, specs: dict[str, int] | None = None) -> dict[str, int]:
    """Create the project's topics (or those of ``specs``, name → partitions) that do not exist
    yet, with ``settings``' replication factor and the project's topic configs; returns name →
    partitions. An existing topic is left as it is (an operator may have tuned it)."""
    configs = topic_configs(settings)
    specs = topic_specs(settings) if specs is None else specs
    admin = KafkaAdminClient(**client_kwargs(settings))
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, n, settings.kafka_replication_factor, topic_configs=configs.get(name, {}))
                   for name, n in specs.items() if name not in existing]
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
# a consumer that waits in poll() spins at most of a core (docs/benchmarks.md). Under MEMENTO_EMBEDDED_BROKER=noida only, idle polls
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
