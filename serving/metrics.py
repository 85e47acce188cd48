"""Prometheus metrics of one serving process.

Each :class:`ServingMetrics` owns its registry, so several services (tests, workers) can live in
one interpreter without clashing over metric names.

>>> m = ServingMetrics()
>>> m.reloads.inc()
>>> b"memento_serving_reloads_total 1.0" in m.render()
True
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServingMetrics", "LATENCY_BUCKETS_S"]

# Latency buckets from 0.25 ms to 1 s: the serving target is a few milliseconds.
LATENCY_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1,
                     0.25, 0.5, 1.0)


class ServingMetrics:
    """The metrics serving exports on ``/metrics``.

    Parameters
    ----------
    registry
        Where to register; a fresh :class:`CollectorRegistry` when omitted.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.latency = Histogram("memento_serving_request_seconds", "Request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.requests = Counter("memento_serving_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.policy_version = Gauge("memento_serving_policy_version",
                                    "Version of the policy now serving (-1 before the first)", registry=r)
        self.policy_version.set(-1)
        self.reloads = Counter("memento_serving_reloads", "Checkpoints loaded and swapped in", registry=r)
        self.reload_failures = Counter("memento_serving_reload_failures",
                                       "Announced checkpoints rejected (hash, format or shape)", registry=r)
        self.reload_seconds = Histogram("memento_serving_reload_seconds",
                                        "Time to read, verify and build an announced checkpoint",
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                        registry=r)
        self.policy_overrides = Counter(
            "memento_serving_policy_overrides",
            "Reloads whose checkpoint set a policy option (alpha, min_prob, top_k, similarity_prior, vote_prior) to another value "
            "than serving's flag, by option", ["option"], registry=r)
        self.policy_alpha = Gauge("memento_serving_policy_alpha", "Temperature alpha of the mu now sampled",
                                  registry=r)
        self.policy_min_prob = Gauge("memento_serving_policy_min_prob",
                                     "Probability floor of the mu now sampled", registry=r)
        self.policy_top_k = Gauge("memento_serving_policy_top_k", "Candidates of the mu now sampled",
                                  registry=r)
        self.policy_similarity_prior = Gauge("memento_serving_policy_similarity_prior",
                                             "Weight of nearness in the retrieval prior of the mu now sampled",
                                             registry=r)
        self.policy_vote_prior = Gauge("memento_serving_policy_vote_prior",
                                       "Weight of the neighbours' vote in the retrieval prior of the mu now sampled",
                                       registry=r)
        self.policy_prior_share = Gauge("memento_serving_policy_prior_share",
                                        "Share of requests drawn under each retrieval prior (similarity:vote[:recency]) "
                                        "by the mu now sampled", ["prior"], registry=r)
        self.mu_entropy = Histogram("memento_serving_mu_entropy_nats",
                                    "Entropy of the retrieval policy mu(.|s) per request",
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0),
                                    registry=r)
        self.propensity = Histogram("memento_serving_propensity",
                                    "mu(c|s) of the served case (mean = sum / count)",
                                    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
                                    registry=r)
        self.candidates = Histogram("memento_serving_candidates", "Valid candidates per request",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.cases = Gauge("memento_serving_cases", "Cases in the serving case bank", registry=r)
        self.users = Gauge("memento_serving_users", "Users whose recent history is kept in memory (at most "
                           "--max-users; the least recently active are dropped past it)", registry=r)
        self.cases_appended = Counter("memento_serving_cases_appended",
                                      "Cases newly added to the bank from the cases topic", registry=r)
        self.thread_alive = Gauge("memento_serving_thread_alive", "1 while a background thread runs "
                                  "(Kafka followers and the publisher), 0 once it has died", ["thread"],
                                  registry=r)
        self.malformed = Counter("memento_serving_malformed_messages",
                                 "Messages that failed schema validation, by topic", ["topic"], registry=r)
        self.actions_seen = Counter("memento_serving_actions_consumed",
                                    "Actions folded into user histories", registry=r)
        self.published = Counter("memento_serving_recommendations_published",
                                 "Recommendations handed to the Kafka producer", registry=r)
        self.publish_errors = Counter("memento_serving_publish_errors",
                                      "Kafka sends that failed, by topic", ["topic"], registry=r)
        self.batch_size = Histogram("memento_serving_batch_size",
                                    "Recommend requests answered by one search and Q forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("memento_serving_batch_seconds",
                                       "Time to search, score and sample one batch",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.generator_fallbacks = Counter("memento_serving_generator_fallbacks",
                                           "Generator failures answered by the default generator",
                                           registry=r)

    def render(self, include_default: bool = True) -> bytes:
        """This service's metrics, then the default registry's (process metrics and the case
        bank's, which memory_store registers there)."""
        text = generate_latest(self.registry)
        return text + generate_latest(REGISTRY) if include_default else text
