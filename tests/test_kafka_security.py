"""Kafka client security and topic settings: one set of settings reaches every client.

The embedded brokers speak plaintext only, so what a secured cluster needs is shown where it can
be without one: the settings read from the environment (secrets from files), the options both
client libraries are built with (kafka-python's, and the credentials Faust hands to aiokafka),
and the created topics' configs as a broker enforces them.
"""

from __future__ import annotations

import ssl
import tempfile

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from memento.config import Settings, TopicNames
from memento.kafka_io import client_kwargs, ensure_topics, make_producer

CAFILE = ssl.get_default_verify_paths().cafile


def _secured_env(tmp_path) -> dict[str, str]:
    secret = tmp_path / "sasl-password"
    secret.write_text("kafka-pw-123\n")
    return {"MEMENTO_BOOTSTRAP_SERVERS": "kafka-0.kafka:9093,kafka-1.kafka:9093",
            "MEMENTO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MEMENTO_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "MEMENTO_KAFKA_SASL_USERNAME": "memento", "MEMENTO_KAFKA_SASL_PASSWORD_FILE": str(secret),
            "MEMENTO_KAFKA_SSL_CAFILE": CAFILE or "", "MEMENTO_KAFKA_REPLICATION_FACTOR": "3",
            "MEMENTO_KAFKA_MIN_INSYNC_REPLICAS": "2"}


@pytest.mark.skipif(not CAFILE, reason="no system CA bundle to stand for the cluster's CA")
def test_security_settings_reach_kafka_python_and_faust(tmp_path):
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streams.app import TransitionWorker

    settings = Settings.from_env(_secured_env(tmp_path), data_dir=str(tmp_path / "data"))
    assert settings.kafka_sasl_password == "kafka-pw-123"   # from the file, newline dropped
    assert "kafka-pw-123" not in repr(settings) and "kafka-pw-123" not in settings.describe()
    # kafka-python: built (api_version given, so no connection is tried) with the same options
    expected = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "memento", "sasl_plain_password": "kafka-pw-123", "ssl_cafile": CAFILE}
    for client in (KafkaProducer, KafkaConsumer):
        built = client(**client_kwargs(settings), api_version=(2, 5, 0))
        assert {k: built.config[k] for k in expected} == expected, client
        built.close()
    # Faust: the worker's app carries the credentials, and aiokafka gets the same protocol and user
    worker = TransitionWorker(settings, store="memory://")
    auth = credentials_to_aiokafka_auth(worker.app.conf.broker_credentials)
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["sasl_plain_username"],
            auth["sasl_plain_password"]) == ("SASL_SSL", "SCRAM-SHA-512", "memento", "kafka-pw-123")
    assert isinstance(auth["ssl_context"], ssl.SSLContext) and auth["ssl_context"].check_hostname
    assert worker.app.conf.topic_replication_factor == 3   # Faust's changelogs are replicated alike


def test_bad_security_settings_are_refused_with_their_name(tmp_path):
    with pytest.raises(ValueError, match="kafka_security_protocol must be one of"):
        Settings(kafka_security_protocol="TLS")
    with pytest.raises(ValueError, match="SASL_SSL needs kafka_sasl_username and a password"):
        Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u")
    with pytest.raises(ValueError, match="kafka_sasl_mechanism must be one of"):
        Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="GSSAPI")
    with pytest.raises(ValueError, match="cannot exceed"):
        Settings(kafka_replication_factor=1, kafka_min_insync_replicas=2)
    with pytest.raises(ValueError, match="MEMENTO_KAFKA_SASL_PASSWORD_FILE: cannot read"):
        Settings.from_env({"MEMENTO_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "missing")})


@pytest.mark.integration
def test_created_topics_carry_their_configs():
    """noida enforces compaction: a record without a key on the compacted cases topic is refused,
    so the topic was created with ``cleanup.policy=compact`` (memento.config.TOPIC_CONFIGS)."""
    from harness.broker import EmbeddedBroker

    with EmbeddedBroker("noida", 0, tempfile.mkdtemp(prefix="memento-topics-")) as broker:
        settings = broker.settings(topics=TopicNames().prefixed("cfg"))
        ensure_topics(settings)
        producer = make_producer(settings, retries=0)
        producer.send(settings.topics.cases, key="case-1", value=b"{}").get(timeout=10)   # keyed: kept
        with pytest.raises(KafkaError, match="(?i)key"):
            producer.send(settings.topics.cases, value=b"{}").get(timeout=10)
        producer.send(settings.topics.actions, value=b"{}").get(timeout=10)   # not compacted: accepted
        producer.close(5)
