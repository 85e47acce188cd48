"""``memento bench serving`` end to end at a toy size, on the real embedded broker: every server
it compares (the trivial one, the same-work reference, serving) answers every request, the swap
is seen, and the figures the issue's targets read are where they are looked for. Not a timed
test: no figure's value is checked, only that the bench measured and read back what it must."""

from __future__ import annotations

import argparse
import json

import pytest

from harness.serving_bench import add_arguments, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_the_bench_measures_the_three_servers_and_the_swap(noida, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--cases", "2000", "--items", "500", "--duration", "1", "--rates", "50",
                              "--swap-rate", "50", "--concurrency", "4", "--item-dim", "8",
                              "--bootstrap-servers", noida.settings().bootstrap_servers,
                              "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    figures = run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    for server in (figures["baseline"], figures["reference"], figures):
        for phase in ("rate_50", "flat_out"):
            assert server[phase]["requests"] > 0 and server[phase]["errors"] == 0, (phase, server[phase])
            assert server[phase]["throughput_per_s"] > 0 and server[phase]["p99_ms"] > 0
    assert figures["swap"]["errors"] == 0 and figures["swap"]["visible_after_ms"] is not None
    assert {"flat_out_throughput_vs_reference", "rate_50_p99_vs_reference",
            "rate_50_server_cpu_vs_reference"} <= set(figures["vs_reference"])
    assert figures["bank"]["recall_at_k"] > 0.9
