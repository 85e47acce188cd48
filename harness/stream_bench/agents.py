"""The trivial agent, the baseline: a Faust app that decodes and counts (:func:`trivial_app`),
optionally also sending what the worker sends, run as ``python -m harness.stream_bench agent``
(:func:`_run_agent`)."""

from __future__ import annotations

import argparse
import json
from typing import Iterable

from harness.stream_bench.outputs import Output

__all__ = ["trivial_app"]


def trivial_app(settings, app_id: str, datadir: str, registry=None, outputs: Iterable["Output"] = ()):
    """A Faust app that decodes every action and recommendation and counts them (the baseline):
    the worker's consumer settings, its topics, none of its work. Exports the same
    ``memento_stream_events_total`` and ``memento_stream_assigned_partitions`` as the worker, in
    ``registry`` (a fresh one by default).

    With ``outputs`` (the baseline with output), it also sends, after each event and through the
    worker's producer settings, ``per_event`` records of ``value_bytes`` bytes keyed by the
    event's key to each output's ``topic`` (fractions carry over from event to event): what
    producing the worker's records through the broker costs, without the worker's work.

    >>> from memento.config import Settings
    >>> trivial_app(Settings(), "bench-agent", "/tmp/memento-doctest-agent").conf.id
    'bench-agent'
    """
    import faust
    from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge

    from memento.schemas import Action, Recommendation, decode
    from streams.app import faust_app_kwargs

    registry = CollectorRegistry() if registry is None else registry
    events = PCounter("memento_stream_events_total", "Events decoded by the trivial agent", ["type"],
                      registry=registry)
    assigned = Gauge("memento_stream_assigned_partitions", "Input partitions assigned", ["topic"],
                     registry=registry)
    t = settings.topics
    app = faust.App(app_id, store="memory://", datadir=datadir, **faust_app_kwargs(settings))
    source = app.topic(t.actions, t.recommendations, key_serializer="raw", value_serializer="raw")
    by_topic = {t.actions: (Action, events.labels("action")),
                t.recommendations: (Recommendation, events.labels("recommendation"))}

    sends = [[o.topic, o.per_event, b"x" * o.value_bytes, 0.0] for o in outputs]  # credit last

    @app.agent(source)
    async def count(stream):
        producer = app.producer
        async for event in stream.events():
            schema, counter = by_topic[event.message.topic]
            decode(schema, event.value)
            counter.inc()
            for send in sends:
                send[3] += send[1]
                while send[3] >= 1.0:
                    send[3] -= 1.0
                    await producer.send(send[0], event.message.key, send[2], partition=None,
                                        timestamp=None, headers=None)

    @app.timer(interval=1.0)
    async def report():
        tps = app.consumer.assignment()
        for topic in (t.actions, t.recommendations):
            assigned.labels(topic).set(sum(tp.topic == topic for tp in tps))

    return app


def _run_agent(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.stream_bench agent")
    p.add_argument("--app-id", required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--datadir", required=True)
    p.add_argument("--outputs", default="[]", help="JSON list of Output fields (what to send per event)")
    a = p.parse_args(argv)
    from faust import Worker
    from prometheus_client import CollectorRegistry, start_http_server

    from memento.config import Settings

    registry = CollectorRegistry()  # not the default one, where streams.app's metrics live
    start_http_server(a.metrics_port, addr="127.0.0.1", registry=registry)
    outputs = [Output(**o) for o in json.loads(a.outputs)]
    app = trivial_app(Settings.from_env(), a.app_id, a.datadir, registry=registry, outputs=outputs)
    worker = Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None  # as in streams.worker: no root logger at DEBUG
    worker.execute_from_commandline()
    return 0
