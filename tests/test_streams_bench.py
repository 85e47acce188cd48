"""``memento bench stream``'s baseline with output, against the real embedded broker: the
producing trivial agent sends what it is told per input event, and :func:`measure_outputs` reads
back exactly that, by the records' timestamps."""

from __future__ import annotations

import argparse
import math

import pytest

from harness.stream_bench import Output, _Bench, _Phase, add_arguments, measure_outputs

pytestmark = pytest.mark.integration


def test_producing_trivial_agent_sends_the_measured_outputs(noida, tmp_path):  # noqa: F811
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--events", "600", "--users", "50", "--item-dim", "4",
                              "--bootstrap-servers", noida.settings().bootstrap_servers,
                              "--work-dir", str(tmp_path)])
    bench = _Bench(args)
    try:
        batches, _ = bench.events("t")
        total = sum(len(b) for b in batches)
        phase = _Phase(bench, "floor")
        phase.produce(batches)
        told = [Output("changelog", "-", 4, 0.5, 100), Output("cases", "-", 2, 1.25, 40),
                Output("dead_letter", "-", 1, 0.0, 10)]
        phase.start_agent(told)
        phase.drain(total, timeout=120)
        topics = {o.role: f"{phase.prefix}.out.{o.role}" for o in told}
        measured = measure_outputs(phase.settings, topics, (0.0, math.inf), total)
        # noida answers a fetch with all it holds of every partition asked for: read together,
        # the changelog's 4 partitions (~30 kB) would be over this guard, and nothing was read
        guarded = measure_outputs(phase.settings, topics, (0.0, math.inf), total, frame_guard=12_000)
        before = measure_outputs(phase.settings, topics, (0.0, phase.span[0] - 60), total)
    finally:
        bench.close()
    assert measured == [Output("changelog", topics["changelog"], 4, round(int(total * 0.5) / total, 4), 100),
                        Output("cases", topics["cases"], 2, round(int(total * 1.25) / total, 4), 40)]
    assert before == []  # records are counted by their timestamps
    assert guarded == measured  # one partition at a time: each answer is under the guard
