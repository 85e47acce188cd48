"""Non-blocking Kafka publishing for the request path.

``KafkaProducer.send`` can block (on metadata for a new topic, or when its buffer is full), so
request handlers only queue messages; one thread encodes them (schema records become JSON there,
off the event loop) and hands them to the producer. Messages queued during one turn of the
event loop are handed to that thread together, so it is woken once per turn, not once per
message (each wake-up is a system call, costly on sandboxed hosts). Acks are not awaited per
message; failed sends are logged and counted. :meth:`Publisher.close` drains the queue and
flushes the producer, so nothing accepted is lost on a graceful shutdown.

>>> class Producer:
...     sent = []
...     def send(self, topic, key, value):
...         self.sent.append((topic, key, value))
...         return type("Future", (), {"add_errback": lambda *a: None})()
...     def flush(self, timeout): pass
...     def close(self, timeout): pass
>>> p = Publisher(Producer(), ServingMetrics())
>>> p.publish("t", "k", b"v"), p.publish("t", "k2", b"w")
(True, True)
>>> p.close(); Producer.sent
[('t', 'k', b'v'), ('t', 'k2', b'w')]
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from kafka import KafkaProducer

from memento.schemas import encode
from serving.metrics import ServingMetrics

__all__ = ["Publisher", "PRODUCER_OPTIONS"]

log = logging.getLogger(__name__)

# Records are published off the request path: a longer linger and larger batches halve the
# producer's CPU per record (docs/benchmarks.md).
PRODUCER_OPTIONS = {"linger_ms": 20, "batch_size": 512 * 1024}

_STOP = object()


class Publisher:
    """Queue + thread in front of a :class:`kafka.KafkaProducer`. Call :meth:`publish` from one
    thread (serving's event loop).

    Parameters
    ----------
    producer
        The producer (keys serialised by it, values are bytes).
    metrics
        Where send failures are counted.
    max_queue
        Messages waiting beyond this are refused (:meth:`publish` returns False) rather than
        growing memory without bound while Kafka is unreachable.
    """

    def __init__(self, producer: KafkaProducer, metrics: ServingMetrics, max_queue: int = 100_000):
        self.producer = producer
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # of lists of messages
        self._queued = 0  # messages accepted and not yet handed to the producer
        self._count_lock = threading.Lock()
        self._outbox: list = []  # this event-loop turn's messages
        self._thread = threading.Thread(target=self._run, name="kafka-publisher", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def alive(self) -> bool:
        """The sending thread runs (it ends only at :meth:`close`)."""
        return self._thread.is_alive()

    def publish(self, topic: str, key: str, value: bytes | object) -> bool:
        """Queue ``value`` (bytes, or a schema record to encode) for ``topic``; False when
        ``max_queue`` messages are waiting or the publisher is closed."""
        if self._closed:
            return False
        with self._count_lock:
            if self._queued >= self.max_queue:
                full = True
            else:
                full = False
                self._queued += 1
        if full:
            self.metrics.publish_errors.labels(topic).inc()
            log.error("publish queue full (%d); dropping a message for %s", self.max_queue, topic)
            return False
        self._outbox.append((topic, key, value))
        if len(self._outbox) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._hand_over)
            except RuntimeError:  # not on an event loop: hand over at once
                self._hand_over()
        return True

    def _hand_over(self) -> None:
        batch, self._outbox = self._outbox, []
        if batch:
            self._queue.put(batch)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()  # one event-loop turn's messages
            if batch is _STOP:
                return
            for message in batch:
                self._send(*message)
            with self._count_lock:
                self._queued -= len(batch)

    def _send(self, topic: str, key: str, value) -> None:
        try:
            if not isinstance(value, bytes):
                value = encode(value)
            future = self.producer.send(topic, key=key, value=value)
            future.add_errback(self._failed, topic)
        except Exception as exc:  # noqa: BLE001 - any producer error must be counted
            self._failed(exc, topic)

    def _failed(self, exc: BaseException, topic: str) -> None:
        self.metrics.publish_errors.labels(topic).inc()
        log.error("send to %s failed: %s", topic, exc)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, flush, close the producer."""
        if self._closed:
            return
        self._closed = True
        self._hand_over()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        try:
            self.producer.flush(timeout=timeout)
        finally:
            self.producer.close(timeout=timeout)
