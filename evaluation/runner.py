"""The evaluation loop: one policy over one data stream in event-time order, in-process.

It wires the system's own parts together without Kafka: the state encoder and the reward
attribution rules of the stream worker (:class:`streams.attribution.RewardAttribution`), an
in-memory :class:`memory_store.CaseBank` that receives the cases the worker would write (one per
organic action, one per closed recommendation window), and the policy. For each request:

1. the watermark moves to the request's event time and every reward window it passes closes,
   giving transitions (to the learning policies) and recommendation cases (to the bank);
2. the user's organic actions before the request are recorded (history, bank, popularity);
3. the state is encoded from the user's history strictly before the request (or, for bandit
   logs, from the logged context), the ``top_k`` nearest cases are retrieved, and the policy
   answers a ranked list — the logged item is never added to the candidates;
4. the response follows: on the simulator the user reacts to the recommended item; on a log
   the logged action is recorded (it earns reward only if the recommended item is the item
   the user then acted on inside the window).

>>> cfg = EvalConfig(events=30, warmup_moments=1, world=WorldConfig(n_items=40, n_users=10))
>>> result = run_policy(cfg, "cosine", seed=0)
>>> result.metrics["requests"], 0.0 <= result.metrics["share_of_oracle"] <= 1.0
(30.0, True)
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from learner.drift import DriftConfig
from learner.service import LearnerServiceConfig
from learner.trainer import SoftQConfig
from memento.config import DEFAULT_OWN_CASES, DEFAULT_TOP_K, RewardWeights, Settings
from memento.encoder import ItemEncoder, RowStateEncoder, case_feature_vector, text_encoder_from_path
from evaluation.baselines import DEFAULT_VW_ARGS, ItemKNNPolicy, RecentPolicy, VWPolicy
from evaluation.fastpath import BufferedCaseBank
from evaluation.logs import LoggedData, LoggedEvent
from evaluation.metrics import RunMetrics
from evaluation.offpolicy import OffPolicyAccumulator
from evaluation.policies import (POLICY_NAMES, Choice, CosinePolicy, EvalPolicy, GreedyQPolicy,
                                         LinUCBPolicy, PopularityPolicy, RandomPolicy, Request, SoftQPolicy)
from memento.personal import recent_vectors, user_memory, with_population
from memento.schemas import ORGANIC_CASE_SOURCE, Case, Recommendation, Transition, organic_case_id
from evaluation.simulator import WorldConfig
from streams.attribution import RewardAttribution

__all__ = ["EvalConfig", "RunResult", "run_policy", "make_policy", "SOURCES"]

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "tmall", "interactions")


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation needs (the CLI builds it from flags).

    Parameters
    ----------
    source
        ``synthetic``, ``tmall`` or ``interactions``.
    events
        Requests per run: simulator moments, or logged events after the warm-up (0 = all).
    item_dim
        Dimension of item vectors and states.
    top_k
        Nearest cases per request (the policies choose among them).
    own_cases
        The user's own newest cases (one per distinct recent item) added to the nearest as
        candidates, and the recent items softq's recency prior ranks (:mod:`memento.personal`;
        serving's ``--own-cases``); 0 = none.
    list_size
        Length of each ranked list (hit@10 and NDCG@10 need 10).
    window_s, allowed_lateness_s
        Reward attribution window and lateness, event seconds (the stream worker's rules).
    session_gap_s
        Inactivity after a window's end that ends the user's session (``done``), as in the
        stream worker (:class:`memento.config.Settings`); 0 = sessions never end.
    warmup_moments
        Simulator: organic moments per user before the first request.
    warmup_events
        Logs: leading events only observed (history, cases, popularity) before the first request.
    moment_step_s
        Simulator: event seconds between two moments.
    softq
        Soft-Q hyperparameters (``top_k`` is overridden by ``top_k`` above).
    pacing
        The learner process's buffer, learning-start, update and publish options.
    drift
        The learner process's reward-drift detection and exploration boost (softq).
    linucb_alpha
        Confidence width of LinUCB.
    vw_args
        Vowpal Wabbit arguments of the ``vw`` policy (``--cb_explore_adf`` ...).
    text_encoder
        Path of a sentence-transformers model for item titles ("" = hashing only).
    rewards
        Reward weights of the simulator and of Tmall's actions.
    world
        The simulator's parameters.
    """

    source: str = "synthetic"
    events: int = 5000
    item_dim: int = 32
    top_k: int = DEFAULT_TOP_K
    own_cases: int = DEFAULT_OWN_CASES
    list_size: int = 10
    window_s: float = 600.0
    allowed_lateness_s: float = 60.0
    session_gap_s: float = Settings.session_gap_s
    warmup_moments: int = 2
    warmup_events: int = 300
    moment_step_s: float = 60.0
    softq: SoftQConfig = field(default_factory=SoftQConfig)
    pacing: LearnerServiceConfig = field(default_factory=LearnerServiceConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    linucb_alpha: float = 1.0
    vw_args: str = DEFAULT_VW_ARGS
    text_encoder: str = ""
    rewards: RewardWeights = field(default_factory=RewardWeights)
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.events < 0 or self.top_k < 1 or self.list_size < 1 or self.item_dim < 2 or self.own_cases < 0:
            raise ValueError("events and own_cases must be >= 0, top_k and list_size >= 1, item_dim >= 2")
        if not self.window_s > 0 or self.allowed_lateness_s < 0 or self.session_gap_s < 0:
            raise ValueError("window_s must be > 0, allowed_lateness_s and session_gap_s >= 0")
        if self.source == "synthetic" and self.warmup_moments < 1:
            raise ValueError("the simulator needs warmup_moments >= 1 so the bank has cases to retrieve")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    """One policy, one seed: summary metrics, cumulative reward per request, off-policy
    estimates (logs with propensities) and wall time."""

    policy: str
    seed: int
    metrics: dict[str, float]
    cumulative_reward: np.ndarray
    off_policy: dict[str, dict[str, float]] = field(default_factory=dict)


class _MappedRewards:
    """Reward weight by action key, for logs whose actions are not the four standard ones."""

    def __init__(self):
        self.weights: dict[str, float] = {}

    def weight(self, action: str) -> float:
        return self.weights[action]


class _Stream:
    """The stream worker's job, in-process: histories, reward windows, the case bank."""

    def __init__(self, config: EvalConfig, items: ItemEncoder, rewards,
                 on_closed: Callable[[Transition], None], context_states: bool = False):
        from memory_store import CaseBank  # faiss is imported only when a run starts

        self.config = config
        self.items = items
        self.encoder = RowStateEncoder(items)  # StateEncoder's results, faster (the stream worker's)
        self.attribution = RewardAttribution(self.encoder, rewards, window_s=config.window_s,
                                             allowed_lateness_s=config.allowed_lateness_s,
                                             session_gap_s=config.session_gap_s)
        # exact search forever: an approximate index is built on a background thread, which
        # would make long runs depend on timing
        self.bank = BufferedCaseBank(CaseBank(None, dim=config.item_dim, approx_index="flat"))
        self.policy: EvalPolicy | None = None  # set once built: it needs this stream's bank
        self.on_closed = on_closed
        self.context_states = context_states
        self.users: dict[str, dict] = {}
        self._due: list[tuple[float, str]] = []

    def _user(self, user_id: str) -> dict:
        state = self.users.get(user_id)
        if state is None:
            state = self.users[user_id] = self.attribution.new_state()
        return state

    def action(self, event_id: str, user_id: str, item_id: str, action: str, ts: float, *,
               organic: bool, context_state: np.ndarray | None = None) -> None:
        state = self._user(user_id)
        if self.attribution.add_action(state, event_id, item_id, action, ts) == "duplicate":
            return
        weight = self.attribution.rewards.weight(action)
        self.policy.observe(user_id, item_id, weight)
        if organic:  # the case of RewardAttribution.organic_case (or of the logged context)
            case_state = self.encoder.encode_rows(state["history"], before=ts) if context_state is None else \
                np.asarray(context_state, np.float32)
            self.bank.add_case(organic_case_id(event_id), case_state, item_id, self.items.encode(item_id),
                               weight, ts, ORGANIC_CASE_SOURCE)

    def state(self, user_id: str, ts: float) -> np.ndarray:
        """RewardAttribution.state_before: the state from the user's actions strictly before ``ts``."""
        return self.encoder.encode_rows(self._user(user_id)["history"], before=ts)

    def request(self, user_id: str, ts: float, state: np.ndarray) -> Request:
        """The ``top_k`` nearest cases and the user's own newest ones (as serving's
        :meth:`serving.policy.RetrievalPolicy.recommend_many`), then the next nearest cases' items."""
        k = self.config.top_k
        fill = k + 4 * self.config.list_size
        ids, scores, features, mask = self.bank.search_with_features(state[None], fill)
        n = int(mask[0].sum())
        m = min(n, k)
        memory, = with_population([user_memory([h for h in self.attribution.history(self._user(user_id))
                                                if h.ts < ts], self.config.own_cases)],
                                  self.bank.popular, self.config.own_cases)
        ids_k, scores_k, features_k, mask_k = self.bank.append_cases(
            state[None], [ids[0][:m]], scores[:, :m], features[:, :m], mask[:, :m], [memory.case_ids])
        c = int(mask_k[0].sum())
        vecs, valid = recent_vectors([memory], self.items)
        return Request(user_id, ts, state, list(ids_k[0]), scores_k[0, :c].astype(np.float64),
                       np.ascontiguousarray(features_k[0, :c], np.float32), self.bank.items_of(ids_k[0]),
                       self.bank.items_of(ids[0][m:n]), recent=(vecs[0], valid[0]))

    def open(self, request_id: str, user_id: str, ts: float, state: np.ndarray, choice: Choice,
             request: Request) -> None:
        item = choice.items[0]
        if choice.case_index is not None:
            case_id = request.case_ids[choice.case_index]
            features = request.features[choice.case_index]
        else:
            case_id = f"item:{item}"
            features = case_feature_vector(state, self.items.encode(item), 0.0)
        # recommendation_dict packs the vectors as float32: arrays need no list of floats
        rec = Recommendation(request_id=request_id, user_id=user_id, item_id=item, case_id=case_id,
                             propensity=float(min(1.0, max(choice.propensity, 1e-9))),
                             policy_version=0, ts=ts, state=state, case_features=features, prior=choice.prior)
        self.attribution.add_recommendation(self._user(user_id), RewardAttribution.recommendation_dict(rec))
        heapq.heappush(self._due, (self.attribution.close_time(ts), user_id))

    def advance(self, watermark: float) -> None:
        """Close every window the watermark has passed."""
        closed: list[Transition] = []
        cases: list[Case] = []
        revisit: list[tuple[float, str]] = []
        while self._due and self._due[0][0] < watermark:
            _, user_id = heapq.heappop(self._due)
            state = self._user(user_id)
            for transition, case in self.attribution.close_due(state, watermark, now=0.0):
                if self.context_states:  # a bandit log: one step per context, s′ = s
                    transition = dataclasses.replace(transition, next_state=transition.state, done=True)
                closed.append(transition)
                cases.append(case)
            later = self.attribution.next_close(state)  # e.g. a window held for its session gap
            if later is not None and watermark != float("inf"):
                revisit.append((later, user_id))
        for entry in revisit:
            heapq.heappush(self._due, entry)
        if cases:
            self.bank.add(cases)
        for transition in closed:
            self.on_closed(transition)
        if closed:
            self.policy.learn(closed)

    def close(self) -> None:
        """Close every window still open (the stream has ended) and the bank."""
        try:
            self.advance(float("inf"))
        finally:
            self.bank.close()


def make_policy(name: str, config: EvalConfig, bank, catalogue: Sequence[str], seed: int) -> EvalPolicy:
    """The policy called ``name``, seeded with ``seed``."""
    softq = dataclasses.replace(config.softq, top_k=config.top_k, seed=seed + 1)
    if name == "random":
        return RandomPolicy(catalogue)
    if name == "popularity":
        return PopularityPolicy(catalogue)
    if name == "cosine":
        return CosinePolicy()
    if name == "greedy-q":
        # softq's network, with a one-number output: greedy-q's is the logit of its classifier
        return GreedyQPolicy(bank, config.item_dim, config.top_k, config.pacing,
                             network={**softq.network(), "value_bins": 0},
                             lr=softq.lr, batch_size=softq.batch_size, seed=seed + 1)
    if name == "linucb":
        return LinUCBPolicy(config.item_dim, alpha=config.linucb_alpha)
    if name == "softq":
        return SoftQPolicy(bank, config.item_dim, softq, config.pacing, config.drift)
    if name == "recent":
        return RecentPolicy(catalogue)
    if name == "itemknn":
        return ItemKNNPolicy(catalogue)
    if name == "vw":
        return VWPolicy(config.vw_args, seed=seed)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")


class _Run:
    """Bookkeeping shared by the two loops: request ids, per-request records, metrics."""

    def __init__(self, policy_name: str, seed: int, catalogue_size: int):
        self.policy_name, self.seed = policy_name, seed
        self.metrics = RunMetrics(catalogue_size)
        self.open: dict[str, tuple] = {}
        self.requests = 0

    def next_id(self) -> str:
        self.requests += 1
        return f"{self.policy_name}-{self.seed}-{self.requests}"

    def closed(self, transition: Transition) -> None:
        items, target, expected, oracle, ceiling, greedy = self.open.pop(transition.transition_id)
        index = int(transition.transition_id.rsplit("-", 1)[1]) - 1   # next_id's request number
        self.metrics.add(transition.reward, items, target, expected, oracle, ceiling, greedy, index=index)


def _items_for(config: EvalConfig, catalogue: dict) -> ItemEncoder:
    return ItemEncoder(config.item_dim, catalogue, text_encoder=text_encoder_from_path(config.text_encoder))


def _run_synthetic(config: EvalConfig, policy_name: str, seed: int, tick: Callable[[], None]) -> RunResult:
    from evaluation.replay import ReplayConfig, SyntheticSource

    replay = ReplayConfig(seed=seed, events=config.events, warmup_moments=config.warmup_moments,
                          moment_step_s=config.moment_step_s, world=config.world,
                          settings=Settings(window_s=config.window_s, rewards=config.rewards,
                                            allowed_lateness_s=config.allowed_lateness_s,
                                            session_gap_s=config.session_gap_s))
    source = SyntheticSource(replay)
    world = source.world
    run = _Run(policy_name, seed, len(world.item_ids))
    items = _items_for(config, world.meta)
    stream = _Stream(config, items, config.rewards, run.closed)
    policy = stream.policy = make_policy(policy_name, config, stream.bank, world.item_ids, seed)
    rng = np.random.default_rng([seed, 2])
    for a in source.warmup():
        stream.action(a.event_id, a.user_id, a.item_id, a.action, a.ts, organic=True)
    for moment in source.moments(config.events):
        stream.advance(min([moment.ts] + [a.ts for a in moment.before]))
        for a in moment.before:
            stream.action(a.event_id, a.user_id, a.item_id, a.action, a.ts, organic=True)
        state = stream.state(moment.user_id, moment.ts)
        request = stream.request(moment.user_id, moment.ts, state)
        choice = policy.choose(request, rng, config.list_size)
        request_id = run.next_id()
        expected_now = world.expected_rewards(moment.user_id)
        target = world.item_ids[int(np.argmax(expected_now))]
        ceiling = max((float(expected_now[world.item_index(i)]) for i in request.case_items), default=0.0)
        stream.open(request_id, moment.user_id, moment.ts, state, choice, request)
        outcome = source.respond(moment, choice.items[0], request_id)
        greedy = (outcome.expected_reward if choice.greedy_item is None
                  else float(expected_now[world.item_index(choice.greedy_item)]))
        run.open[request_id] = (choice.items, target, outcome.expected_reward, outcome.oracle_reward, ceiling,
                                greedy)
        for a in outcome.actions:
            stream.action(a.event_id, a.user_id, a.item_id, a.action, a.ts, organic=False)
        tick()
    stream.close()
    shift = run.metrics.shift_recovery(config.world.shift_at_moment) if config.world.shift_at_moment else {}
    return RunResult(policy_name, seed, {**run.metrics.summary(), **policy.stats(), **shift},
                     run.metrics.cumulative_reward())


def _context_projection(n_in: int, dim: int) -> np.ndarray:
    # float32 after the division: a float32 array divided by a NumPy float64 scalar is float64
    # under NumPy 2's promotion rules (NEP 50), and a float64 state then reached the Q network.
    rng = np.random.default_rng(20140901 + n_in * 1000 + dim)
    return (rng.standard_normal((n_in, dim)) / np.sqrt(dim)).astype(np.float32)


def _action_key(event: LoggedEvent) -> str:
    return event.action if event.rating is None else f"rating:{event.reward:g}"


def same_time_groups(events: Sequence[LoggedEvent]) -> Iterator[list[LoggedEvent]]:
    """Consecutive runs of events with the same event time, in order.

    Logs have coarse timestamps (Tmall: minutes) and keep ties in file order, which says nothing
    about which event came first; so every event of one timestamp is requested before any of
    them reaches a user's history or the case bank.

    >>> from evaluation.logs import LoggedEvent
    >>> ev = [LoggedEvent(str(i), "u", "7", ts, "click", 1.0, None, None) for i, ts in enumerate([1, 1, 2])]
    >>> [[e.event_id for e in g] for g in same_time_groups(ev)]
    [['0', '1'], ['2']]
    """
    group: list[LoggedEvent] = []
    for e in events:
        if group and e.ts != group[0].ts:
            yield group
            group = []
        group.append(e)
    if group:
        yield group


def _run_logged(config: EvalConfig, data: LoggedData, policy_name: str, seed: int,
                tick: Callable[[], None]) -> RunResult:
    catalogue = sorted(data.items) if data.items else sorted({e.item_id for e in data.events})
    rewards = _MappedRewards()
    for e in data.events:
        rewards.weights[_action_key(e)] = e.reward
    context = bool(data.context_columns)
    projection = _context_projection(data.context_dim, config.item_dim) if context else None
    run = _Run(policy_name, seed, len(catalogue))
    stream = _Stream(config, _items_for(config, data.items), rewards, run.closed, context_states=context)
    policy = stream.policy = make_policy(policy_name, config, stream.bank, catalogue, seed)
    rng = np.random.default_rng([seed, 2])
    off_policy = OffPolicyAccumulator() if data.has_propensity else None
    item_reward: dict[str, list[float]] = {}   # reward model for DR: per-item mean of past rewards
    reward_sum = [0.0, 0]

    def reward_hat(item: str) -> float:
        s = item_reward.get(item)
        if s:
            return s[0] / s[1]
        return reward_sum[0] / reward_sum[1] if reward_sum[1] else 0.0

    def user_key(e: LoggedEvent) -> str:
        return e.user_id if e.user_id and not context else f"ctx:{e.event_id}"

    def context_state(e: LoggedEvent) -> np.ndarray | None:
        # numbers and hashed categories (LoggedData.context_vector), projected and normalised
        if not context:
            return None
        v = data.context_vector(e) @ projection
        norm = float(np.linalg.norm(v))
        return (v / norm if norm > 0 else v).astype(np.float32)

    def record(e: LoggedEvent) -> None:
        stream.action(e.event_id, user_key(e), e.item_id, _action_key(e), e.ts, organic=True,
                      context_state=context_state(e))
        s = item_reward.setdefault(e.item_id, [0.0, 0])
        s[0] += e.reward
        s[1] += 1
        reward_sum[0] += e.reward
        reward_sum[1] += 1

    warm = min(config.warmup_events, len(data.events))
    for e in data.events[:warm]:
        stream.advance(e.ts)
        record(e)
    rest = data.events[warm:]
    if config.events:
        rest = rest[:config.events]
    if len(stream.bank) == 0:
        raise ValueError("no case in the bank before the first request: raise --warmup-events")
    for group in same_time_groups(rest):
        stream.advance(group[0].ts)
        requests: dict[str, tuple[np.ndarray, Request]] = {}
        for e in group:  # every request of the group is answered before any of its events is seen
            user = user_key(e)
            if user not in requests:
                state = context_state(e) if context else stream.state(user, e.ts)
                requests[user] = (state, stream.request(user, e.ts, state))
            state, request = requests[user]
            choice = policy.choose(request, rng, config.list_size)
            request_id = run.next_id()
            stream.open(request_id, user, e.ts, state, choice, request)
            run.open[request_id] = (choice.items, e.item_id, None, None, None, None)
            if off_policy is not None:
                off_policy.add(e.reward, e.propensity, choice.prob_of(e.item_id), reward_hat(e.item_id),
                               choice.expectation(reward_hat, catalogue))
        for e in group:
            record(e)
            tick()
    stream.close()
    estimates = {} if off_policy is None or not len(off_policy) else {
        name: est.to_dict() for name, est in off_policy.estimates().items()}
    return RunResult(policy_name, seed, {**run.metrics.summary(), **policy.stats()},
                     run.metrics.cumulative_reward(), estimates)


def run_policy(config: EvalConfig, policy_name: str, seed: int, data: LoggedData | None = None,
               tick: Callable[[], None] = lambda: None) -> RunResult:
    """Evaluate one policy with one seed; ``data`` is the loaded log for the log sources;
    ``tick`` is called after every request (progress)."""
    started = time.perf_counter()
    if config.source == "synthetic":
        result = _run_synthetic(config, policy_name, seed, tick)
    else:
        if data is None:
            raise ValueError(f"source {config.source!r} needs the loaded log (data=...)")
        result = _run_logged(config, data, policy_name, seed, tick)
    result.metrics["wall_s"] = time.perf_counter() - started
    return result
