"""``memento bench serving``: latency, throughput and swap-visibility of serving under load.

The bench builds a serving case bank of ``--cases`` cases on disk, starts an embedded broker
(unless ``--bootstrap-servers`` is given) and serving as a separate process, announces a
checkpoint, then drives ``/v1/recommend`` from another process (the load generator,
``python -m harness.serving_bench drive``): open-loop at each fixed ``--rates`` value, then flat out with
``--concurrency`` connections, then at a moderate rate while a new checkpoint is announced, to
time announcement → first response carrying the new version.

Data: item vectors come from the shared :class:`~memento.encoder.ItemEncoder` over a catalogue
of ``--items`` ids with power-law popularity; each case's state is what
:class:`~memento.encoder.StateEncoder` makes of a history of 1–5 clicks on such items, and every
request carries such a history as ``context.recent_items``, so queries look like the cases.

Baseline, in the same run and under the same load generator: a trivial aiohttp server with the
same number of worker processes and the same event loop that parses the request JSON and
answers a fixed recommendation — the cost of HTTP alone on this machine. The load generator
speaks HTTP/1.1 over keep-alive connections with pre-encoded requests; open-loop latencies run
from each request's scheduled send time, so a stalled server cannot hide queueing delay.

Reference, in the same run, on the same bank and under the same load: the same-work server of
:mod:`harness.serving_bench.reference`, which does only what a recommendation cannot avoid (state
encoding, one search, the numpy Q over the same K, sampling, one record through a producer with
serving's settings). Ours over it, phase by phase, is under ``vs_reference``: what serving's own
code costs beyond the work.

The package, one part each: :mod:`~harness.serving_bench.workload` (catalogue, histories,
request bodies), :mod:`~harness.serving_bench.load` (the load generator), the servers compared
(:mod:`~harness.serving_bench.baseline`, :mod:`~harness.serving_bench.reference`; serving itself
is ``python -m serving.cli``), :mod:`~harness.serving_bench.bank` (the bank and its search alone),
:mod:`~harness.serving_bench.control` (starting, probing and stopping processes),
:mod:`~harness.serving_bench.phases` (one function per phase, each returning its figures) and
:mod:`~harness.serving_bench.bench` (the options, and ``run``: the phases top to bottom).

Figures go to ``--json``: latencies in keys ending ``_ms``, rates in keys ending ``_per_s``,
the baseline's under ``baseline``, the reference's under ``reference``.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_arguments(p)
>>> p.parse_args(["--cases", "1000", "--duration", "2"]).rates
[500.0]
>>> summarise([(1.0, 0.002, 200, 1), (1.5, 0.004, 200, 1), (1.6, 0.1, 503, None)], 1.0)["errors"]
1
"""

from __future__ import annotations

from harness.serving_bench.baseline import serve_baseline
from harness.serving_bench.bench import add_arguments, main, run
from harness.serving_bench.load import drive, summarise
from harness.serving_bench.workload import request_bodies

__all__ = ["add_arguments", "run", "main", "drive", "summarise", "request_bodies", "serve_baseline"]
