"""``memento bench stream``: throughput and latency of the stream worker, against a trivial Faust
agent (the baseline) and a plain kafka-python consume loop (the ceiling).

One run, on one embedded broker (or ``--bootstrap-servers``), each phase on topics of its own
(:mod:`harness.stream_bench.phases`, one function per phase, called in this order by :func:`run`):

1. **one worker** (``memento worker`` as a process, RocksDB store) started on a backlog of
   ``--events`` synthetic events. The rate is the slope of the worker's
   ``memento_stream_events_total`` from 10% to 90% of the backlog (:func:`sustained_rate`): no
   producer competes for the cores, start-up and tail are left out. Every phase is measured so.
2. **latency**, same worker and topics: events paced at ``--latency-rate`` (default: half the
   rate measured in 1) with event time = wall time at production. A transition's latency is the wall time at which a consumer reads it
   minus the production time of the event that made it emittable under the attribution rules
   (:func:`emission_times`): the first event that moved its partition's watermark past the
   window's close (and, with a session gap, past the hold time, or the user's next event).
3. **two workers** (one group, started together) on the same input as phase 1, produced once
   both hold partitions (noida stalls a rebalance among busy members); their transitions are
   compared with phase 1's. A group that has not drained the input within 5 times the
   one-worker drain time is recorded as ``two_workers_error`` and the run goes on.
4. **baseline**: a Faust agent that decodes and counts (:func:`trivial_app`), measured like 1.
5. **baseline with output**: the same agent, also sending per event as many records, of the
   same mean size and to topics of as many partitions, as the worker of phase 1 produced per
   input event while its rate was measured (changelog, transitions, cases, dead letters:
   :func:`measure_outputs`). The worker's rate against this one leaves out what Faust and
   producing through the broker cost, and measures the worker's own code.
6. **ceiling**: a kafka-python consumer drains the baseline's topics (a backlog of the same
   events), counting messages without decoding.

Figures go to ``--json``: the worker's at the top level, the trivial agent's under ``baseline``,
the producing one's under ``baseline_with_output``, kafka-python's under ``ceiling``, the
worker's rate over each agent's in ``ratio_to_baseline`` and ``ratio_to_baseline_with_output``;
latencies in keys ending ``_ms``, rates in keys ending ``_per_s``.
``os.getloadavg()`` is recorded at the start and the end: on a shared machine, compare runs only
at similar load.

The modules, lowest first: ``events`` (the synthetic events and when each transition becomes
emittable), ``rates`` (sustained rate of a drain), ``metrics`` (what the processes' Prometheus
endpoints say), ``outputs`` (what the worker produces per event), ``agents`` (the trivial agent),
``profiling`` (py-spy), ``transitions`` (reading transitions back), ``truth`` (the rules'
answer, for differing runs), ``ceiling`` (the kafka-python loop), ``bench`` (broker, producer,
processes; one phase's topics), ``phases`` (the phases and :func:`run`), ``command``
(:func:`add_arguments`, :func:`main`); ``python -m harness.stream_bench`` runs :func:`main`.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> a = p.parse_args(["--events", "5000"])
>>> (a.events, a.window, a.session_gap, a.latency_rate)
(5000, 2.0, 3.0, 0.0)
"""

from __future__ import annotations

from harness.stream_bench.agents import trivial_app
from harness.stream_bench.bench import _Bench as _Bench
from harness.stream_bench.bench import _Phase as _Phase
from harness.stream_bench.command import add_arguments, main
from harness.stream_bench.events import BenchEvents, Produced, emission_times
from harness.stream_bench.metrics import wait_until_assigned
from harness.stream_bench.outputs import Output, measure_outputs
from harness.stream_bench.phases import run
from harness.stream_bench.profiling import summarise_profile
from harness.stream_bench.rates import sustained_rate, sustained_span
from memento.measure import percentile

__all__ = ["add_arguments", "run", "main", "BenchEvents", "Produced", "emission_times", "sustained_span", "sustained_rate", "percentile",
           "trivial_app", "summarise_profile", "wait_until_assigned", "Output",
           "measure_outputs"]
# also importable from here, not in __all__: _Bench, _Phase (tests/test_streams_bench.py)
