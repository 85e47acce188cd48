"""``memento demo``: the whole loop on one machine.

Starts an embedded Kafka-protocol broker, the stream worker, the learner and serving as child
processes, replays users through serving with a progress bar, prints the mean reward per window
with the policy version that served it, writes a PNG of the reward curve, and stops everything
(also on Ctrl-C or SIGTERM), leaving no process behind. On the simulator it then plays the same
users in-process with plain cosine retrieval and with the learned policy (``memento eval``'s
protocol) and prints both side by side, so the gain, or its absence, shows in the first command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

from harness.broker import EmbeddedBroker, free_port
from harness.processes import ProcessGroup, memento_command, wait_http

__all__ = ["add_arguments", "run_from_args", "plot_rewards"]

log = logging.getLogger(__name__)

TMALL_DIR = Path("../shared/data/tmall-sample")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=5000, help="user moments (recommendation requests) to replay")
    parser.add_argument("--source", choices=["synthetic", "tmall"], default="synthetic")
    parser.add_argument("--log", default=str(TMALL_DIR / "sam_tianchi_2014002_rec_tmall_log.csv"),
                        help="Tmall log CSV (source tmall)")
    parser.add_argument("--products", default=None,
                        help="product CSV (source tmall; default: the shared Tmall sample's)")
    parser.add_argument("--engine", choices=EmbeddedBroker.engines(), default="noida", help="embedded broker")
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second (0: as fast as served)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary-window", type=int, default=500, help="requests per row of the reward table")
    parser.add_argument("--workdir", default=".memento/demo", help="broker, data, checkpoints and logs (wiped first)")
    parser.add_argument("--plot", default=None, help="PNG of the reward curve (default WORKDIR/reward.png)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="synthetic: skip the in-process comparison of plain cosine retrieval and "
                             "the learned policy on the same simulated users")


def plot_rewards(summary, path: str | Path) -> None:
    """Mean reward per window (and, for the simulator, expected and oracle reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = summary.windows
    x = [w.first_seq + w.requests for w in windows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, [w.mean_reward for w in windows], marker="o", label="realised reward (soft-Q policy)")
    if summary.mean_oracle_reward is not None:
        ax.plot(x, [w.mean_expected_reward for w in windows], linestyle="--", label="expected reward")
        ax.plot(x, [w.mean_oracle_reward for w in windows], linestyle=":", label="oracle (best item)")
    for w, xi in zip(windows, x):
        if w.policy_version is not None:
            ax.annotate(f"v{w.policy_version}", (xi, w.mean_reward), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("requests served")
    ax.set_ylabel(f"mean reward per {windows[0].requests if windows else 0} requests")
    ax.set_title(f"memento-stream demo ({summary.source})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_with_cosine(events: int, seed: int, plot_path: str | Path, *, progress: bool = True,
                        world=None) -> str:
    """Plain cosine retrieval beside the learned policy on the same simulated users, in-process
    (``memento eval``'s protocol: the same seed gives both the same users, in the same order, with
    the same reactions to the same items); writes their cumulative reward to ``plot_path`` and
    returns the table.

    >>> import tempfile, os
    >>> from evaluation.simulator import WorldConfig
    >>> table = compare_with_cosine(40, 0, os.path.join(tempfile.mkdtemp(), "c.png"), progress=False,
    ...                             world=WorldConfig(n_items=30, n_users=8))
    >>> [line.split()[0] for line in table.splitlines()]
    ['policy', 'cosine', 'softq']
    """
    from evaluation.cli import run_eval
    from evaluation.report import format_table, plot_cumulative_reward, summarise
    from evaluation.runner import EvalConfig

    config = EvalConfig(events=events, **({"world": world} if world is not None else {}))
    runs = run_eval(config, ["cosine", "softq"], [seed], progress=progress)
    plot_cumulative_reward(plot_path, runs, f"cosine retrieval vs the learned policy, {events} requests")
    return format_table(summarise(runs))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_from_args(args: argparse.Namespace) -> int:
    from evaluation.replay import ReplayConfig, run_replay
    from evaluation.simulator import SyntheticWorld

    started = time.monotonic()
    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    plot_path = Path(args.plot) if args.plot else workdir / "reward.png"
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    broker = EmbeddedBroker(args.engine, free_port(), str(workdir / "broker"))
    group = ProcessGroup()
    summary = None
    try:
        print(f"starting {args.engine} broker ...", flush=True)
        broker.start()
        settings = broker.settings(data_dir=str(workdir / "data"), checkpoint_dir=str(workdir / "checkpoints"))
        tmall = {}
        if args.source == "tmall":
            products = Path(args.products or TMALL_DIR / "sam_tianchi_2014001_rec_tmall_product.csv")
            if not Path(args.log).exists() or not products.exists():
                print(f"memento demo: Tmall files not found ({args.log}, {products})", file=sys.stderr)
                return 2
            tmall = {"log_path": args.log, "products_path": str(products)}
        config = ReplayConfig(source=args.source, events=args.events, rate=args.rate, seed=args.seed,
                              settings=settings, summary_window=args.summary_window,
                              response_log=str(workdir / "responses.jsonl"), **tmall)
        if args.source == "synthetic":
            products = workdir / "products.csv"
            SyntheticWorld(config.world, seed=args.seed).write_products_csv(products)
        settings = dataclasses.replace(settings, products=str(products.resolve()))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = dataclasses.replace(config, settings=settings, serving_url=url)
        env = settings.to_env()
        logs = workdir / "logs"
        print(f"broker {broker.bootstrap}; starting worker, learner and serving (logs in {logs}) ...", flush=True)
        # The demo never restarts its worker: Tansu's slow recovery workaround is not needed.
        group.start("worker", memento_command("worker", "--metrics-port", str(free_port()), "--no-tansu-safe-recovery"),
                    env=env, log_dir=logs)
        group.start("learner", memento_command("learner", "--metrics-port", str(free_port())), env=env, log_dir=logs)
        group.start("serve", memento_command("serve", "--port", str(port)), env=env, log_dir=logs)
        wait_http(url + "/healthz", timeout=90, group=group)
        summary = run_replay(config, progress=True)
        group.check()
        print(summary.table())
        plot_rewards(summary, plot_path)
        print(f"reward curve: {plot_path}")
        if args.source == "synthetic" and args.compare:
            print("\nthe same simulated users, in-process: plain cosine retrieval beside the learned policy ...",
                  flush=True)
            compared = workdir / "vs_cosine.png"
            print(compare_with_cosine(args.events, args.seed, compared))
            print(f"cumulative reward, both policies: {compared}")
    except KeyboardInterrupt:
        print("\ninterrupted: shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        codes = group.stop_all()
        broker.stop()
        signal.signal(signal.SIGTERM, previous)
        print(f"stopped {', '.join(f'{k} (exit {v})' for k, v in codes.items()) or 'nothing'} and the broker; "
              f"demo wall time {time.monotonic() - started:.1f} s", flush=True)
    return 0
