"""The stream worker's Prometheus metrics (every ``memento_stream_*`` series), one definition
each, imported by the worker (:mod:`streams.app`) and named by the alert rules and dashboard."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["EVENTS", "DEAD_LETTERS", "TRANSITIONS", "REWARD", "CASES", "ATTRIBUTION", "SESSION_ENDS", "OPEN_WINDOWS", "HELD_WINDOWS", "WATERMARK", "CONSUMER_LAG", "READ_LAG", "ASSIGNED", "COMMIT_REFUSALS", "STALLS", "ACTION_EVENTS", "RECOMMENDATION_EVENTS", "TICK_EVENTS", "ORGANIC_CASES", "RECOMMENDATION_CASES", "HITS", "MISSES"]

EVENTS = Counter("memento_stream_events_total", "Events consumed by the stream worker", ["type"])
DEAD_LETTERS = Counter("memento_stream_dead_letters_total", "Messages sent to the dead-letter topic", ["reason"])
TRANSITIONS = Counter("memento_stream_transitions_total", "Transitions emitted")
REWARD = Counter("memento_stream_reward_total", "Sum of the rewards of emitted transitions")
CASES = Counter("memento_stream_cases_total", "Cases emitted", ["source"])
ATTRIBUTION = Counter("memento_stream_attribution_total", "Attribution outcomes", ["outcome"])
SESSION_ENDS = Counter("memento_stream_session_ends_total", "Transitions emitted with done=True (session gap)")
OPEN_WINDOWS = Gauge("memento_stream_open_windows",
                     "Recommendations not yet emitted as transitions (open or held for the session gap)")
HELD_WINDOWS = Gauge("memento_stream_held_windows", "Closed windows held until their session gap is decided")
WATERMARK = Gauge("memento_stream_watermark_seconds", "Event-time watermark by partition", ["partition"])
CONSUMER_LAG = Gauge("memento_stream_consumer_lag", "Input messages not yet committed (high watermark - "
                     "committed offset)", ["topic", "partition"])
READ_LAG = Gauge("memento_stream_consumer_read_lag", "Input messages not yet processed (high watermark - "
                 "next offset to process)", ["topic", "partition"])
ASSIGNED = Gauge("memento_stream_assigned_partitions", "Input partitions assigned to this worker", ["topic"])
COMMIT_REFUSALS = Counter("memento_stream_commit_refusals_total", "Offset commits the broker refused (e.g. the "
                          "group had rebalanced): those records are read again after a restart or rebalance")
STALLS = Counter("memento_stream_stalls_total", "Times the worker found its consumer stuck (its ticks not "
                 "coming back, or unread input not read) and stopped to be restarted", ["signal"])
# children bound once: ``labels()`` is a lock and a dict lookup on every event otherwise
ACTION_EVENTS, RECOMMENDATION_EVENTS, TICK_EVENTS = (EVENTS.labels(k) for k in ("action", "recommendation", "tick"))
ORGANIC_CASES, RECOMMENDATION_CASES = CASES.labels("action"), CASES.labels("recommendation")
HITS, MISSES = ATTRIBUTION.labels("hit"), ATTRIBUTION.labels("miss")
