"""Fixtures shared by every test module: embedded Kafka-protocol brokers, started and stopped by
the tests. Helpers live in :mod:`support` (tests/support/), importable because pytest puts this
folder on ``sys.path`` for its conftest."""

from __future__ import annotations

import pytest

from harness.broker import EmbeddedBroker


@pytest.fixture(scope="module", params=EmbeddedBroker.engines())
def broker(request, tmp_path_factory):
    """One embedded broker per engine (noida, Tansu), shared by a test module."""
    with EmbeddedBroker(request.param, 0, str(tmp_path_factory.mktemp(f"broker-{request.param}"))) as b:
        yield b


@pytest.fixture(scope="module")
def noida(tmp_path_factory):
    """One noida broker shared by a test module."""
    with EmbeddedBroker("noida", 0, str(tmp_path_factory.mktemp("broker-noida"))) as b:
        yield b


@pytest.fixture(scope="module")
def tansu(tmp_path_factory):
    """One Tansu broker shared by a test module."""
    with EmbeddedBroker("tansu", 0, str(tmp_path_factory.mktemp("broker-tansu"))) as b:
        yield b
