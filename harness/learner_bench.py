"""``memento bench learner``: how fast the learner takes transitions in and trains on them, against a
bare torch loop of the same network and batch measured in the same run (the baseline).

One process, one run, three measurements:

1. **ingest**: encoded :class:`~memento.schemas.Transition` records (``--state-dim`` vectors,
   states that look like click histories, popular items, the priors serving names) go through
   :meth:`learner.service.LearnerService.handle`, the code the learner runs on every Kafka poll,
   in polls of ``--poll-size`` records: decode and check each record, retrieve the top-K
   candidate cases of s and s′ from an in-memory :class:`memory_store.CaseBank` of ``--cases``
   cases (one batched search per poll, as in production), add the rows to the replay buffer
   (:class:`learner.loop.TrainingLoop`: duplicates, drift detector, priors' rewards, metrics).
   No Kafka broker is involved: the records are built in memory, so the figure is our code's,
   not the broker's or the network's. ``ingest.transitions_per_s``.
2. **updates**: the training loop's step (:meth:`learner.loop.TrainingLoop.step` with the
   service's update, i.e. :meth:`learner.trainer.SoftQLearner.update` plus its metrics): sample
   a batch from that buffer, one soft-Q update, reprioritise. The bench grants the loop the
   update credit it spends; publication is left out (a no-op). ``updates_per_s``,
   ``updates_samples_per_s`` (updates/s × batch size) and ``update_ms`` (mean per update).
3. **baseline**: a bare torch loop over the same :class:`~memento.qnet.QNetwork`
   (``SoftQConfig().network()``, same seed, so the same initial weights) on batches drawn from
   the same buffer and materialised as tensors before timing: the same TD target under
   ``no_grad`` (target-network copy, :func:`memento.softq.retrieval_prior` and
   :func:`memento.softq.td_target` with the learner's α, γ and prior), MSE loss, Adam step
   (same learning rate, ``foreach``), Polyak update of the target network. No sampling, no
   gradient clipping, no finite-value guard, no entropy, no metrics: what the learner spends on
   those is what ``ratio_vs_baseline`` (ours / baseline, target >= 0.8) shows.

The two update loops run in alternating rounds (``--rounds``), after ``--warmup`` untimed
updates each, so that other load on a shared machine slows both alike. Torch runs on
``--threads`` threads (default 1, as the learner process sets it).

``--device cuda`` (a GPU must be present): :class:`~learner.trainer.SoftQLearner` has no device
option (its tensors are built on the CPU and its TD errors returned as numpy), so ours stays on
the CPU and ``baseline`` with it (the ratio compares like with like); the bare loop is run a
second time on the GPU, under ``torch.device("cuda")`` so that the kernel's tensor factories
(item hashing, the retrieval prior) build there too, and reported as ``baseline_cuda``.

A bench that cannot read back what it must check has measured nothing: when not every record
it produced lands in the replay buffer (dead-lettered, dropped), when the buffer's rows are not
the transitions it sent, or when an update is skipped as non-finite, :func:`run` raises
:class:`BenchError` (the command exits non-zero).

Figures go to ``--json``: rates in keys ending ``_per_s``, times in keys ending ``_ms`` (or
``_s``), ours at the top level, the ingest under ``ingest``, the bare loop under ``baseline``,
with ``host`` (CPUs, torch version and threads, load average) and every option under
``options``.

>>> import argparse
>>> parser = argparse.ArgumentParser(); add_arguments(parser)
>>> figures = run(parser.parse_args(["--cases", "300", "--transitions", "120", "--state-dim", "4",
...                                  "--top-k", "4", "--batch-size", "8", "--updates", "4",
...                                  "--warmup", "1", "--rounds", "2", "--quiet"]))
>>> figures["ingest"]["transitions"], figures["batch_size"], figures["updates"]
(120, 8, 4)
>>> all(figures[k] > 0 for k in ("updates_samples_per_s", "ratio_vs_baseline"))
True
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from learner.service import LearnerService, LearnerServiceConfig
from learner.storage import ReplayBatch
from learner.trainer import SoftQConfig
from memento.config import Settings
from memento.encoder import ItemEncoder
from memento.qnet import QNetwork
from memento.schemas import Transition, encode
from memento.softq import retrieval_prior, td_target
from memento.threads import limit_threads
from memory_store import CaseBank

__all__ = ["add_arguments", "run", "main", "BenchError", "BareLoop", "transition_records"]

HISTORY_DECAY = 0.85     # StateEncoder's default: a state is a decayed sum of recent items
# the batch fields the bare loop reads (the candidates of s are only read with importance weights)
BASELINE_FIELDS = ("state", "case_features", "reward", "done", "next_state", "next_candidate_features",
                   "next_candidate_mask")


class BenchError(RuntimeError):
    """The bench could not read back what it must check: its figures would mean nothing."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transitions", type=int, default=4000,
                        help="transition records put through the learner's ingest path")
    parser.add_argument("--cases", type=int, default=20_000, help="cases in the learner's bank replica")
    parser.add_argument("--items", type=int, default=5000, help="catalogue size (power-law popularity)")
    parser.add_argument("--state-dim", type=int, default=32, help="state and item dimension (item_dim)")
    parser.add_argument("--top-k", type=int, default=SoftQConfig().top_k,
                        help="candidate cases per state (K)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"transitions per update (default: SoftQConfig's, {SoftQConfig().batch_size})")
    parser.add_argument("--poll-size", type=int, default=LearnerServiceConfig().max_poll_records,
                        help="records per handled poll (the learner's max_poll_records)")
    parser.add_argument("--updates", type=int, default=600, help="timed updates of each loop (ours, baseline)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed updates of each loop before timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of the two loops")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: what the learner process uses)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: also run the bare loop on the GPU (the learner itself has no device option)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no table")


OPTIONS = ("transitions", "cases", "items", "state_dim", "top_k", "batch_size", "poll_size", "updates",
           "warmup", "rounds", "threads", "device", "seed")


# -- workload ---------------------------------------------------------------------------------
def _popular(rng: np.random.Generator, items: int, shape) -> np.ndarray:
    weights = 1.0 / (np.arange(items) + 10.0)
    return rng.choice(items, size=shape, p=weights / weights.sum())


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _states(rng: np.random.Generator, item_vecs: np.ndarray, n: int) -> np.ndarray:
    """``n`` unit states, each the decayed sum of a history of 1–5 popular items."""
    history = _popular(rng, len(item_vecs), (n, 5))
    keep = np.arange(5)[None, :] < rng.integers(1, 6, size=n)[:, None]
    weights = keep * HISTORY_DECAY ** np.arange(5, dtype=np.float32)
    return _unit(np.einsum("nh,nhd->nd", weights, item_vecs[history]))


def build_bank(n: int, item_vecs: np.ndarray, seed: int) -> tuple[CaseBank, np.ndarray]:
    """An in-memory case bank of ``n`` cases (as the learner's replica holds them) and their
    feature rows ``[n, 2D+1]`` (for the transitions' chosen cases)."""
    rng = np.random.default_rng(seed)
    dim = item_vecs.shape[1]
    bank = CaseBank(None, dim=dim)
    states = _states(rng, item_vecs, n)
    which = _popular(rng, len(item_vecs), n)
    outcomes = rng.choice([0.0, 0.0, 0.0, 1.0, 2.0, 4.0], size=n)
    for start in range(0, n, 10_000):
        end = min(n, start + 10_000)
        bank.add_arrays([f"bench-{i}" for i in range(start, end)], states[start:end],
                        [f"item{i}" for i in which[start:end]], item_vecs[which[start:end]],
                        outcomes[start:end], np.arange(start, end, dtype=np.float64))
    features = np.concatenate([states, item_vecs[which], outcomes[:, None].astype(np.float32)], axis=1)
    return bank, features


def transition_records(n: int, item_vecs: np.ndarray, case_features: np.ndarray, priors: list[str],
                       seed: int) -> list[bytes]:
    """``n`` encoded transitions as the stream worker writes them: s a click history's state, s′
    the state after one more click, a chosen case of the bank, a logged propensity, a reward
    (mostly 0), the prior the recommendation was drawn under, an episode end now and then."""
    rng = np.random.default_rng(seed + 1)
    states = _states(rng, item_vecs, n)
    clicked = item_vecs[_popular(rng, len(item_vecs), n)]
    next_states = _unit(HISTORY_DECAY * states + clicked)
    chosen = rng.integers(0, len(case_features), size=n)
    rewards = rng.choice([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 4.0], size=n)
    propensities = rng.uniform(0.005, 0.2, size=n)
    done = rng.random(n) < 0.05
    out = []
    for i in range(n):
        cf = case_features[chosen[i]]
        out.append(encode(Transition(
            transition_id=f"req-{seed}-{i:08d}", user_id=f"u{i % 1000}", state=states[i].tolist(),
            case_id=f"bench-{chosen[i]}", case_features=cf.tolist(), item_id="item0",
            propensity=float(propensities[i]), reward=float(rewards[i]), next_state=next_states[i].tolist(),
            done=bool(done[i]), policy_version=1, ts=1000.0 + i, closed_at=1600.0 + i,
            prior=priors[i % len(priors)])))
    return out


class _DeadLetters:
    """Stands in for the learner's dead-letter producer: counts, keeps the first reason."""

    def __init__(self):
        self.count, self.first = 0, None

    def send(self, topic, partition, offset, reason, value) -> None:
        self.count += 1
        self.first = self.first or reason


# -- the bare loop ----------------------------------------------------------------------------
def _device_context(device: str):
    """Tensor factories build on ``device`` (the kernel's item hashing and prior use them)."""
    return contextlib.nullcontext() if device == "cpu" else torch.device(device)


class BareLoop:
    """The same network, TD target, MSE loss and Adam step as the learner, nothing else.

    Parameters
    ----------
    state_dim, config
        The network (``config.network()``, seeded with ``config.seed``) and γ, τ, lr.
    alpha, similarity, vote
        The temperature and the retrieval prior of the TD target's soft value.
    batches
        Sampled replay batches, turned into tensors on ``device`` once, here.
    """

    def __init__(self, state_dim: int, config: SoftQConfig, *, alpha: float, similarity: float, vote: float,
                 batches: list[ReplayBatch], device: str = "cpu"):
        self.config, self.alpha, self.similarity, self.vote, self.device = config, alpha, similarity, vote, device
        with _device_context(device):
            torch.manual_seed(config.seed)
            self.net = QNetwork(state_dim, **config.network()).to(device)
            self.target = copy.deepcopy(self.net).requires_grad_(False)
            self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, foreach=True)
            self.batches = [{name: torch.as_tensor(np.asarray(getattr(b, name))).to(device)
                             for name in BASELINE_FIELDS} for b in batches]
        self.steps = 0

    @torch.no_grad()
    def td_target(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """y = r + γ(1 − done)·α·logsumexp(Q_target(s′, ·)/α + prior) over s′'s candidates."""
        next_q = self.target(t["next_state"], t["next_candidate_features"])
        mask = t["next_candidate_mask"]
        prior = retrieval_prior(t["next_state"], t["next_candidate_features"], self.similarity, self.vote, mask)
        return td_target(t["reward"], t["done"], next_q, gamma=self.config.gamma, alpha=self.alpha,
                         next_mask=mask, next_prior=prior)

    def step(self) -> None:
        t = self.batches[self.steps % len(self.batches)]
        y = self.td_target(t)
        q = self.net(t["state"], t["case_features"].unsqueeze(1)).squeeze(1)
        loss = F.mse_loss(q, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for p_target, p in zip(self.target.parameters(), self.net.parameters()):
                p_target.lerp_(p, self.config.tau)
        self.steps += 1

    def run(self, n: int) -> float:
        """``n`` steps; their wall seconds."""
        with _device_context(self.device):
            self._sync()
            started = time.perf_counter()
            for _ in range(n):
                self.step()
            self._sync()
            return time.perf_counter() - started

    def _sync(self) -> None:
        if self.device != "cpu":
            torch.cuda.synchronize()


# -- measurements -----------------------------------------------------------------------------
def _ingest(service: LearnerService, records: list[bytes], poll_size: int, quiet: bool) -> dict:
    """Put ``records`` through :meth:`LearnerService.handle` in polls; the figures."""
    topic = service.settings.topics.transitions
    polls = [[SimpleNamespace(topic=topic, partition=0, offset=start + j, value=value)
              for j, value in enumerate(records[start:start + poll_size])]
             for start in range(0, len(records), poll_size)]
    seconds, added = 0.0, 0
    with tqdm(total=len(records), desc="ingest", unit="transition", disable=quiet, file=sys.stderr) as bar:
        for poll in polls:
            started = time.perf_counter()
            added += service.handle(poll)
            seconds += time.perf_counter() - started
            bar.update(len(poll))
    return {"transitions": added, "records": len(records), "polls": len(polls), "poll_size": poll_size,
            "transitions_per_s": added / seconds if seconds > 0 else math.nan,
            "poll_ms": seconds * 1e3 / max(len(polls), 1), "elapsed_s": seconds,
            "dead_letters": service.dead_letters, "duplicates": service.duplicates,
            "buffer_rows": len(service.buffer)}


def _check_ingest(service: LearnerService, ingest: dict, sent_ids: list[str], dead: _DeadLetters) -> None:
    if ingest["transitions"] != ingest["records"]:
        raise BenchError(
            f"{ingest['transitions']} of the {ingest['records']} transitions sent reached the replay buffer "
            f"({dead.count} dead-lettered{', first: ' + dead.first if dead.first else ''}; "
            f"{ingest['duplicates']} duplicates): the ingest path is broken, nothing was measured")
    stored = service.buffer.storage.transition_ids()
    expected = sent_ids[-len(stored):] if stored else []
    if len(stored) != min(len(sent_ids), service.buffer.storage.capacity) or sorted(stored) != sorted(expected):
        raise BenchError(f"the replay buffer holds {len(stored)} rows that are not the last "
                         f"{len(expected)} transitions sent")


def _no_publish() -> None:
    return None


def _rate_figures(seconds: float, updates: int, batch_size: int, rounds: list[float], device: str) -> dict:
    return {"device": device, "updates_per_s": updates / seconds,
            "updates_samples_per_s": updates * batch_size / seconds,
            "update_ms": seconds * 1e3 / updates, "round_update_ms": rounds}


def _host(threads: int, device: str) -> dict:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": threads, "device": device,
            "cuda_device": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "python": platform.python_version(), "machine": platform.machine(),
            "loadavg_start": list(os.getloadavg())}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(args: argparse.Namespace) -> dict:
    """Run the bench; returns (and writes to ``--json``) the figures. :class:`BenchError` when
    it could not check what it measured."""
    config = SoftQConfig(top_k=args.top_k, **({} if args.batch_size is None else {"batch_size": args.batch_size}))
    batch_size = config.batch_size
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch "
                         f"build: {torch.__version__})")
    if args.updates < args.rounds or args.rounds < 1 or args.transitions < 1:
        raise BenchError("need --transitions >= 1, --rounds >= 1 and --updates >= --rounds")
    quiet = args.quiet
    figures: dict = {"bench": "learner", "options": {k: getattr(args, k) for k in OPTIONS}}
    figures["options"]["batch_size"] = batch_size
    with tempfile.TemporaryDirectory(prefix="memento-bench-learner-") as work:
        setup = time.perf_counter()
        settings = Settings(item_dim=args.state_dim, top_k=args.top_k, data_dir=str(Path(work, "data")),
                            checkpoint_dir=str(Path(work, "checkpoints")))
        service = LearnerService(settings, config)   # 1 thread, as the learner process
        limit_threads(args.threads)
        figures["host"] = _host(torch.get_num_threads(), args.device)
        dead = _DeadLetters()
        service.dead_letter = dead
        item_vecs = ItemEncoder(args.state_dim).encode_many([f"item{i}" for i in range(args.items)])
        service.bank, case_features = build_bank(args.cases, item_vecs, args.seed)
        try:
            priors = [p.key for p in config.priors()]
            records = transition_records(args.transitions, item_vecs, case_features, priors, args.seed)
            sent_ids = [f"req-{args.seed}-{i:08d}" for i in range(args.transitions)]
            figures["setup_s"] = time.perf_counter() - setup

            # 1. ingest
            figures["ingest"] = ingest = _ingest(service, records, args.poll_size, quiet)
            figures["ingest"]["bank_cases"] = len(service.bank)
            _check_ingest(service, ingest, sent_ids, dead)
            if not quiet:
                print(f"ingest: {ingest['transitions_per_s']:.0f} transitions/s "
                      f"({ingest['transitions']} in polls of {args.poll_size})", file=sys.stderr, flush=True)

            # 2. and 3.: the training loop against the bare loop, alternating rounds
            loop, learner = service.loop, service.learner

            def bare_loop(device: str) -> BareLoop:
                return BareLoop(args.state_dim, config, alpha=learner.alpha, similarity=learner.td_prior.similarity,
                                vote=learner.td_prior.vote, device=device,
                                batches=[service.buffer.sample(batch_size) for _ in range(8)])

            baseline = bare_loop("cpu")

            def ours(n: int) -> float:
                loop.credit = float(n)      # the credit the bench grants: exactly n updates
                skipped = loop.skipped
                started = time.perf_counter()
                done = loop.step(service._update, _no_publish, batch_size=batch_size, max_updates=n)
                seconds = time.perf_counter() - started
                if done != n or loop.skipped != skipped:
                    raise BenchError(f"the training loop ran {done} of {n} updates, {loop.skipped - skipped} "
                                     "skipped as non-finite: nothing was measured")
                return seconds

            ours(args.warmup)
            baseline.run(args.warmup)
            ours_rounds, base_rounds = [], []
            with tqdm(total=2 * args.updates, desc="updates (ours, baseline)", unit="update", disable=quiet,
                      file=sys.stderr) as bar:
                for n in _split(args.updates, args.rounds):
                    ours_rounds.append((ours(n), n))
                    bar.update(n)
                    base_rounds.append((baseline.run(n), n))
                    bar.update(n)
            ours_s = sum(s for s, _ in ours_rounds)
            base_s = sum(s for s, _ in base_rounds)
            figures.update({"batch_size": batch_size, "updates": args.updates})
            figures.update(_rate_figures(ours_s, args.updates, batch_size,
                                         [s * 1e3 / n for s, n in ours_rounds], "cpu"))
            figures["skipped_updates"] = learner.skipped_updates
            figures["baseline"] = _rate_figures(base_s, args.updates, batch_size,
                                                [s * 1e3 / n for s, n in base_rounds], "cpu")
            figures["ratio_vs_baseline"] = (figures["updates_samples_per_s"]
                                            / figures["baseline"]["updates_samples_per_s"])

            if args.device != "cpu":
                gpu = bare_loop(args.device)
                gpu.run(args.warmup)
                seconds = gpu.run(args.updates)
                figures[f"baseline_{args.device}"] = _rate_figures(seconds, args.updates, batch_size, [], args.device)
                figures["notes"] = [f"SoftQLearner has no device option: ours and `baseline` ran on the CPU, "
                                    f"the bare loop also on {args.device} (`baseline_{args.device}`)"]
        finally:
            service.bank.close()
    figures["host"]["loadavg_end"] = list(os.getloadavg())
    _check_figures(figures)
    if not quiet:
        print(table(figures), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def _check_figures(figures: dict) -> None:
    values = [figures["ingest"]["transitions_per_s"], figures["updates_samples_per_s"], figures["update_ms"],
              figures["baseline"]["updates_samples_per_s"], figures["baseline"]["update_ms"]]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise BenchError(f"non-finite or non-positive figures: {values}")


def table(figures: dict) -> str:
    """The figures as a small table (what the command prints)."""
    o, h = figures["options"], figures["host"]
    rows = [f"memento bench learner: state_dim {o['state_dim']}, K {o['top_k']}, batch {figures['batch_size']}, "
            f"{h['cpus']} CPUs, torch {h['torch']} on {h['torch_threads']} thread(s)",
            f"{'':24}{'per s':>14}{'samples/s':>14}{'ms each':>10}",
            f"{'ingest (transitions)':24}{figures['ingest']['transitions_per_s']:14.0f}{'':14}"
            f"{figures['ingest']['poll_ms'] / o['poll_size']:10.3f}"]
    loops = [("updates (ours)", figures), ("baseline (bare torch)", figures["baseline"])]
    loops += [(f"baseline on {v['device']}", v) for k, v in figures.items() if k.startswith("baseline_")]
    for name, f in loops:
        rows.append(f"{name:24}{f['updates_per_s']:14.1f}{f['updates_samples_per_s']:14.0f}{f['update_ms']:10.2f}")
    rows.append(f"ours / baseline: {figures['ratio_vs_baseline']:.2f} (target >= 0.8)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memento bench learner", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except BenchError as exc:
        print(f"memento bench learner: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
