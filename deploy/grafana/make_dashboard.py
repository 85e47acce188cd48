"""Writes deploy/grafana/dashboards/memento.json (run after changing metrics).

    python deploy/grafana/make_dashboard.py           # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check   # exit 1 if the committed JSON differs

A panel's expressions are strings, or (expression, legend) pairs for a Grafana legendFormat.
tests/test_deploy.py checks that the JSON is this script's output and that every metric name
in it is one the code exports.
"""

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "memento.json"

PANELS = [
    ("Reward per recommendation (5m)", "sum(rate(memento_stream_reward_total[5m])) / sum(rate(memento_stream_transitions_total[5m]))", "short"),
    ("Transitions / s", "sum(rate(memento_stream_transitions_total[1m]))", "ops"),
    ("Stream events / s by type", "sum by (type) (rate(memento_stream_events_total[1m]))", "ops"),
    ("Attribution outcomes / s", "sum by (outcome) (rate(memento_stream_attribution_total[1m]))", "ops"),
    ("Dead letters / s by reason", "sum by (reason) (rate(memento_stream_dead_letters_total[5m]))", "ops"),
    ("Open reward windows", "sum(memento_stream_open_windows)", "short"),
    ("Serving latency p50 / p99 (recommend)", [
        "histogram_quantile(0.5, sum by (le) (rate(memento_serving_request_seconds_bucket{endpoint=\"/v1/recommend\"}[1m])))",
        "histogram_quantile(0.99, sum by (le) (rate(memento_serving_request_seconds_bucket{endpoint=\"/v1/recommend\"}[1m])))"], "s"),
    ("Serving requests / s by status", "sum by (status) (rate(memento_serving_requests_total[1m]))", "ops"),
    # per replica: one replica stuck on an old version must show (alert MementoServingPolicyVersionBehind)
    ("Policy version (each serving replica, and the learner's)", [
        ("max by (instance) (memento_serving_policy_version)", "serving {{instance}}"),
        ("min(memento_serving_policy_version)", "serving min"),
        ("max(memento_learner_checkpoint_version)", "learner")], "short"),
    ("Checkpoint reloads and failures", ["sum(increase(memento_serving_reloads_total[5m]))", "sum(increase(memento_serving_reload_failures_total[5m]))"], "short"),
    ("Serving micro-batch size (mean)", "sum(rate(memento_serving_batch_size_sum[1m])) / sum(rate(memento_serving_batch_size_count[1m]))", "short"),
    ("Entropy of mu (nats)", "avg(memento_serving_mu_entropy_nats_sum / memento_serving_mu_entropy_nats_count)", "short"),
    ("Learner loss and mean Q", ["memento_learner_loss", "memento_learner_q_mean", "memento_learner_target_mean"], "short"),
    ("Learner steps / s and alpha", ["memento_learner_steps_per_second", "memento_learner_alpha"], "short"),
    ("Skipped (non-finite) updates", "sum(increase(memento_learner_skipped_updates_total[5m]))", "short"),
    ("Replay buffer and case banks", ["memento_learner_buffer_size", "sum by (bank) (memento_casebank_cases)"], "short"),
    ("Case bank search latency p99", "histogram_quantile(0.99, sum by (le, bank) (rate(memento_casebank_search_seconds_bucket[1m])))", "s"),
    ("Reward drift: exploration boost, published alpha and floor, drops detected (15m)", [
        "memento_learner_exploration_boost", "memento_learner_published_alpha",
        "memento_learner_published_min_prob", "sum(increase(memento_learner_drift_detections_total[15m]))"], "short"),
    ("Learner reward (drift detector's window mean)", "memento_learner_drift_reward_mean", "short"),
    ("Retrieval priors: share of requests (learner and serving) and mean reward, by prior", [
        "memento_learner_prior_share", "avg by (prior) (memento_serving_policy_prior_share)",
        "memento_learner_prior_reward_mean"], "short"),
    ("Stream consumer lag by topic (uncommitted messages) and stalls (15m)", [
        ("sum by (topic) (max by (topic, partition) (memento_stream_consumer_lag))", "lag {{topic}}"),
        ("sum(max_over_time(memento_stream_stalls_total[15m]))", "stalls")], "short"),
]


def target(j: int, expr) -> dict:
    expr, legend = (expr, None) if isinstance(expr, str) else expr
    t = {"refId": chr(65 + j), "expr": expr, "datasource": {"type": "prometheus", "uid": "prometheus"}}
    if legend is not None:
        t["legendFormat"] = legend
    return t


def panel(i: int, title: str, exprs, unit: str) -> dict:
    exprs = [exprs] if isinstance(exprs, (str, tuple)) else exprs
    return {
        "id": i + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [target(j, e) for j, e in enumerate(exprs)],
    }


def dashboard() -> dict:
    return {
        "uid": "memento-stream", "title": "memento-stream", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["memento"],
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    """The dashboard JSON, as written to ``OUT``."""
    return json.dumps(dashboard(), indent=1) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is not this output")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
