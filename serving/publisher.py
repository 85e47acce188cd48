"""Non-blocking Kafka publishing for the request path.

``KafkaProducer.send`` can block (on metadata for a new topic, or when its buffer is full), so
request handlers only put messages on a queue; one thread hands them to the producer. Acks are
not awaited per message; failed sends are logged and counted. :meth:`Publisher.close` drains the
queue and flushes the producer, so nothing accepted is lost on a graceful shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading

from kafka import KafkaProducer

from serving.metrics import ServingMetrics

__all__ = ["Publisher"]

log = logging.getLogger(__name__)

_STOP = object()


class Publisher:
    """Queue + thread in front of a :class:`kafka.KafkaProducer`.

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
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="kafka-publisher", daemon=True)
        self._thread.start()
        self._closed = False

    def publish(self, topic: str, key: str, value: bytes) -> bool:
        if self._closed:
            return False
        try:
            self._queue.put_nowait((topic, key, value))
            return True
        except queue.Full:
            self.metrics.publish_errors.labels(topic).inc()
            log.error("publish queue full (%d); dropping a message for %s", self._queue.maxsize, topic)
            return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            topic, key, value = item
            try:
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
        self._queue.put(_STOP)
        self._thread.join(timeout)
        try:
            self.producer.flush(timeout=timeout)
        finally:
            self.producer.close(timeout=timeout)
