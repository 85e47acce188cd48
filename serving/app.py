"""The serving HTTP application (aiohttp): recommend, feedback, cases, health, stats, metrics.

:class:`ServingService` owns the moving parts of one serving process — case bank, user
histories, the policy reference, Kafka followers and the publisher — and :func:`make_app` wraps
it in an :class:`aiohttp.web.Application` implementing the HTTP contract (docs in
``serving/openapi.py``). The policy is swapped by replacing one attribute: a request reads the
reference once per micro-batch (:mod:`serving.batching`), so every request is answered whole by
one policy version and a swap never fails or blocks a request; loading and verifying happen on
the checkpoint follower's thread. A checkpoint carries the μ its network was trained for (α,
probability floor, K); the swapped-in policy samples that μ, so serving's own ``alpha``,
``min_prob`` and ``top_k`` are only the defaults until such a checkpoint arrives (an override
is logged and counted in ``memento_serving_policy_overrides_total{option}``). Concurrent
recommend requests share one bank search and one Q-network forward pass.

>>> cfg = ServingConfig(api_tokens=ApiTokens.parse("feedback:" + "t" * 16))
>>> cfg.options.alpha, cfg.generator, cfg.api_tokens.open_scopes()
(0.1, 'case', ['recommend', 'cases', 'admin'])
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from memento.checkpoint import Checkpoint
from memento.config import Settings
from memento.encoder import ItemEncoder, StateEncoder, load_products
from memento.history import UserHistories
from memento.kafka_io import DeadLetterWriter, make_producer
from memento.options import option
from memento.personal import UserMemory, recent_vectors, user_memory, with_population
from memento.priors import RetrievalPrior
from memento.schemas import CheckpointAnnouncement, Recommendation, to_dict
from memento.threads import limit_threads
from memory_store.index import IVF_ENCODINGS
from serving.auth import ApiTokens
from serving.batching import MicroBatcher
from serving.followers import ActionFollower, CaseFollower, CheckpointFollower
from serving.generator import CaseItemGenerator, ChatCompletionGenerator, Generator
from serving.ids import RequestIds
from serving.metrics import ServingMetrics
from serving.openapi import openapi_document
from serving.policy import NoCandidatesError, PolicyOptions, RetrievalPolicy
from serving.publisher import PRODUCER_OPTIONS, Publisher
from serving.validation import RequestError, parse_feedback, parse_json, parse_recommend

__all__ = ["ServingConfig", "ServingService", "make_app", "serving_bank_path", "SERVICE_KEY"]

log = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("serving_service", object)
_START_TASK = web.AppKey("serving_start_task", object)
_METRICS_RUNNER = web.AppKey("serving_metrics_runner", object)


def _option_text(value) -> str:
    """A policy option for a log line: numbers short, the priors' mix as similarity:vote=share."""
    if isinstance(value, tuple):
        return "[" + " ".join(f"{prior.key}={share:.3f}" for prior, share in map(RetrievalPrior.from_entry, value)) + "]"
    return f"{value:g}"


# The item generators serving can run (serving.generator): the chosen case's item, or a chat endpoint.
GENERATORS = ("case", "chat")


@dataclass(frozen=True)
class ServingConfig:
    """Serving options beyond the shared :class:`~memento.config.Settings`.

    Parameters
    ----------
    options
        Policy options (top K, α, probability floor, seed). K, α and the floor are defaults:
        a checkpoint that carries them replaces them when it is swapped in.
    api_tokens
        Bearer tokens and their scopes (:mod:`serving.auth`; from the environment, never a flag);
        empty = no authentication.
    max_body_bytes
        Largest accepted request body; larger ones get 413.
    generator
        ``case`` (default: the chosen case's item) or ``chat`` (OpenAI-compatible endpoint).
    chat_url, chat_model, chat_api_key, chat_timeout_s
        The chat endpoint, when ``generator == "chat"``.
    worker_index
        Index of this process among several workers on one port: selects its case bank
        directory (``serving-bank`` for 0, ``serving-bank-<i>`` otherwise) and offsets the seed.
    bank_shards
        Shards of a new serving case bank (an existing one keeps the count it was created with).
        Every shard is searched for every request, so on few cores one shard answers fastest;
        more shards parallelise adds and bound each index rebuild.
    bank_encoding
        How the bank's IVF cells store vectors: ``fp16`` (default: half the memory read per
        search, at equal tuned recall) or ``flat`` (float32).
    bank_nprobe
        IVF cells scanned per search; None (default) = the smallest number that reaches the
        bank's target recall (0.97), tuned when the index is built. A fixed, smaller nprobe trades
        recall for search time, the largest part of a request's cost at a million cases
        (docs/serving.md has measured pairs).
    compute_threads
        Threads for torch and FAISS (process-wide). One request scores one state, so more
        threads only add contention; 1 is fastest on small machines.
    max_users
        Users whose recent history is kept in memory; the least recently active are dropped past
        it (``memento_serving_users``).
    max_cases
        Cases the serving bank keeps (split evenly over its shards); past it the oldest are
        evicted (the bank's ``memento_casebank_*`` metrics count them). None: unbounded.
    max_batch
        Most recommend requests answered by one bank search and Q forward pass; concurrent
        requests are batched without waiting (:class:`~serving.batching.MicroBatcher`).
    metrics_port, metrics_host
        Where ``/metrics`` is served when ``metrics_port`` > 0 (worker i of several listens on
        ``metrics_port + i``, so each worker's registry is scraped on its own): off the public API
        port. 0 (default): on the API port.
    """

    options: PolicyOptions = field(default_factory=PolicyOptions)
    api_tokens: ApiTokens = field(default_factory=ApiTokens)
    max_body_bytes: int = option(64 * 1024, "largest request body in bytes; larger ones get 413")
    generator: str = option("case", "item generator: the chosen case's item, or an OpenAI-compatible chat endpoint",
                            choices=GENERATORS)
    chat_url: str = option("", "chat endpoint root, e.g. http://127.0.0.1:8000/v1")
    chat_model: str = option("gpt-4o-mini", "model name sent to the chat endpoint")
    chat_api_key: str = ""
    chat_timeout_s: float = option(2.0, "timeout of one chat call in seconds")
    worker_index: int = 0
    bank_shards: int = option(1, "shards of a new case bank (an existing bank keeps its count)")
    bank_encoding: str = option("fp16", "IVF cell storage of the case bank: fp16 (half the memory per search) "
                                "or flat", choices=IVF_ENCODINGS)
    bank_nprobe: int | None = option(None, "IVF cells scanned per search (none: tuned to 0.97 recall); fewer "
                                     "trade recall for speed")
    compute_threads: int = option(1, "threads for torch and FAISS (one request scores one state: 1 is fastest "
                                  "on small machines)")
    max_users: int = option(250_000, "users whose recent history is kept in memory (the least recently "
                                       "active dropped past it; docs/deploy.md sizes it)")
    max_cases: int | None = option(None, "cases the serving bank keeps, the oldest evicted past it (none: "
                                         "unbounded; docs/deploy.md sizes it)")
    max_batch: int = option(64, "most concurrent recommend requests answered by one search and Q pass")
    metrics_port: int = option(0, "serve /metrics on this port (worker i: port + i) instead of the API port; "
                                  "0 = on the API port")
    metrics_host: str = option("0.0.0.0", "interface of the metrics port")

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_users < 1 or (self.max_cases is not None and self.max_cases < 1):
            raise ValueError(f"max_users must be >= 1 and max_cases >= 1 (or None), got {self.max_users} and "
                             f"{self.max_cases}")
        if self.bank_nprobe is not None and self.bank_nprobe < 1:
            raise ValueError(f"bank_nprobe must be >= 1 (or None: tuned), got {self.bank_nprobe}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.generator == "chat" and not self.chat_url:
            raise ValueError("generator 'chat' needs chat_url (an OpenAI-compatible endpoint root)")

    def open_bank(self, path: Path, dim: int):
        """The case bank at ``path`` (``memory_store.CaseBank``, states of ``dim``) with serving's
        options: what a serving worker searches, and what ``memento bench serving`` measures."""
        from memory_store import CaseBank

        # IVF probes are tuned for recall at the k serving searches, not the bank's default.
        shards = CaseBank.stored_num_shards(path) or self.bank_shards
        per_shard = None if self.max_cases is None else -(-self.max_cases // shards)
        return CaseBank(path, dim=dim, num_shards=shards, omp_threads=self.compute_threads,
                        tune_k=self.options.top_k, ivf_encoding=self.bank_encoding, nprobe=self.bank_nprobe,
                        max_cases_per_shard=per_shard, eviction="oldest")


def serving_bank_path(data_dir: str | Path, worker_index: int = 0) -> Path:
    """The case bank directory of serving worker ``worker_index`` (each worker owns one).

    >>> serving_bank_path("/data").name, serving_bank_path("/data", 2).name
    ('serving-bank', 'serving-bank-2')
    """
    return Path(data_dir) / ("serving-bank" if worker_index == 0 else f"serving-bank-{worker_index}")


class ServingService:
    """One serving process's state and background work.

    Parameters
    ----------
    settings
        Shared settings (Kafka, topics, directories, dimensions).
    config
        Serving options.
    """

    def __init__(self, settings: Settings, config: ServingConfig | None = None):
        self.settings = settings
        self.config = config or ServingConfig(options=PolicyOptions(top_k=settings.top_k))
        self.options = self.config.options
        self.metrics = ServingMetrics()
        self._policy_gauges(self.options)
        catalogue = load_products(settings.products) if settings.products else None
        self.items = ItemEncoder(settings.item_dim, catalogue)
        self.states = StateEncoder(self.items, max_len=settings.history_len)
        self.histories = UserHistories(max_users=self.config.max_users, max_len=settings.history_len)
        self.metrics.users.set_function(lambda: len(self.histories))
        self.rng = np.random.default_rng(self.options.seed + self.config.worker_index)
        self.policy: RetrievalPolicy | None = None
        self.version_seen_at: dict[int, float] = {}
        self.bank = None
        self.generator: Generator | None = None
        self.publisher: Publisher | None = None
        self.followers: list = []
        self.recommendations_served = 0
        self.request_ids = RequestIds()
        self.batcher = MicroBatcher(self._decide_batch, max_batch=self.config.max_batch,
                                    on_batch=self._batch_done)
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self._closing = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def bank_path(self) -> Path:
        return serving_bank_path(self.settings.data_dir, self.config.worker_index)

    def start(self) -> None:
        """Open the bank, connect to Kafka, start the followers (blocking; run off the loop)."""
        try:
            limit_threads(self.config.compute_threads)
            self.bank = self.config.open_bank(self.bank_path, self.settings.state_dim)
            self.metrics.cases.set(len(self.bank))
            default = CaseItemGenerator(self.bank)
            if self.config.generator == "chat":
                self.generator = ChatCompletionGenerator(
                    self.config.chat_url, self.config.chat_model, default,
                    api_key=self.config.chat_api_key, timeout_s=self.config.chat_timeout_s,
                    known_items=list(self.items.catalogue), on_fallback=self.metrics.generator_fallbacks.inc)
            else:
                self.generator = default
            producer = self._connect_producer()
            if producer is None:
                return
            self.publisher = Publisher(producer, self.metrics)
            self.followers = [
                ActionFollower(self.settings, self.histories, self.metrics),
                CaseFollower(self.settings, self.bank, self.metrics,
                             dead_letters=DeadLetterWriter(self.settings, producer)),
                CheckpointFollower(self.settings, self.metrics, self._current_version, self._swap_in),
            ]
            for follower in self.followers:
                follower.start()
            self.started.set()
            log.info("serving started: bank %s (%d cases), Kafka %s", self.bank_path, len(self.bank),
                     self.settings.bootstrap_servers)
        except BaseException as exc:
            self.start_error = exc
            log.exception("serving failed to start")
            raise

    def health(self) -> tuple[bool, list[str]]:
        """(healthy, problems): start-up failed, or a background thread (a Kafka follower, the
        publisher) has died; sets ``memento_serving_thread_alive``. Before start-up ends there
        is nothing to be unhealthy about (``/readyz`` says whether it is ready)."""
        problems = []
        if self.start_error is not None:
            problems.append(f"start-up failed: {self.start_error!r}")
        threads = [(f.name, f.is_alive(), f.error) for f in self.followers]
        if self.publisher is not None:
            threads.append(("kafka-publisher", self.publisher.alive, None))
        for name, alive, error in threads:
            self.metrics.thread_alive.labels(name).set(1.0 if alive else 0.0)
            if not alive and not self._closing.is_set():
                problems.append(f"thread {name} is dead" + (f": {error!r}" if error is not None else ""))
        return not problems, problems

    def _connect_producer(self):
        delay = 0.2
        while not self._closing.is_set():
            try:
                return make_producer(self.settings, **PRODUCER_OPTIONS)
            except Exception as exc:  # NoBrokersAvailable and socket errors
                log.warning("cannot reach Kafka at %s (%s); retrying", self.settings.bootstrap_servers, exc)
                self._closing.wait(delay)
                delay = min(delay * 2, 5.0)
        return None

    def close(self) -> None:
        """Stop followers, flush the producer, close the bank (blocking)."""
        self._closing.set()
        for follower in self.followers:
            follower.stop()
        if self.publisher is not None:
            self.publisher.close()
        if self.bank is not None:
            self.bank.close()
        log.info("serving stopped")

    # -- policy --------------------------------------------------------------------------------
    def _current_version(self) -> int | None:
        policy = self.policy
        return None if policy is None else policy.version

    def _policy_gauges(self, options: PolicyOptions) -> None:
        self.metrics.policy_alpha.set(options.alpha)
        self.metrics.policy_min_prob.set(options.min_prob)
        self.metrics.policy_top_k.set(options.top_k)
        self.metrics.policy_similarity_prior.set(options.similarity_prior)
        self.metrics.policy_vote_prior.set(options.vote_prior)
        self.metrics.policy_prior_share.clear()   # a prior no longer mixed must not keep its last share
        for prior, share in options.prior_mix():
            self.metrics.policy_prior_share.labels(prior.key).set(share)

    def _swap_in(self, checkpoint: Checkpoint, announcement: CheckpointAnnouncement) -> None:
        """Serve ``checkpoint`` with the μ it carries (serving's flags when it carries none)."""
        previous = self._current_version()
        options = self.options.for_checkpoint(checkpoint.policy)
        overrides = self.options.overridden_by(checkpoint.policy)
        for name in overrides:
            self.metrics.policy_overrides.labels(name).inc()
        if checkpoint.policy is None:
            log.info("policy version %d carries no alpha/min_prob/top_k: sampling with serving's "
                     "alpha=%g min_prob=%g top_k=%d", announcement.version, options.alpha,
                     options.min_prob, options.top_k)
        elif overrides:
            log.info("policy version %d sets %s (serving's flags: %s)", announcement.version,
                     ", ".join(f"{k}={_option_text(v[1])}" for k, v in overrides.items()),
                     ", ".join(f"{k}={_option_text(v[0])}" for k, v in overrides.items()))
            if "top_k" in overrides and (self.policy is None or self.policy.options.top_k != options.top_k):
                log.warning("policy version %d samples among top_k=%d cases; the bank's IVF probes "
                            "were tuned for serving's top_k=%d", announcement.version, options.top_k,
                            self.options.top_k)
        self.policy = RetrievalPolicy(checkpoint.net, announcement.version, self.bank, options)
        self._policy_gauges(options)
        self.version_seen_at[announcement.version] = time.time()
        self.metrics.reloads.inc()
        self.metrics.policy_version.set(announcement.version)
        log.info("policy version %d swapped in (was %s; announced %.3fs ago)", announcement.version,
                 previous, time.time() - announcement.created_at)

    def _decide_batch(self, queries: list[tuple[np.ndarray, UserMemory]]) -> list:
        """Decisions for a batch of (state, the user's memory): one policy for all."""
        policy = self.policy
        if policy is None:
            return [NoCandidatesError("no policy loaded yet") for _ in queries]
        states = np.stack([state for state, _ in queries])
        memories = with_population([memory for _, memory in queries], self.bank.popular, self.options.own_cases)
        decisions = policy.recommend_many(states, self.rng, memories, recent_vectors(memories, self.items))
        out: list = []
        for decision in decisions:
            if decision is None:
                out.append(NoCandidatesError("the case bank has no case to choose from"))
                continue
            self.metrics.mu_entropy.observe(decision.entropy)
            self.metrics.propensity.observe(decision.propensity)
            self.metrics.candidates.observe(len(decision.case_ids))
            out.append(decision)
        return out

    def _batch_done(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    # -- status --------------------------------------------------------------------------------
    @property
    def cases(self) -> int:
        return 0 if self.bank is None else len(self.bank)

    @property
    def ready(self) -> bool:
        return self.started.is_set() and self.policy is not None and self.cases > 0

    def stats(self) -> dict:
        def sample(name: str) -> float:
            return self.metrics.registry.get_sample_value(name) or 0.0

        return {
            "policy_version": self._current_version(),
            "cases": self.cases,
            "cases_appended": int(sample("memento_serving_cases_appended_total")),
            "reloads": int(sample("memento_serving_reloads_total")),
            "reload_failures": int(sample("memento_serving_reload_failures_total")),
            "requests": self.recommendations_served,
        }


def _error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def make_app(service: ServingService) -> web.Application:
    """The aiohttp application; starting it starts ``service`` in the background (``/healthz``
    answers at once, ``/readyz`` once the policy and cases are in), cleanup closes it."""
    settings, config, metrics = service.settings, service.config, service.metrics

    @web.middleware
    async def observe(request: web.Request, handler):
        started = time.perf_counter()
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        try:
            response = await handler(request)
        except RequestError as exc:
            response = _error(exc.status, str(exc))
            response.headers.update(exc.headers)
        except web.HTTPRequestEntityTooLarge:
            response = _error(413, f"request body is larger than {config.max_body_bytes} bytes")
        except web.HTTPException as exc:
            if exc.empty_body or exc.status < 400:
                raise
            response = _error(exc.status, exc.reason)
        except Exception:  # a bug: answered, logged and counted like every other response
            log.exception("%s %s failed", request.method, request.path)
            response = _error(500, "internal error")
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        metrics.requests.labels(endpoint, str(response.status)).inc()
        return response

    def require(request: web.Request, scope: str) -> None:
        config.api_tokens.check(request.headers.get("Authorization"), scope)

    def not_ready(what: str = "") -> web.Response:
        reason = what or ("no policy loaded yet" if service.policy is None else "the case bank is empty"
                          if service.started.is_set() else "still starting")
        return _error(503, f"not ready: {reason}", policy_version=service._current_version(),
                      cases=service.cases)

    async def recommend(request: web.Request) -> web.Response:
        require(request, "recommend")
        req = parse_recommend(parse_json(await request.read()), max_future_skew_s=settings.max_future_skew_s)
        if not service.ready:
            return not_ready()
        history = service.histories.get(req.user_id) + req.recent_items
        state = service.states.encode(history, until=req.ts)
        try:
            decision = await service.batcher.submit((state, user_memory(history, service.options.own_cases)))
        except NoCandidatesError as exc:
            return not_ready(str(exc))
        generator = service.generator
        if generator.blocking:
            items = await asyncio.get_running_loop().run_in_executor(
                None, generator.generate, decision, req.k, history)
        else:
            items = generator.generate(decision, req.k, history)
        request_id = service.request_ids.next()
        served_at = time.time()
        record = Recommendation(
            request_id=request_id, user_id=req.user_id, item_id=items[0], case_id=decision.case_id,
            propensity=decision.propensity, policy_version=decision.policy_version, ts=req.ts,
            state=decision.state.tolist(), case_features=decision.case_features.tolist(),
            served_at=served_at, prior=decision.prior)
        service.publisher.publish(settings.topics.recommendations, req.user_id, record)
        metrics.published.inc()
        service.recommendations_served += 1
        body = {"request_id": request_id, "user_id": req.user_id, "item_id": items[0], "items": items,
                "case_id": decision.case_id, "propensity": decision.propensity,
                "policy_version": decision.policy_version, "ts": req.ts}
        if req.explain:
            candidates = []
            for i, case_id in enumerate(decision.case_ids):
                case = service.bank.get(case_id)
                candidates.append({"case_id": case_id, "item_id": case.item_id if case else None,
                                   "probability": float(decision.probs[i]), "q": float(decision.q[i]),
                                   "similarity": float(decision.similarities[i])})
            body["candidates"] = candidates
        return web.json_response(body)

    async def feedback(request: web.Request) -> web.Response:
        require(request, "feedback")
        action = parse_feedback(parse_json(await request.read()), max_future_skew_s=settings.max_future_skew_s)
        if service.publisher is None:
            return not_ready("not connected to Kafka yet")
        if not service.publisher.publish(settings.topics.actions, action.user_id, action):
            return _error(503, "the Kafka publish queue is full; retry later")
        return web.json_response({"accepted": True, "event_id": action.event_id}, status=202)

    async def get_case(request: web.Request) -> web.Response:
        require(request, "cases")
        case_id = request.match_info["case_id"]
        case = service.bank.get(case_id) if service.bank is not None else None
        if case is None:
            return _error(404, f"no case with case_id {case_id!r}")
        return web.json_response(to_dict(case))

    async def healthz(request: web.Request) -> web.Response:
        ok, problems = service.health()
        if ok:
            return web.json_response({"ok": True})
        return web.json_response({"ok": False, "problems": problems}, status=503)

    async def readyz(request: web.Request) -> web.Response:
        ready = service.ready
        return web.json_response({"ready": ready, "policy_version": service._current_version(),
                                  "cases": service.cases}, status=200 if ready else 503)

    async def stats(request: web.Request) -> web.Response:
        require(request, "admin")
        return web.json_response(service.stats())

    async def prometheus(request: web.Request) -> web.Response:
        service.health()  # the thread gauges
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document(config.max_body_bytes))

    async def on_startup(app: web.Application) -> None:
        # Not awaited: /healthz must answer while the bank loads and Kafka connects.
        app[_START_TASK] = asyncio.get_running_loop().run_in_executor(None, service.start)
        if config.api_tokens.open_scopes():
            log.warning("API scopes open to anyone (no token holds them): %s", ", ".join(config.api_tokens.open_scopes()))
        if config.metrics_port > 0:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", prometheus)
            runner = web.AppRunner(metrics_app, access_log=None)
            await runner.setup()
            port = config.metrics_port + config.worker_index
            await web.TCPSite(runner, config.metrics_host, port).start()
            app[_METRICS_RUNNER] = runner
            log.info("metrics on http://%s:%d/metrics", config.metrics_host, port)

    async def on_cleanup(app: web.Application) -> None:
        if _METRICS_RUNNER in app:
            await app[_METRICS_RUNNER].cleanup()
        loop = asyncio.get_running_loop()
        service._closing.set()
        try:
            await app[_START_TASK]
        except BaseException:  # already logged by start()
            pass
        await loop.run_in_executor(None, service.close)

    app = web.Application(middlewares=[observe], client_max_size=config.max_body_bytes)
    app[SERVICE_KEY] = service
    app.router.add_post("/v1/recommend", recommend)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/v1/cases/{case_id}", get_case)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/stats", stats)
    if config.metrics_port <= 0:
        app.router.add_get("/metrics", prometheus)
    app.router.add_get("/openapi.json", openapi)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
