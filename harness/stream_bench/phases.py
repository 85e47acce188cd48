"""The phases of ``memento bench stream``, each a function that measures on the phase's topics and
returns the figures it adds (a dict, in the order its keys appear in the JSON), and :func:`run`,
which calls them in order, top to bottom, and assembles the figures.

Phases that hand something on to a later one (the one worker's transitions to the comparison
with two workers, its outputs to the baseline with output) return ``(that, figures)``. Each
phase prints its line as it ends; the processes of a phase are stopped by :func:`run` once no
later phase needs them (:func:`stop_processes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from harness.stream_bench.bench import _Bench, _Phase
from harness.stream_bench.ceiling import _ceiling
from harness.stream_bench.events import BenchEvents, emission_times
from harness.stream_bench.metrics import _consumed
from harness.stream_bench.outputs import Output, measure_outputs
from harness.stream_bench.profiling import _profile, summarise_profile
from harness.stream_bench.transitions import _TransitionReader, _wait_for
from harness.stream_bench.truth import _truth
from memento.measure import percentile

__all__ = ["run", "run_conditions", "measure_one_worker", "read_one_worker_transitions",
           "measure_worker_outputs", "measure_latency", "measure_two_workers", "measure_baseline",
           "measure_baseline_with_output", "measure_ceiling", "ratios", "read_back_problems",
           "stop_processes", "report"]


def run(args: argparse.Namespace) -> dict:
    """Run every phase; returns (and writes to ``--json``) the figures."""
    from streams.app import USERS_TABLE

    figures: dict = run_conditions(args)
    bench = _Bench(args)
    figures["broker"] = args.bootstrap_servers or args.engine
    try:
        batches, events = bench.events("t")
        total = sum(len(b) for b in batches)
        expected = emission_times(events.produced, window_s=args.window, lateness_s=args.lateness,
                                  session_gap_s=args.session_gap)
        # 1. one worker, draining a backlog; what it emitted and produced
        one = _Phase(bench, "one")
        figures |= measure_one_worker(one, batches, total)
        one_result, read = read_one_worker_transitions(one, expected)
        figures |= read
        outputs, produced = measure_worker_outputs(one, total, USERS_TABLE)
        figures |= produced
        # 2. latency, same worker and topics
        figures |= measure_latency(one, events, figures["events_per_s"])
        stop_processes(bench)
        # 3. two workers, same input as phase 1
        figures |= measure_two_workers(_Phase(bench, "two"), batches, total, events, expected, one_result,
                                       figures["events_per_s"])
        stop_processes(bench)
        # 4. baseline: the trivial agent
        base = _Phase(bench, "base")
        figures |= measure_baseline(base, batches, total)
        stop_processes(bench)
        # 5. baseline with output: the trivial agent, sending what the worker sent
        figures |= measure_baseline_with_output(_Phase(bench, "floor"), batches, total, outputs,
                                                figures["outputs_per_event"])
        stop_processes(bench)
        # 6. ceiling: kafka-python drains the baseline's topics
        figures |= measure_ceiling(base, total)
        figures |= ratios(figures)
    finally:
        figures["loadavg_end"] = list(os.getloadavg())
        bench.close()
    figures["read_back_problems"] = read_back_problems(figures)
    report(figures, args.json)
    return figures


def run_conditions(args: argparse.Namespace) -> dict:
    """The run's parameters and the machine's state at its start.

    >>> import argparse
    >>> a = argparse.Namespace(events=10, users=2, window=2.0, lateness=0.5, session_gap=3.0)
    >>> list(run_conditions(a))
    ['events', 'users', 'window_s', 'allowed_lateness_s', 'session_gap_s', 'cpus', 'loadavg_start']
    """
    return {"events": args.events, "users": args.users, "window_s": args.window,
            "allowed_lateness_s": args.lateness, "session_gap_s": args.session_gap,
            "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())}


def measure_one_worker(one: _Phase, batches: list, total: int) -> dict:
    """Phase 1: the backlog produced flat out (``produce_per_s``), then one worker started on it;
    its sustained rate (``events_per_s``), and with ``--profile`` a py-spy summary of its drain
    (``profile``)."""
    bench, args = one.bench, one.bench.args
    figures: dict = {}
    started = time.time()
    figures["produce_per_s"] = round(total / (one.produce(batches) - started), 1)
    (worker,) = one.start_workers(1)
    spies = []
    if args.profile > 0:
        rate = one.drain(total, at_tenth=lambda: spies.append(
            _profile(worker.pid, args.profile, bench.work / "profile.txt")))
    else:
        rate = one.drain(total)
    spy = spies[0] if spies else None
    figures["events_per_s"] = round(rate, 1)
    print(f"one worker: {rate:.0f} events/s (producer {figures['produce_per_s']:.0f}/s)", flush=True)
    if spy is not None:
        spy.wait(args.profile + 30)
        path = bench.work / "profile.txt"
        figures["profile"] = summarise_profile(path.read_text()) if path.exists() else {"error": "no output"}
        print(f"profile: {json.dumps(figures['profile'])}", flush=True)
    return figures


def read_one_worker_transitions(one: _Phase, expected: dict[str, float]) -> tuple[dict, dict]:
    """The one worker's transitions, read back from the beginning (up to 120 s for the
    ``expected`` ones): ``(transition id → [reward, done], figures)``, the figures counting the
    records read more than once (``duplicate_transitions``)."""
    reader = _TransitionReader(one.settings)
    reader.start()
    one_seen = _wait_for(reader, set(expected), timeout=120)
    reader.close()
    one_result = {tid: one_seen[tid][1:] for tid in expected if tid in one_seen}
    return one_result, {"duplicate_transitions": sum(n - 1 for n in reader.copies.values())}


def measure_worker_outputs(one: _Phase, total: int, users_table: str) -> tuple[list[Output], dict]:
    """What the worker produced per input event while its rate was measured (the changelog of
    its ``users_table``, transitions, cases, dead letters): the producing trivial agent (phase 5)
    sends as much. Returns ``(outputs, figures)``."""
    t = one.settings.topics
    outputs = measure_outputs(one.settings, {
        "changelog": f"{one.app_id}-{users_table}-changelog", "transitions": t.transitions,
        "cases": t.cases, "dead_letter": t.dead_letter}, one.span, 0.8 * total)
    figures = {"outputs_per_event": round(sum(o.per_event for o in outputs), 3),
               "outputs": {o.role: {"per_event": o.per_event, "value_bytes": o.value_bytes} for o in outputs}}
    print(f"worker outputs per input event: {figures['outputs']}", flush=True)
    return outputs, figures


def measure_latency(one: _Phase, events: BenchEvents, one_worker_rate: float) -> dict:
    """Phase 2, on the one worker's topics: events paced at ``--latency-rate`` (default half
    ``one_worker_rate``, at least 50/s) for ``--latency-duration`` s, with event time = production
    time; the latency of each transition from the production of the event that made it emittable
    (:func:`emission_times`, over ``events`` and these) to its reading, split at the record's
    timestamp (sent by the worker)."""
    bench, args = one.bench, one.bench.args
    t = one.settings.topics
    reader = _TransitionReader(one.settings, from_end=True)
    reader.start()
    lat = BenchEvents(args.users, args.item_dim, "l", seed=args.seed + 1)
    topic = {"action": t.actions, "recommendation": t.recommendations}
    rate_target = args.latency_rate or max(50.0, one_worker_rate / 2)
    sent, t0 = 0, time.time()
    while time.time() - t0 < args.latency_duration:
        delay = t0 + sent / rate_target - time.time()
        if delay > 0:
            time.sleep(delay)
        for role, key, value, p in lat.moment(time.time()):
            bench.producer.send(topic[role], key=key, value=value, partition=p.partition)
            sent += 1
    bench.producer.flush()
    phase_s = time.time() - t0
    allowed = emission_times([p for p in events.produced] + lat.produced, window_s=args.window,
                             lateness_s=args.lateness, session_gap_s=args.session_gap)
    allowed = {tid: w for tid, w in allowed.items() if tid.startswith("l-")}
    seen = _wait_for(reader, set(allowed), timeout=30)
    reader.close()
    latencies = [(seen[tid][0] - w) * 1e3 for tid, w in allowed.items() if tid in seen]
    # split: emittable → sent by the worker (record timestamp), sent → read
    sent_ms = [(reader.created[tid] - w) * 1e3 for tid, w in allowed.items() if tid in reader.created]
    read_ms = [(seen[tid][0] - reader.created[tid]) * 1e3 for tid in allowed if tid in reader.created]
    latency = {
        "to_send_p50_ms": round(percentile(sent_ms, 50), 1) if sent_ms else None,
        "send_to_read_p50_ms": round(percentile(read_ms, 50), 1) if read_ms else None,
        "rate_per_s": round(sent / phase_s, 1), "duration_s": round(phase_s, 1),
        "transitions": len(latencies), "missing": len(set(allowed) - set(seen)),
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "max_ms": round(max(latencies), 1) if latencies else None}
    print(f"latency at {latency['rate_per_s']:.0f} events/s: {latency}", flush=True)
    return {"latency": latency, "latency_p50_ms": latency["p50_ms"], "latency_p99_ms": latency["p99_ms"]}


def measure_two_workers(two: _Phase, batches: list, total: int, events: BenchEvents,
                        expected: dict[str, float], one_result: dict, one_worker_rate: float) -> dict:
    """Phase 3: two workers (one group) started, the input of phase 1 produced once both hold
    partitions (noida stalls a rebalance among busy members: they join while idle), their rate
    and their transitions compared with the one worker's ``one_result``. The figures start with
    what is compared (``transitions_expected``, ``one_worker_transitions``).

    A group can stall on a rebalance (noida, docs/embedded-brokers.md): it is given 5 times the
    one-worker drain time, then the run goes on with ``two_workers_error``. Transitions that
    differ are written with the rules' (reward, done) (:func:`_truth`) to
    ``two_workers_differ.json`` in the work directory."""
    bench, args = two.bench, two.bench.args
    two.start_workers(2)
    figures: dict = {"transitions_expected": len(expected), "one_worker_transitions": len(one_result)}
    try:
        two.wait_assigned()  # noida stalls a rebalance among busy members: join while idle
        two.produce(batches)
        rate = two.drain(total, timeout=max(60.0, 5 * total / one_worker_rate))
    except RuntimeError as exc:
        figures["two_workers_error"] = str(exc)
        figures["two_workers_shares"] = [_consumed([p]) for p in two.ports]
        print(f"two workers: {exc} (shares {figures['two_workers_shares']})", flush=True)
    else:
        figures["two_workers_events_per_s"] = round(rate, 1)
        figures["two_workers_shares"] = [_consumed([p]) for p in two.ports]
        reader = _TransitionReader(two.settings)
        reader.start()
        two_seen = _wait_for(reader, set(expected), timeout=120)
        reader.close()
        two_result = {tid: two_seen[tid][1:] for tid in expected if tid in two_seen}
        figures["two_workers_transitions"] = len(two_result)
        figures["two_workers_match_one"] = (bool(expected) and one_result == two_result
                                            and len(one_result) == len(expected))
        differ = sorted(tid for tid in expected if one_result.get(tid) != two_result.get(tid))
        figures["two_workers_differ"] = len(differ)  # (reward, done) of one worker, of two
        figures["two_workers_differ_examples"] = {tid: [one_result.get(tid), two_result.get(tid)]
                                                  for tid in differ[:5]}
        part = {p.request_id: p.partition for p in events.produced if p.role == "recommendation"}
        figures["two_workers_differ_partitions"] = dict(sorted(Counter(part[tid] for tid in differ).items()))
        if differ:  # (partition, one worker's, two workers', the rules' (reward, done))
            truth = _truth(batches, args, set(differ))
            (bench.work / "two_workers_differ.json").write_text(json.dumps(
                {tid: [part[tid], one_result.get(tid), two_result.get(tid), truth.get(tid)]
                 for tid in differ}))
        print(f"two workers: {rate:.0f} events/s; transitions {len(two_result)}/{len(expected)}, "
              f"same as one worker: {figures['two_workers_match_one']}", flush=True)
    return figures


def measure_baseline(base: _Phase, batches: list, total: int) -> dict:
    """Phase 4: the trivial agent (:func:`trivial_app`) started on the backlog; its rate."""
    base.produce(batches)
    base.start_agent()
    rate = base.drain(total)
    figures = {"baseline": {"events_per_s": round(rate, 1)}}
    print(f"baseline (trivial Faust agent): {rate:.0f} events/s", flush=True)
    return figures


def measure_baseline_with_output(floor: _Phase, batches: list, total: int, outputs: list[Output],
                                 outputs_per_event: float) -> dict:
    """Phase 5: the trivial agent again, also sending per event the worker's ``outputs``
    (:func:`measure_worker_outputs`); its rate."""
    floor.produce(batches)
    floor.start_agent(outputs)
    rate = floor.drain(total)
    figures = {"baseline_with_output": {"events_per_s": round(rate, 1), "outputs_per_event": outputs_per_event}}
    print(f"baseline with output (trivial agent sending {outputs_per_event} records "
          f"per event): {rate:.0f} events/s", flush=True)
    return figures


def measure_ceiling(base: _Phase, total: int) -> dict:
    """Phase 6: kafka-python drains the baseline's topics (:func:`_ceiling`)."""
    figures = {"ceiling": {"events_per_s": round(_ceiling(base.settings, total), 1)}}
    print(f"ceiling (kafka-python): {figures['ceiling']['events_per_s']:.0f} events/s", flush=True)
    return figures


def ratios(figures: dict) -> dict:
    """The worker's rate (and two workers', where measured) over each agent's.

    >>> ratios({"events_per_s": 300.0, "baseline": {"events_per_s": 600.0},
    ...         "baseline_with_output": {"events_per_s": 400.0}})
    {'ratio_to_baseline': 0.5, 'ratio_to_baseline_with_output': 0.75}
    """
    out = {}
    for key, reference in (("ratio_to_baseline", "baseline"),
                           ("ratio_to_baseline_with_output", "baseline_with_output")):
        out[key] = round(figures["events_per_s"] / figures[reference]["events_per_s"], 3)
        if "two_workers_events_per_s" in figures:
            out[f"two_workers_{key}"] = round(
                figures["two_workers_events_per_s"] / figures[reference]["events_per_s"], 3)
    return out


def read_back_problems(figures: dict) -> list[str]:
    """The correctness check: a bench that cannot read back what it must check has measured
    nothing. One line per run (one worker, two workers where measured) that read back fewer
    transitions than expected.

    >>> read_back_problems({"transitions_expected": 5, "one_worker_transitions": 5,
    ...                     "two_workers_transitions": 4})
    ['two workers: read back 4 of 5 transitions']
    """
    problems = []
    if figures.get("one_worker_transitions") != figures.get("transitions_expected"):
        problems.append(f"one worker: read back {figures.get('one_worker_transitions')} of "
                        f"{figures.get('transitions_expected')} transitions")
    if "two_workers_transitions" in figures and figures["two_workers_transitions"] != figures["transitions_expected"]:
        problems.append(f"two workers: read back {figures['two_workers_transitions']} of "
                        f"{figures['transitions_expected']} transitions")
    return problems


def stop_processes(bench: _Bench) -> None:
    """Stop the processes of the phase that has ended, and forget them."""
    bench.group.stop_all()
    bench.group.processes.clear()


def report(figures: dict, json_path: str | None) -> None:
    """Print the figures (and write them to ``json_path``); each read-back problem goes to
    stderr as a failure."""
    print(json.dumps(figures, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))
    for problem in figures["read_back_problems"]:
        print(f"memento bench stream: FAILED: {problem}", file=sys.stderr, flush=True)
