"""``memento replay``: plays users against the running system.

For every user moment the driver publishes what the user did on their own to the actions topic,
asks serving for a recommendation over HTTP (``POST /v1/recommend``, keep-alive), and publishes
the user's reaction to it. Two sources of users:

* ``synthetic`` — :class:`evaluation.simulator.SyntheticWorld`: each moment a user (drawn by
  activity) browses organically, is recommended an item, and responds from the known model, so
  each request also records its exact expected reward and the oracle's.
* ``tmall`` — the real log, in time order: before each logged action, serving is asked for a
  recommendation for that user at that time; then the logged action is published.

The realised reward of a recommendation is computed here the same way the stream worker does:
the largest :class:`~memento.config.RewardWeights` weight among the user's actions on the
recommended item at event times in ``[ts, ts + window]``, counting actions published after the
request (for Tmall: later in the log). Every request is written to a JSONL response log and
summarised per window of ``summary_window`` requests with the policy version that served most of it.

The pieces are separate so they can be tested without a broker or serving:
:class:`SyntheticSource` / :class:`TmallSource` generate moments, :class:`RewardTracker`
attributes rewards, :func:`summarise_windows` builds the per-window table, and
:class:`serving.client.ServingClient` is the HTTP side.

>>> tracker = RewardTracker(RewardWeights(), window_s=60)
>>> tracker.open("r1", "u1", "7", ts=100.0)
>>> tracker.observe(Action(event_id="e1", user_id="u1", item_id="7", action="cart", ts=130.0))
>>> tracker.close_due(now=200.0)
[('r1', 3.0)]
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np

from memento.config import RewardWeights, Settings
from memento.schemas import Action, encode
from evaluation.simulator import SYNTHETIC_EPOCH, SyntheticWorld, WorldConfig
from serving.client import ServingClient, ServingNotReady
from streams.attribution import RewardWindow

__all__ = [
    "ReplayConfig", "Moment", "Outcome", "ReplaySource", "SyntheticSource", "TmallSource",
    "RewardTracker", "ReplayLoop", "RequestRecord", "WindowStats", "ReplaySummary", "summarise_windows",
    "run_replay", "add_arguments", "run_from_args", "build_world",
]

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "tmall")


@dataclass
class ReplayConfig:
    """Options of one replay run.

    Parameters
    ----------
    source
        ``synthetic`` (the simulator) or ``tmall`` (a real log; needs ``log_path``).
    events
        Number of recommendation requests (user moments) to play; for ``tmall`` at most the
        logged actions after the warm-up (0 = all of them).
    rate
        Requests per wall-clock second; 0 plays as fast as serving answers.
    seed
        Seeds the synthetic world (catalogue, users) and the behaviour drawn during the run.
    serving_url
        Base URL of serving, e.g. ``http://127.0.0.1:8080``.
    settings
        Kafka and topic settings (the actions topic, bootstrap servers) and the reward weights.
    log_path
        Tmall log CSV (``tmall`` only).
    products_path
        Tmall product CSV (``tmall`` only, optional): logged items missing from it are counted.
    response_log
        JSONL file with one line per request (empty: no file).
    reward_window_s
        Attribution window after a recommendation, event-time seconds (None: ``settings.window_s``).
    summary_window
        Requests per row of the reward-per-window summary.
    moment_step_s
        Event-time seconds between two synthetic user moments.
    response_delay_s
        Event-time seconds between a recommendation and each successive action of the response.
    start_ts
        Event time of the first synthetic moment (default 2014-09-01 00:00 UTC).
    warmup_moments
        Synthetic: organic browsing moments per user published before the first request, so
        serving has histories and cases to start from.
    warmup_events
        Tmall: leading logged actions published before the first request.
    world
        The synthetic world's parameters.
    send_context
        Also send the moment's organic actions as ``context.recent_items`` in the request.
    flush_before_request
        Flush the producer before each request, so the user's organic actions are on the
        broker before serving is asked.
    ready_timeout_s
        How long to wait for serving's ``/readyz`` before giving up.
    retry_503_s
        How long one request keeps retrying while serving answers 503 before counting as failed.
    request_timeout_s
        Socket timeout of one HTTP request.
    """

    source: str = "synthetic"
    events: int = 5000
    rate: float = 0.0
    seed: int = 0
    serving_url: str = "http://127.0.0.1:8080"
    settings: Settings = field(default_factory=Settings)
    log_path: str = ""
    products_path: str = ""
    response_log: str = ""
    reward_window_s: float | None = None
    summary_window: int = 250
    moment_step_s: float = 60.0
    response_delay_s: float = 2.0
    start_ts: float = SYNTHETIC_EPOCH
    warmup_moments: int = 2
    warmup_events: int = 300
    world: WorldConfig = field(default_factory=WorldConfig)
    send_context: bool = False
    flush_before_request: bool = True
    ready_timeout_s: float = 120.0
    retry_503_s: float = 10.0
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"ReplayConfig.source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.source == "tmall" and not self.log_path:
            raise ValueError("ReplayConfig.log_path is required for --source tmall (the log CSV)")
        if self.events < 0:
            raise ValueError(f"ReplayConfig.events must be >= 0, got {self.events}")
        if self.rate < 0 or not math.isfinite(self.rate):
            raise ValueError(f"ReplayConfig.rate must be a finite number >= 0, got {self.rate}")
        if self.summary_window < 1:
            raise ValueError(f"ReplayConfig.summary_window must be >= 1, got {self.summary_window}")
        if self.moment_step_s <= 0:
            raise ValueError(f"ReplayConfig.moment_step_s must be > 0, got {self.moment_step_s}")
        if self.warmup_moments < 0 or self.warmup_events < 0:
            raise ValueError("ReplayConfig.warmup_moments and warmup_events must be >= 0")
        if not self.serving_url.startswith(("http://", "https://")):
            raise ValueError(f"ReplayConfig.serving_url must start with http:// or https://, "
                             f"got {self.serving_url!r}")
        window = self.window_s
        if not window > 0:
            raise ValueError(f"reward window must be > 0 event seconds, got {window}")
        if self.response_delay_s <= 0:
            raise ValueError(f"ReplayConfig.response_delay_s must be > 0, got {self.response_delay_s}")
        if 4 * self.response_delay_s >= window:
            raise ValueError(f"ReplayConfig.response_delay_s ({self.response_delay_s}) puts the "
                             f"response outside the reward window ({window} s)")

    @property
    def window_s(self) -> float:
        return float(self.settings.window_s if self.reward_window_s is None else self.reward_window_s)


def build_world(config: ReplayConfig) -> SyntheticWorld:
    """The synthetic world a replay with ``config`` plays (write its products CSV for serving);
    its expected and oracle rewards use the settings' reward weights."""
    return SyntheticWorld(dataclasses.replace(config.world, rewards=config.settings.rewards), seed=config.seed)


# -- moments: what a source generates -----------------------------------------------------
@dataclass
class Moment:
    """One request: the user, the event time of the request, and the actions to publish
    before it (organic behaviour)."""

    index: int
    user_id: str
    ts: float
    before: list[Action]
    context: Any = None  # source-specific data for respond()


@dataclass
class Outcome:
    """What follows a recommendation: the actions to publish and, for the simulator, the
    expected reward of the recommended item and the oracle's."""

    actions: list[Action]
    expected_reward: float | None = None
    oracle_reward: float | None = None


class ReplaySource(abc.ABC):
    """Where users come from. ``warmup()`` yields actions to publish before any request,
    ``moments()`` the requests, and ``respond()`` what the user does after one."""

    name: str = ""

    @abc.abstractmethod
    def warmup(self) -> Iterator[Action]:
        """Actions to publish before the first request."""

    @abc.abstractmethod
    def moments(self, limit: int) -> Iterator[Moment]:
        """Up to ``limit`` request moments in event-time order (0 = source's natural end)."""

    def respond(self, moment: Moment, item_id: str | None, request_id: str | None) -> Outcome:
        """The actions following the recommendation of ``item_id`` (None when the request failed)."""
        return self._respond(moment, item_id, request_id)

    @abc.abstractmethod
    def _respond(self, moment: Moment, item_id: str | None, request_id: str | None) -> Outcome:
        ...

    def expected_total(self, limit: int) -> int | None:
        return limit or None


class SyntheticSource(ReplaySource):
    """Moments from :class:`~evaluation.simulator.SyntheticWorld`.

    The event clock starts at ``config.start_ts``: first ``warmup_moments`` organic moments for
    every user, then one request moment every ``moment_step_s``. In a request moment the user's
    organic actions come one event-second apart from the moment's start, the request is at
    mid-step, and the response actions follow ``response_delay_s`` apart (inside the window).

    Common random numbers: which user comes at each moment is drawn from a stream of its own,
    each moment's browsing from a stream keyed by the moment, and the reaction to a shown item
    from a stream keyed by (moment, item). Two policies played from the same seed therefore
    meet the same users in the same order, and the same user reacts the same way to the same
    item at the same moment: differences in reward come from the policies' choices (and the
    taste drift those choices cause), not from where a shared generator happened to be.

    With ``world.shift_at_moment`` = N > 0, every user's taste shifts
    (:meth:`~evaluation.simulator.SyntheticWorld.shift_tastes`) just before request moment N (its
    organic browsing included), with new tastes drawn from a stream of their own
    (``[seed, 4]``): the moments before are unaffected, and every policy meets the same shift.

    >>> cfg = ReplayConfig(world=WorldConfig(n_items=30, n_users=4), warmup_moments=1, seed=3)
    >>> source = SyntheticSource(cfg)
    >>> len({a.user_id for a in source.warmup()})
    4
    >>> m = next(source.moments(1))
    >>> out = source.respond(m, source.world.item_ids[0], "r1")
    >>> all(a.request_id == "r1" and a.ts > m.ts for a in out.actions)
    True
    """

    name = "synthetic"

    def __init__(self, config: ReplayConfig, world: SyntheticWorld | None = None):
        self.config = config
        self.world = world or build_world(config)
        self._user_rng = np.random.default_rng([config.seed, 1])
        self._clock = config.start_ts
        self._events = 0
        self._moments = 0  # organic moments so far (warm-up included): keys the browsing streams

    def _stream(self, *key: int) -> np.random.Generator:
        """The random stream of one draw site (see the class docstring)."""
        return np.random.default_rng([self.config.seed, *key])

    def _action(self, user: str, item: str, action: str, ts: float, request_id: str | None = None) -> Action:
        self._events += 1
        return Action(event_id=f"syn{self.config.seed}-{self._events}", user_id=user, item_id=item,
                      action=action, ts=float(ts), request_id=request_id)

    def _organic(self, user: str, start: float) -> list[Action]:
        # Organic actions of one moment are spaced inside the first half of the step.
        self._moments += 1
        pairs = self.world.browse(user, self._stream(2, self._moments))
        spacing = min(1.0, self.config.moment_step_s / (2.0 * (len(pairs) + 1)))
        return [self._action(user, item, act, start + k * spacing) for k, (item, act) in enumerate(pairs)]

    def warmup(self) -> Iterator[Action]:
        step = self.config.moment_step_s
        for _ in range(self.config.warmup_moments):
            for user in self.world.user_ids:
                yield from self._organic(user, self._clock)
                self._clock += step

    def moments(self, limit: int) -> Iterator[Moment]:
        step = self.config.moment_step_s
        shift_at = self.world.config.shift_at_moment
        for index in range(limit):
            if shift_at and index == shift_at:
                self.world.shift_tastes(self._stream(4))
                log.info("moment %d: every user's taste shifted (strength %g)", index,
                         self.world.config.shift_strength)
            user = self.world.sample_user(self._user_rng)
            before = self._organic(user, self._clock)
            yield Moment(index=index, user_id=user, ts=self._clock + step / 2.0, before=before)
            self._clock += step

    def _respond(self, moment: Moment, item_id: str | None, request_id: str | None) -> Outcome:
        if item_id is None:
            return Outcome([])
        try:
            expected = self.world.expected_reward(moment.user_id, item_id)
        except KeyError:
            log.warning("serving recommended %r, which is not in the synthetic catalogue", item_id)
            return Outcome([], 0.0, self.world.oracle_reward(moment.user_id))
        oracle = self.world.oracle_reward(moment.user_id)
        acts = self.world.respond(moment.user_id, item_id,
                                  self._stream(3, moment.index, self.world.item_index(item_id)))
        delay = self.config.response_delay_s
        actions = [self._action(moment.user_id, item_id, a, moment.ts + delay * (k + 1), request_id)
                   for k, a in enumerate(acts)]
        return Outcome(actions, expected, oracle)


class TmallSource(ReplaySource):
    """Moments from a Tmall log: one request before each logged action (after the first
    ``warmup_events``), at that action's time; the logged action is published after it.

    Parameters
    ----------
    config
        Uses ``log_path``, ``products_path`` and ``warmup_events``.
    actions
        Already-parsed actions in time order (instead of reading ``config.log_path``).
    """

    name = "tmall"

    def __init__(self, config: ReplayConfig, actions: Sequence[Action] | None = None):
        self.config = config
        if actions is None:
            from evaluation.tmall import load_tmall_log

            parsed = load_tmall_log(config.log_path)
            log.info("%s", parsed.summary())
            actions = parsed.actions
            self.load_summary = parsed.summary()
        else:
            self.load_summary = f"{len(actions)} actions given"
        self.actions = sorted(actions, key=lambda a: a.ts)
        self.missing_products = 0
        if config.products_path:
            from memento.encoder import load_products

            products = load_products(config.products_path)
            self.missing_products = len({a.item_id for a in self.actions} - set(products))
            if self.missing_products:
                log.warning("%d logged items have no row in %s", self.missing_products, config.products_path)
        self._warm = min(config.warmup_events, len(self.actions))

    def warmup(self) -> Iterator[Action]:
        yield from self.actions[: self._warm]

    def moments(self, limit: int) -> Iterator[Moment]:
        rest = self.actions[self._warm:]
        if limit:
            rest = rest[:limit]
        for index, action in enumerate(rest):
            yield Moment(index=index, user_id=action.user_id, ts=action.ts, before=[], context=action)

    def _respond(self, moment: Moment, item_id: str | None, request_id: str | None) -> Outcome:
        return Outcome([moment.context])

    def expected_total(self, limit: int) -> int | None:
        rest = len(self.actions) - self._warm
        return min(limit, rest) if limit else rest


# -- reward attribution -------------------------------------------------------------------
class RewardTracker:
    """Attributes rewards to open recommendations from the actions observed after them.

    A recommendation at ``ts`` for ``(user, item)`` earns the largest weight among the user's
    actions on that item observed after it with event time in ``[ts, ts + window_s]``; its
    window closes once the event clock passes ``ts + window_s``.

    Parameters
    ----------
    rewards
        Weight per action.
    window_s
        Attribution window in event seconds.
    """

    def __init__(self, rewards: RewardWeights, window_s: float):
        self.rewards = rewards
        self.window_s = window_s
        self.window = RewardWindow(window_s)
        self._open: dict[str, dict[str, Any]] = {}
        self._by_user: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, request_id: str, user_id: str, item_id: str, ts: float) -> None:
        if request_id in self._open:
            raise ValueError(f"request id {request_id!r} is already open")
        self._open[request_id] = {"user": user_id, "item": item_id, "ts": ts, "reward": 0.0}
        self._by_user.setdefault(user_id, []).append(request_id)

    def observe(self, action: Action) -> None:
        for rid in self._by_user.get(action.user_id, ()):
            rec = self._open[rid]
            if rec["item"] == action.item_id and self.window.covers(rec["ts"], action.ts):
                rec["reward"] = max(rec["reward"], self.rewards.weight(action.action))

    def close_due(self, now: float) -> list[tuple[str, float]]:
        """Close the windows that end before event time ``now``; ``(request_id, reward)``."""
        return self._close([rid for rid, rec in self._open.items() if self.window.end(rec["ts"]) < now])

    def close_all(self) -> list[tuple[str, float]]:
        return self._close(list(self._open))

    def _close(self, request_ids: list[str]) -> list[tuple[str, float]]:
        out = []
        for rid in request_ids:
            rec = self._open.pop(rid)
            users = self._by_user[rec["user"]]
            users.remove(rid)
            if not users:
                del self._by_user[rec["user"]]
            out.append((rid, rec["reward"]))
        return out


# -- records and summaries ----------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request: what was asked, how serving answered, and what it earned."""

    seq: int
    user_id: str
    ts: float
    wall_time: float
    status: int
    latency_s: float
    request_id: str | None = None
    item_id: str | None = None
    policy_version: int | None = None
    reward: float | None = None
    expected_reward: float | None = None
    oracle_reward: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.request_id is not None


@dataclass
class WindowStats:
    """One row of the per-window summary (means over the window's successful requests)."""

    index: int
    first_seq: int
    requests: int
    failed: int
    mean_reward: float
    mean_expected_reward: float | None
    mean_oracle_reward: float | None
    policy_version: int | None


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def summarise_windows(records: Sequence[RequestRecord], size: int) -> list[WindowStats]:
    """Group records (in request order) into windows of ``size`` requests.

    >>> recs = [RequestRecord(i, "u", 0.0, 0.0, 200, 0.01, f"r{i}", "7", 1 + i // 3, float(i % 2))
    ...         for i in range(4)]
    >>> [(w.requests, w.mean_reward, w.policy_version) for w in summarise_windows(recs, 3)]
    [(3, 0.3333333333333333, 1), (1, 1.0, 2)]
    """
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    ordered = sorted(records, key=lambda r: r.seq)
    out = []
    for index, start in enumerate(range(0, len(ordered), size)):
        chunk = ordered[start:start + size]
        ok = [r for r in chunk if r.ok]
        versions = Counter(r.policy_version for r in ok if r.policy_version is not None)
        out.append(WindowStats(
            index=index, first_seq=chunk[0].seq, requests=len(chunk), failed=len(chunk) - len(ok),
            mean_reward=_mean([r.reward or 0.0 for r in ok]) or 0.0,
            mean_expected_reward=_mean([r.expected_reward for r in ok if r.expected_reward is not None]),
            mean_oracle_reward=_mean([r.oracle_reward for r in ok if r.oracle_reward is not None]),
            policy_version=versions.most_common(1)[0][0] if versions else None))
    return out


@dataclass
class ReplaySummary:
    """What a replay did and earned."""

    source: str
    requests: int
    succeeded: int
    failed: int
    actions_published: int
    warmup_actions: int
    mean_reward: float
    mean_expected_reward: float | None
    mean_oracle_reward: float | None
    first_fifth_reward: float | None
    last_fifth_reward: float | None
    policy_versions: list[int]
    windows: list[WindowStats]
    wall_s: float
    response_log: str = ""

    def table(self) -> str:
        """The per-window table and the totals, for the terminal."""
        synthetic = self.mean_oracle_reward is not None
        head = f"{'window':>6} {'requests':>8} {'failed':>6} {'reward':>8}"
        head += f" {'expected':>8} {'oracle':>8}" if synthetic else ""
        lines = [head + f" {'policy':>6}"]
        for w in self.windows:
            row = f"{w.index:>6} {w.requests:>8} {w.failed:>6} {w.mean_reward:>8.3f}"
            if synthetic:
                row += f" {_fmt(w.mean_expected_reward):>8} {_fmt(w.mean_oracle_reward):>8}"
            lines.append(row + f" {str(w.policy_version) if w.policy_version is not None else '-':>6}")
        lines.append(f"{self.source}: {self.requests} requests ({self.failed} failed), "
                     f"{self.actions_published} actions published ({self.warmup_actions} warm-up), "
                     f"mean reward {self.mean_reward:.3f}"
                     + (f", expected {_fmt(self.mean_expected_reward)}, oracle {_fmt(self.mean_oracle_reward)}"
                        if synthetic else "")
                     + f"; first fifth {_fmt(self.first_fifth_reward)}, last fifth {_fmt(self.last_fifth_reward)}; "
                     f"policy versions {self.policy_versions[:1] + self.policy_versions[-1:] if self.policy_versions else []}"
                     f" ({len(self.policy_versions)} seen); {self.wall_s:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summarise(source: str, records: Sequence[RequestRecord], window: int, actions_published: int,
              warmup_actions: int, wall_s: float, response_log: str = "") -> ReplaySummary:
    """Totals and the per-window table of a finished (or interrupted) replay."""
    ordered = sorted(records, key=lambda r: r.seq)
    ok = [r for r in ordered if r.ok]
    fifth = max(1, len(ok) // 5) if ok else 0
    return ReplaySummary(
        source=source, requests=len(ordered), succeeded=len(ok), failed=len(ordered) - len(ok),
        actions_published=actions_published, warmup_actions=warmup_actions,
        mean_reward=_mean([r.reward or 0.0 for r in ok]) or 0.0,
        mean_expected_reward=_mean([r.expected_reward for r in ok if r.expected_reward is not None]),
        mean_oracle_reward=_mean([r.oracle_reward for r in ok if r.oracle_reward is not None]),
        first_fifth_reward=_mean([r.reward or 0.0 for r in ok[:fifth]]),
        last_fifth_reward=_mean([r.reward or 0.0 for r in ok[-fifth:]]) if fifth else None,
        policy_versions=sorted({r.policy_version for r in ok if r.policy_version is not None}),
        windows=summarise_windows(ordered, window), wall_s=wall_s, response_log=response_log)


# -- the driver -----------------------------------------------------------------------------
def make_source(config: ReplayConfig) -> ReplaySource:
    return SyntheticSource(config) if config.source == "synthetic" else TmallSource(config)


class _Publisher:
    """Sends actions to the actions topic keyed by user id, counting them."""

    def __init__(self, settings: Settings):
        from memento.kafka_io import make_producer

        self.topic = settings.topics.actions
        self.producer = make_producer(settings)
        self.sent = 0

    def send(self, action: Action) -> None:
        self.producer.send(self.topic, key=action.user_id, value=encode(action))
        self.sent += 1

    def flush(self) -> None:
        self.producer.flush(timeout=30)

    def close(self) -> None:
        try:
            self.producer.flush(timeout=30)
        finally:
            self.producer.close(timeout=10)


class ReplayLoop:
    """The replay's bookkeeping, independent of HTTP and Kafka: publishes a moment's actions,
    asks for a recommendation, publishes the response, attributes rewards and keeps records.

    Parameters
    ----------
    config
        The replay options (reward weights, window, ``send_context``, ``flush_before_request``).
    source
        Where moments come from.
    recommend
        ``(user_id, ts, context) -> (status, body, latency_s)``; serving in :func:`run_replay`.
    publish
        Sends one action (to the actions topic in :func:`run_replay`).
    flush
        Makes published actions visible (producer flush); called before each request.
    response_log
        Open text file receiving one JSON line per finished request, or None.
    """

    def __init__(self, config: ReplayConfig, source: ReplaySource,
                 recommend: Callable[[str, float, list[dict] | None], tuple[int, dict, float]],
                 publish: Callable[[Action], None], flush: Callable[[], None] = lambda: None,
                 response_log: IO[str] | None = None):
        self.config = config
        self.source = source
        self.recommend = recommend
        self.publish = publish
        self.flush = flush
        self.response_log = response_log
        self.tracker = RewardTracker(config.settings.rewards, config.window_s)
        self.records: dict[int, RequestRecord] = {}
        self._open: dict[str, RequestRecord] = {}
        self._request_ids: set[str] = set()
        self.published = 0
        self.warmup_actions = 0
        self.failed = 0
        self.closed = 0
        self.closed_reward = 0.0

    def _send(self, action: Action) -> None:
        self.publish(action)
        self.published += 1
        self.tracker.observe(action)

    def _write(self, record: RequestRecord) -> None:
        if self.response_log is not None:
            self.response_log.write(json.dumps(asdict(record)) + "\n")

    def _finish(self, closed: list[tuple[str, float]]) -> None:
        for rid, reward in closed:
            record = self._open.pop(rid)
            record.reward = reward
            self.closed += 1
            self.closed_reward += reward
            self._write(record)

    def warmup(self) -> int:
        """Publish the source's warm-up actions; returns how many."""
        for action in self.source.warmup():
            self._send(action)
            self.warmup_actions += 1
        self.flush()
        return self.warmup_actions

    def step(self, moment: Moment) -> RequestRecord:
        """Play one moment: organic actions, the request, the response."""
        first_ts = min([moment.ts] + [a.ts for a in moment.before])
        self._finish(self.tracker.close_due(first_ts))
        for action in moment.before:
            self._send(action)
        if self.config.flush_before_request and moment.before:
            self.flush()
        context = ([{"item_id": a.item_id, "action": a.action, "ts": a.ts} for a in moment.before]
                   if self.config.send_context else None)
        status, body, latency = self.recommend(moment.user_id, moment.ts, context)
        record = RequestRecord(seq=moment.index, user_id=moment.user_id, ts=moment.ts,
                               wall_time=time.time(), status=status, latency_s=latency)
        item_id = request_id = None
        if status == 200 and body.get("item_id") and body.get("request_id"):
            item_id, request_id = str(body["item_id"]), str(body["request_id"])
            version = body.get("policy_version")
            record.policy_version = int(version) if isinstance(version, (int, float)) else None
            if request_id in self._request_ids:
                record.error = f"serving repeated request id {request_id!r}"
                item_id = request_id = None
            else:
                record.request_id, record.item_id = request_id, item_id
        else:
            record.error = str(body.get("error") or f"HTTP {status} without item_id/request_id")
            log.warning("request %d for user %s failed: %s", moment.index, moment.user_id, record.error)
        self.records[moment.index] = record
        outcome = self.source.respond(moment, item_id, request_id)
        record.expected_reward, record.oracle_reward = outcome.expected_reward, outcome.oracle_reward
        if request_id is not None:
            self._request_ids.add(request_id)
            self._open[request_id] = record
            self.tracker.open(request_id, moment.user_id, item_id, moment.ts)
        else:
            self.failed += 1
            self._write(record)
        for action in outcome.actions:
            self._send(action)
        return record

    def close(self) -> None:
        """Close every window still open (the source has ended)."""
        self._finish(self.tracker.close_all())

    def summary(self, wall_s: float) -> ReplaySummary:
        return summarise(self.source.name, list(self.records.values()), self.config.summary_window,
                         self.published, self.warmup_actions, wall_s, self.config.response_log)


def run_replay(config: ReplayConfig, progress: bool = True, source: ReplaySource | None = None) -> ReplaySummary:
    """Play ``config.events`` requests against serving and the actions topic; returns the summary.

    Order: publish the warm-up actions, wait for serving's ``/readyz``, then for each moment
    publish the organic actions, request a recommendation, publish the response, and close
    reward windows as the event clock passes them. The producer is flushed and closed at the
    end, also on error or Ctrl-C.
    """
    source = source or make_source(config)
    client = ServingClient(config.serving_url, config.request_timeout_s)
    publisher = _Publisher(config.settings)
    log_file = None
    bar = None
    started = time.perf_counter()
    try:
        if config.response_log:
            Path(config.response_log).parent.mkdir(parents=True, exist_ok=True)
            log_file = open(config.response_log, "w", encoding="utf-8")
        loop = ReplayLoop(
            config, source,
            recommend=lambda user, ts, ctx: client.recommend(user, ts, config.retry_503_s, ctx),
            publish=publisher.send, flush=publisher.flush, response_log=log_file)
        warm = loop.warmup()
        log.info("published %d warm-up actions; waiting for serving at %s", warm, config.serving_url)
        log.info("serving ready: %s", client.wait_ready(config.ready_timeout_s))
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=source.expected_total(config.events), desc=f"replay {source.name}",
                       unit="req", dynamic_ncols=True)
        paced_start = time.perf_counter()
        for moment in source.moments(config.events):
            if config.rate > 0:
                delay = paced_start + moment.index / config.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            record = loop.step(moment)
            if bar is not None:
                bar.update(1)
                if moment.index % 50 == 0:
                    bar.set_postfix(policy=record.policy_version, failed=loop.failed,
                                    reward=f"{loop.closed_reward / max(1, loop.closed):.3f}")
        loop.close()
    finally:
        if bar is not None:
            bar.close()
        client.close()
        publisher.close()
        if log_file is not None:
            log_file.close()
    return loop.summary(time.perf_counter() - started)


# -- CLI ---------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """Flags of ``memento replay``."""
    d = ReplayConfig()
    parser.add_argument("--source", choices=SOURCES, default=d.source, help="who the users are")
    parser.add_argument("--log", dest="log_path", default="", help="Tmall log CSV (--source tmall)")
    parser.add_argument("--products", dest="products_path", default="",
                        help="Tmall product CSV (--source tmall): logged items missing from it are reported")
    parser.add_argument("--events", type=int, default=d.events,
                        help="recommendation requests to play (tmall: 0 = whole log)")
    parser.add_argument("--rate", type=float, default=d.rate, help="requests per second (0 = as fast as possible)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic world and behaviour")
    parser.add_argument("--serving-url", default=d.serving_url, help="serving's base URL")
    parser.add_argument("--response-log", default=d.response_log, help="JSONL file, one line per request")
    parser.add_argument("--window-requests", dest="summary_window", type=int, default=d.summary_window,
                        help="requests per row of the reward summary")
    parser.add_argument("--reward-window", dest="reward_window_s", type=float, default=None,
                        help="reward attribution window in event seconds (default: settings' window_s)")
    parser.add_argument("--moment-step", dest="moment_step_s", type=float, default=d.moment_step_s,
                        help="event seconds between synthetic user moments")
    parser.add_argument("--warmup-moments", type=int, default=d.warmup_moments,
                        help="synthetic: organic moments per user before the first request")
    parser.add_argument("--warmup-events", type=int, default=d.warmup_events,
                        help="tmall: leading logged actions published before the first request")
    parser.add_argument("--shift-at-moment", type=int, default=d.world.shift_at_moment,
                        help="synthetic: request moment before which every user's taste shifts (0 = none)")
    parser.add_argument("--shift-strength", type=float, default=d.world.shift_strength,
                        help="synthetic: how far tastes move at the shift (1 = new tastes)")
    parser.add_argument("--ready-timeout", dest="ready_timeout_s", type=float, default=d.ready_timeout_s,
                        help="seconds to wait for serving's /readyz")
    parser.add_argument("--send-context", action="store_true",
                        help="also send the moment's organic actions as context.recent_items")
    parser.add_argument("--write-products", default="",
                        help="synthetic: write the world's product CSV here (for serving's item "
                             "features) and exit without replaying")
    parser.add_argument("--write-log", default="",
                        help="synthetic: write an organic log of --events rows in the Tmall format "
                             "here and exit without replaying")
    parser.add_argument("--summary-json", default="", help="write the summary as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> ReplayConfig:
    settings = Settings.from_env(
        bootstrap_servers=getattr(args, "bootstrap_servers", None),
        embedded_broker=getattr(args, "embedded_broker", None) or None)
    return ReplayConfig(
        source=args.source, events=args.events, rate=args.rate, seed=args.seed,
        serving_url=args.serving_url, settings=settings, log_path=args.log_path,
        products_path=args.products_path, response_log=args.response_log,
        reward_window_s=args.reward_window_s, summary_window=args.summary_window,
        moment_step_s=args.moment_step_s, warmup_moments=args.warmup_moments,
        warmup_events=args.warmup_events, ready_timeout_s=args.ready_timeout_s,
        send_context=args.send_context,
        world=dataclasses.replace(ReplayConfig().world, shift_at_moment=getattr(args, "shift_at_moment", 0),
                                  shift_strength=getattr(args, "shift_strength", 1.0)))


def run_from_args(args) -> int:
    """Entry point of ``memento replay``; prints the per-window table. Returns the exit code."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"memento replay: {exc}", file=sys.stderr)
        return 2
    if args.write_products or args.write_log:
        if config.source != "synthetic":
            print("memento replay: --write-products/--write-log need --source synthetic", file=sys.stderr)
            return 2
        world = build_world(config)
        if args.write_products:
            print(f"wrote {world.write_products_csv(args.write_products)}")
        if args.write_log:
            print(f"wrote {world.write_log_csv(args.write_log, config.events, seed=config.seed)}")
        return 0
    from kafka.errors import KafkaError

    try:
        summary = run_replay(config, progress=not args.no_progress)
    except (ServingNotReady, FileNotFoundError, ValueError, KafkaError) as exc:
        print(f"memento replay: {exc}", file=sys.stderr)
        return 1
    print(summary.table())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2))
    return 0 if summary.succeeded or not summary.requests else 1
