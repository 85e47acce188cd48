"""``memento eval``: compare retrieval policies on the simulator or on logged data.

Examples::

    memento eval --source synthetic --seeds 5 --json eval.json --plot eval.png
    memento eval --source tmall --log ../shared/data/tmall-sample/sam_tianchi_2014002_rec_tmall_log.csv \\
        --products ../shared/data/tmall-sample/sam_tianchi_2014001_rec_tmall_product.csv
    memento eval --source interactions --log ratings.csv --rating-threshold 4 --items items.csv

Every policy runs over the same stream once per seed (seeds ``--seed`` … ``--seed + N − 1``);
the table shows mean ± std over seeds. See docs/evaluation.md for the protocol.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from learner.drift import DriftConfig
from learner.service import LearnerServiceConfig
from memento.options import add_dataclass_options, options_from_args
from learner.trainer import SoftQConfig
from evaluation.policies import POLICY_NAMES
from evaluation.runner import SOURCES, EvalConfig, RunResult, run_policy

__all__ = ["add_arguments", "run_from_args", "run_eval", "load_data"]

log = logging.getLogger(__name__)

# Learner-process options that mean nothing without Kafka and wall-clock pacing.
_SERVICE_ONLY = ("max_updates_per_poll", "publish_min_interval_s", "keep_checkpoints",
                 "state_save_interval_s", "log_every_s", "poll_timeout_ms", "max_poll_records", "group_id")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = EvalConfig()
    parser.add_argument("--source", choices=SOURCES, default=d.source, help="where requests come from")
    parser.add_argument("--log", dest="log_path", default="", help="log CSV (tmall, interactions)")
    parser.add_argument("--products", default="", help="Tmall product CSV (item metadata)")
    parser.add_argument("--items", default="", help="interactions: item metadata CSV "
                        "(item_id and any of category, brand, seller, title)")
    parser.add_argument("--reward", default="", help="reward per action, e.g. click=1,cart=3 "
                        "(the simulator and Tmall use click=1,collect=2,cart=3,purchase=5)")
    parser.add_argument("--rating-threshold", type=float, default=None,
                        help="interactions with a rating column: reward 1 when rating >= this, else 0")
    parser.add_argument("--context-cols", default=None, metavar="PREFIX",
                        help="interactions: columns starting with PREFIX are the context (the state)")
    parser.add_argument("--policies", default=",".join(POLICY_NAMES),
                        help=f"comma-separated, from {', '.join(POLICY_NAMES)}")
    parser.add_argument("--seeds", type=int, default=1, help="runs per policy (seeds --seed … --seed+N-1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--events", type=int, default=d.events,
                        help="requests per run (logs: after the warm-up; 0 = all)")
    parser.add_argument("--item-dim", type=int, default=d.item_dim, help="dimension of item and state vectors")
    parser.add_argument("--list-size", type=int, default=d.list_size, help="length of each ranked list")
    parser.add_argument("--own-cases", type=int, default=d.own_cases,
                        help="the user's own newest cases (one per distinct recent item) added to the nearest as "
                        "every case policy's candidates, and the recent items softq's recency prior ranks "
                        f"(serving's --own-cases; default {d.own_cases}; 0 = none)")
    parser.add_argument("--window", dest="window_s", type=float, default=d.window_s,
                        help="reward attribution window, event seconds")
    parser.add_argument("--session-gap", dest="session_gap_s", type=float, default=d.session_gap_s,
                        help="inactivity after a window that ends the user's session (done), event "
                             "seconds; 0 = sessions never end")
    parser.add_argument("--allowed-lateness", dest="allowed_lateness_s", type=float,
                        default=d.allowed_lateness_s, help="extra event seconds a window stays open")
    parser.add_argument("--warmup-moments", type=int, default=d.warmup_moments,
                        help="synthetic: organic moments per user before the first request")
    parser.add_argument("--warmup-events", type=int, default=d.warmup_events,
                        help="logs: leading events only observed before the first request")
    parser.add_argument("--shift-at-moment", type=int, default=d.world.shift_at_moment,
                        help="synthetic: request moment before which every user's taste shifts "
                             "(0 = no shift); the JSON then reports the reward recovery")
    parser.add_argument("--shift-strength", type=float, default=d.world.shift_strength,
                        help="synthetic: how far tastes move at the shift (1 = new tastes)")
    parser.add_argument("--linucb-alpha", type=float, default=d.linucb_alpha, help="LinUCB confidence width")
    parser.add_argument("--vw-args", default=d.vw_args,
                        help="Vowpal Wabbit arguments of the vw policy, one string (needs --cb_explore_adf; "
                        "write --vw-args='--cb_explore_adf ...' so the value is not read as an option)")
    parser.add_argument("--text-encoder", default="", metavar="MODEL_PATH",
                        help="sentence-transformers model for item titles (off by default)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--json", dest="json_path", default="", help="write {policy: {metric: value}} here")
    parser.add_argument("--plot", dest="plot_path", default="", help="write a PNG of cumulative reward here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_options(parser, SoftQConfig, "soft-Q hyperparameters (softq; greedy-q uses hidden, lr, "
                          "batch size)", exclude=("seed",))
    add_dataclass_options(parser, LearnerServiceConfig, "replay and pacing (as the learner process)",
                          exclude=_SERVICE_ONLY)
    add_dataclass_options(parser, DriftConfig, "reward drift detection and exploration boost (softq, "
                          "as the learner process)")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    import dataclasses

    from memento.config import RewardWeights

    softq = options_from_args(SoftQConfig, args, top_k=EvalConfig().top_k)
    pacing = options_from_args(LearnerServiceConfig, args)
    drift = options_from_args(DriftConfig, args)
    world = dataclasses.replace(EvalConfig().world, shift_at_moment=args.shift_at_moment,
                                shift_strength=args.shift_strength)
    rewards = RewardWeights.parse(args.reward) if args.reward and args.source != "interactions" else RewardWeights()
    return EvalConfig(source=args.source, events=args.events, item_dim=args.item_dim, top_k=softq.top_k,
                      own_cases=args.own_cases, list_size=args.list_size, window_s=args.window_s,
                      allowed_lateness_s=args.allowed_lateness_s,
                      session_gap_s=args.session_gap_s, warmup_moments=args.warmup_moments,
                      warmup_events=args.warmup_events, softq=softq, pacing=pacing, drift=drift,
                      linucb_alpha=args.linucb_alpha, vw_args=args.vw_args, text_encoder=args.text_encoder,
                      rewards=rewards, world=world)


def load_data(args: argparse.Namespace):
    """The log of ``--source tmall|interactions`` (None for the simulator)."""
    from evaluation import logs

    if args.source == "synthetic":
        return None
    if not args.log_path:
        raise ValueError(f"--source {args.source} needs --log CSV")
    mapping = logs.parse_reward_mapping(args.reward) if args.reward else None
    if args.source == "tmall":
        return logs.load_tmall(args.log_path, args.products or None, mapping)
    return logs.load_interactions(args.log_path, items_path=args.items or None, rewards=mapping,
                                  rating_threshold=args.rating_threshold, context_prefix=args.context_cols)


_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    from memento.threads import limit_threads

    limit_threads(1)
    _progress_counter = counter


def _tick_shared() -> None:
    with _progress_counter.get_lock():
        _progress_counter.value += 1


def _run_in_worker(config: EvalConfig, policy: str, seed: int, data) -> RunResult:
    return run_policy(config, policy, seed, data, tick=_tick_shared)


def run_eval(config: EvalConfig, policies: list[str], seeds: list[int], data=None, *, jobs: int = 1,
             progress: bool = True) -> list[RunResult]:
    """Every policy once per seed; results in (policy, seed) order."""
    from tqdm import tqdm

    per_run = config.events if config.source == "synthetic" else (
        len(data.events) - min(config.warmup_events, len(data.events)))
    if config.source != "synthetic" and config.events:
        per_run = min(per_run, config.events)
    tasks = [(p, s) for p in policies for s in seeds]
    bar = tqdm(total=per_run * len(tasks), desc="memento eval", unit="req", disable=not progress,
               dynamic_ncols=True)
    results: dict[tuple[str, int], RunResult] = {}
    try:
        if jobs <= 1:
            from memento.threads import limit_threads

            limit_threads(1)
            for policy, seed in tasks:
                bar.set_postfix(policy=policy, seed=seed)
                results[(policy, seed)] = run_policy(config, policy, seed, data, tick=lambda: bar.update(1))
                log.info("%s seed %d: %s", policy, seed, _brief(results[(policy, seed)]))
        else:
            ctx = multiprocessing.get_context("spawn")
            counter = ctx.Value("q", 0)
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                     initargs=(counter,)) as pool:
                futures = {pool.submit(_run_in_worker, config, p, s, data): (p, s) for p, s in tasks}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    bar.update(counter.value - bar.n)
                    for future in done:
                        key = futures[future]
                        results[key] = future.result()
                        log.info("%s seed %d: %s", key[0], key[1], _brief(results[key]))
    finally:
        bar.close()
    return [results[t] for t in tasks]


def _brief(result: RunResult) -> str:
    m = result.metrics
    extra = f" share_of_oracle={m['share_of_oracle']:.3f}" if "share_of_oracle" in m else ""
    return f"reward/req={m['reward_mean']:.3f}{extra} hit@10={m['hit@10']:.3f} ({m['wall_s']:.0f} s)"


def run_from_args(args: argparse.Namespace) -> int:
    from evaluation.report import format_table, plot_cumulative_reward, summarise, write_json

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        print(f"memento eval: unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.jobs < 1:
        print("memento eval: --seeds and --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
        data = load_data(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"memento eval: {exc}", file=sys.stderr)
        return 2
    if data is not None:
        print(data.summary())
        for line, reason in data.skipped[:5]:
            print(f"  skipped line {line}: {reason}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    started = time.perf_counter()
    try:
        runs = run_eval(config, policies, seeds, data, jobs=args.jobs, progress=not args.no_progress)
    except ValueError as exc:
        print(f"memento eval: {exc}", file=sys.stderr)
        return 2
    summary = summarise(runs)
    print(f"\nmemento eval: source={config.source} seeds={seeds} requests/run="
          f"{int(runs[0].metrics['requests'])} ({time.perf_counter() - started:.0f} s)")
    print(format_table(summary))
    settings = {"config": config.to_dict(), "policies": policies, "seeds": seeds,
                "log": args.log_path, "products": args.products, "items": args.items,
                "data": data.summary() if data is not None else None}
    if args.json_path:
        print(f"wrote {write_json(args.json_path, summary, settings)}")
    if args.plot_path:
        title = f"memento eval: {config.source}, {len(seeds)} seed(s)"
        print(f"wrote {plot_cumulative_reward(args.plot_path, runs, title)}")
    return 0
