"""Writes deploy/grafana/dashboards/memento.json (run after changing metrics)."""

import json
from pathlib import Path

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
    ("Policy version (serving vs learner)", ["max(memento_serving_policy_version)", "max(memento_learner_checkpoint_version)"], "short"),
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
]


def panel(i: int, title: str, exprs, unit: str) -> dict:
    exprs = [exprs] if isinstance(exprs, str) else exprs
    return {
        "id": i + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + j), "expr": e, "datasource": {"type": "prometheus", "uid": "prometheus"}}
                    for j, e in enumerate(exprs)],
    }


dashboard = {
    "uid": "memento-stream", "title": "memento-stream", "schemaVersion": 39, "version": 1,
    "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["memento"],
    "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
}
out = Path(__file__).parent / "dashboards" / "memento.json"
out.write_text(json.dumps(dashboard, indent=1) + "\n")
print(f"wrote {out} ({len(PANELS)} panels)")
