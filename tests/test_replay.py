"""The replay driver's pure parts: moment generation, reward attribution (simulated and from the
Tmall log), the request loop with an in-process recommender, and the per-window summary. The
end-to-end run against serving and Kafka is the integration test's job."""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest

from memento.config import RewardWeights, Settings
from evaluation.replay import (ReplayConfig, ReplayLoop, RequestRecord, RewardTracker, SyntheticSource, TmallSource,
                               add_arguments, config_from_args, run_from_args, summarise, summarise_windows)
from evaluation.simulator import WorldConfig
from memento.schemas import Action
from serving.client import ServingClient, ServingNotReady

SMALL = WorldConfig(n_items=60, n_users=12)


def act(user, item, action, ts, event_id=None):
    return Action(event_id=event_id or f"{user}-{item}-{action}-{ts}", user_id=user, item_id=item,
                  action=action, ts=float(ts))


# -- reward attribution ------------------------------------------------------------------------
def test_tracker_takes_largest_weight_inside_window_only():
    t = RewardTracker(RewardWeights(), window_s=60)
    t.open("r1", "u", "7", ts=100.0)
    t.open("r2", "u", "8", ts=100.0)
    t.open("r3", "v", "7", ts=100.0)
    t.observe(act("u", "7", "click", 100))      # at the window start: counts
    t.observe(act("u", "7", "purchase", 161))   # after the end: does not
    t.observe(act("u", "7", "cart", 160))       # at the end: counts
    t.observe(act("u", "9", "purchase", 120))   # other item
    t.observe(act("w", "7", "purchase", 120))   # other user
    assert t.close_due(now=160.0) == []          # window still open at its end
    assert sorted(t.close_due(now=160.5)) == [("r1", 3.0), ("r2", 0.0), ("r3", 0.0)]
    assert len(t) == 0


def test_tracker_ignores_actions_seen_before_the_recommendation():
    t = RewardTracker(RewardWeights(), window_s=60)
    t.observe(act("u", "7", "cart", 100))
    t.open("r1", "u", "7", ts=100.0)
    assert t.close_all() == [("r1", 0.0)]
    t.open("r2", "u", "7", 0.0)
    with pytest.raises(ValueError, match="already open"):
        t.open("r2", "u", "7", 0.0)


# -- synthetic moments ------------------------------------------------------------------------
def test_synthetic_moments_are_ordered_and_deterministic():
    cfg = ReplayConfig(world=SMALL, seed=5, warmup_moments=2, moment_step_s=30)

    def play(source):
        out = list(source.warmup())
        for m in source.moments(40):
            out.extend(m.before)
            out.append(("request", m.user_id, m.ts))
            out.extend(source.respond(m, source.world.item_ids[m.index % 60], f"r{m.index}").actions)
        return out

    a, b = play(SyntheticSource(cfg)), play(SyntheticSource(cfg))
    assert a == b
    assert play(SyntheticSource(ReplayConfig(world=SMALL, seed=6))) != a
    times = [e[2] if isinstance(e, tuple) else e.ts for e in a]
    assert times == sorted(times)
    warm = list(SyntheticSource(cfg).warmup())
    assert {x.user_id for x in warm} == set(SyntheticSource(cfg).world.user_ids)
    assert all(w.ts < cfg.start_ts + 2 * 12 * 30 for w in warm)
    ids = [e.event_id for e in a if isinstance(e, Action)]
    assert len(ids) == len(set(ids))


def test_synthetic_response_is_tagged_and_inside_window():
    cfg = ReplayConfig(world=SMALL, seed=1)
    source = SyntheticSource(cfg)
    for m in source.moments(50):
        out = source.respond(m, source.world.oracle_item(m.user_id), f"r{m.index}")
        assert out.expected_reward == pytest.approx(out.oracle_reward)
        for a in out.actions:
            assert a.request_id == f"r{m.index}" and m.ts < a.ts <= m.ts + cfg.window_s
            assert a.user_id == m.user_id
        assert all(b.ts < m.ts for b in m.before)
    failed = source.respond(next(source.moments(1)), None, None)
    assert failed.actions == [] and failed.expected_reward is None


# -- the loop, with an in-process recommender -----------------------------------------------------
def _loop(cfg, source, choose, status=200):
    ids = itertools.count()
    published: list[Action] = []

    def recommend(user, ts, context):
        if status != 200:
            return status, {"error": "no policy yet"}, 0.001
        return 200, {"item_id": choose(user), "request_id": f"r{next(ids)}", "policy_version": 3}, 0.001

    return ReplayLoop(cfg, source, recommend, published.append), published


def test_realised_reward_tracks_expected_reward_and_oracle_beats_random():
    # A window shorter than a moment: only the response itself can earn the reward.
    cfg = ReplayConfig(world=SMALL, seed=2, summary_window=200, reward_window_s=30)
    means = {}
    for policy in ("oracle", "random"):
        source = SyntheticSource(cfg)
        rng = np.random.default_rng(0)
        choose = (source.world.oracle_item if policy == "oracle"
                  else lambda user: source.world.item_ids[int(rng.integers(60))])
        loop, published = _loop(cfg, source, choose)
        loop.warmup()
        for m in source.moments(1000):
            loop.step(m)
        loop.close()
        s = loop.summary(1.0)
        assert s.requests == 1000 and s.failed == 0 and len(s.windows) == 5
        assert s.actions_published == len(published)
        # Realised reward is an unbiased draw of the expected reward: agree within noise.
        assert s.mean_reward == pytest.approx(s.mean_expected_reward, abs=0.15)
        means[policy] = s
    assert means["oracle"].mean_reward > 3 * means["random"].mean_reward
    assert means["oracle"].mean_expected_reward == pytest.approx(means["oracle"].mean_oracle_reward)


def test_organic_actions_inside_the_window_count_like_in_the_worker():
    # Few users come back within a long window: organic actions on the item add to the reward.
    long = ReplayConfig(world=SMALL, seed=2, reward_window_s=3000)
    source = SyntheticSource(long)
    loop, _ = _loop(long, source, source.world.oracle_item)
    for m in source.moments(300):
        loop.step(m)
    loop.close()
    s = loop.summary(1.0)
    assert s.mean_reward > s.mean_expected_reward + 0.3


def test_tmall_reward_comes_from_later_log_actions():
    log = [act("1", "5", "click", 0), act("1", "5", "cart", 100), act("2", "5", "purchase", 150),
           act("1", "7", "click", 1000), act("1", "5", "purchase", 1001)]
    cfg = ReplayConfig(source="tmall", log_path="unused.csv", warmup_events=0, reward_window_s=600)
    source = TmallSource(cfg, actions=log)
    loop, published = _loop(cfg, source, lambda user: "5")
    for m in source.moments(0):
        loop.step(m)
    loop.close()
    rewards = [loop.records[i].reward for i in range(5)]
    # Rec at 0 for user 1: own click at 0 and cart at 100 → 3; user 2's purchase does not count.
    # Rec at 100: cart at 100 → 3. Rec for user 2 at 150: purchase at 150 → 5.
    # Rec at 1000: only the purchase at 1001 (the click at 1000 is on item 7) → 5. Rec at 1001 → 5.
    assert rewards == [3.0, 3.0, 5.0, 5.0, 5.0]
    assert published == log  # every logged action is published, in time order


def test_tmall_failed_requests_still_publish_the_log(tmp_path):
    log = [act("1", "5", "click", k) for k in range(10)]
    cfg = ReplayConfig(source="tmall", log_path="unused.csv", warmup_events=4,
                       response_log=str(tmp_path / "r.jsonl"))
    source = TmallSource(cfg, actions=log)
    with open(cfg.response_log, "w") as fh:
        published = []
        loop = ReplayLoop(cfg, source, lambda u, ts, c: (503, {"error": "empty case bank"}, 0.01),
                          published.append, response_log=fh)
        assert loop.warmup() == 4
        for m in source.moments(0):
            loop.step(m)
        loop.close()
    s = loop.summary(0.5)
    assert published == log and s.requests == 6 and s.failed == 6 and s.mean_reward == 0.0
    lines = [json.loads(line) for line in open(cfg.response_log)]
    assert len(lines) == 6 and all(line["status"] == 503 and line["error"] == "empty case bank" for line in lines)


def test_response_log_has_one_line_per_request(tmp_path):
    cfg = ReplayConfig(world=SMALL, seed=3)
    source = SyntheticSource(cfg)
    path = tmp_path / "responses.jsonl"
    with path.open("w") as fh:
        ids = itertools.count()
        loop = ReplayLoop(cfg, source, lambda u, ts, c: (200, {"item_id": "1", "request_id": f"r{next(ids)}",
                                                               "policy_version": 1}, 0.002),
                          lambda a: None, response_log=fh)
        for m in source.moments(30):
            loop.step(m)
        loop.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["seq"] for line in lines) == list(range(30))
    assert all(line["reward"] is not None and line["oracle_reward"] >= line["expected_reward"] for line in lines)


def test_repeated_request_id_counts_as_failure():
    cfg = ReplayConfig(world=SMALL, seed=3)
    source = SyntheticSource(cfg)
    loop = ReplayLoop(cfg, source, lambda u, ts, c: (200, {"item_id": "1", "request_id": "same"}, 0.0),
                      lambda a: None)
    for m in source.moments(3):
        loop.step(m)
    loop.close()
    assert [loop.records[i].ok for i in range(3)] == [True, False, False]


# -- summaries ----------------------------------------------------------------------------------
def _rec(seq, reward, version, status=200):
    return RequestRecord(seq=seq, user_id="u", ts=float(seq), wall_time=0.0, status=status, latency_s=0.0,
                         request_id=f"r{seq}" if status == 200 else None, item_id="1",
                         policy_version=version if status == 200 else None, reward=reward)


def test_window_summary_uses_majority_version_and_counts_failures():
    records = [_rec(i, 1.0, 1) for i in range(4)] + [_rec(4, 0.0, 2), _rec(5, None, None, status=503)]
    records += [_rec(6, 3.0, 2), _rec(7, 5.0, 2), _rec(8, 0.0, 3)]
    windows = summarise_windows(list(reversed(records)), size=3)
    assert [(w.requests, w.failed, w.policy_version) for w in windows] == [(3, 0, 1), (3, 1, 1), (3, 0, 2)]
    assert [w.mean_reward for w in windows] == [1.0, 0.5, pytest.approx(8 / 3)]
    s = summarise("tmall", records, 3, actions_published=9, warmup_actions=0, wall_s=1.0)
    assert (s.requests, s.succeeded, s.failed) == (9, 8, 1)
    assert s.first_fifth_reward == 1.0 and s.last_fifth_reward == 0.0 and s.policy_versions == [1, 2, 3]
    assert "window" in s.table() and "1 failed" in s.table()
    with pytest.raises(ValueError, match="window size"):
        summarise_windows(records, 0)


# -- configuration and CLI ------------------------------------------------------------------------
def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="log_path is required"):
        ReplayConfig(source="tmall")
    with pytest.raises(ValueError, match="source must be one of"):
        ReplayConfig(source="movielens")
    with pytest.raises(ValueError, match="serving_url"):
        ReplayConfig(serving_url="localhost:8080")
    with pytest.raises(ValueError, match="outside the reward window"):
        ReplayConfig(reward_window_s=4, response_delay_s=2)
    assert ReplayConfig(settings=Settings(window_s=42)).window_s == 42
    custom = ReplayConfig(world=SMALL, settings=Settings(rewards=RewardWeights(click=0, collect=0, cart=0)))
    world = SyntheticSource(custom).world
    p = world.action_probabilities(world.user_ids[0])
    np.testing.assert_allclose(world.expected_rewards(world.user_ids[0]), 5 * p["click"] * p["cart"] * p["purchase"])
    with pytest.raises(ValueError, match="http://host:port"):
        ServingClient("ftp://x")


def test_cli_arguments_and_file_writing(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--source", "tmall", "--events", "10"])
    assert run_from_args(args) == 2 and "log_path is required" in capsys.readouterr().err
    args = parser.parse_args(["--events", "50", "--seed", "4", "--rate", "20",
                              "--write-products", str(tmp_path / "p.csv"), "--write-log", str(tmp_path / "l.csv")])
    cfg = config_from_args(args)
    assert (cfg.events, cfg.seed, cfg.rate, cfg.source) == (50, 4, 20.0, "synthetic")
    assert run_from_args(args) == 0
    assert (tmp_path / "p.csv").exists() and len((tmp_path / "l.csv").read_text().splitlines()) == 51


def test_serving_client_reports_unreachable_serving():
    from harness.broker import free_port

    client = ServingClient(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    status, body, _ = client.recommend("u", 0.0, retry_503_s=0.2)
    assert status == 0 and "error" in body
    with pytest.raises(ServingNotReady, match="unreachable"):
        client.wait_ready(0.3, poll_s=0.1)


# -- the wiring: real broker, stand-in serving -------------------------------------------------
class _StandInServing:
    """Answers the serving contract's /readyz and /v1/recommend: 503 until ``ready_after``
    readiness polls, then a fixed item; one request answers 503 once to exercise the retry."""

    def __init__(self, item_id: str, ready_after: int = 3):
        import http.server
        import threading

        outer = self
        self.item_id, self.ready_after = item_id, ready_after
        self.polls = self.recommends = 0
        self.connections: set[int] = set()
        self.bodies: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args):
                pass

            def _send(self, status, body):
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                outer.polls += 1
                ready = outer.polls > outer.ready_after
                self._send(200 if ready else 503, {"ready": ready, "policy_version": 1 if ready else None,
                                                    "cases": 5 if ready else 0})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.connections.add(self.client_address[1])
                outer.recommends += 1
                if outer.recommends == 2:
                    return self._send(503, {"error": "reloading"})
                outer.bodies.append(body)
                self._send(200, {"request_id": f"req-{outer.recommends}", "user_id": body["user_id"],
                                 "item_id": outer.item_id, "items": [outer.item_id], "case_id": "c",
                                 "propensity": 0.5, "policy_version": 1, "ts": body["ts"]})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["noida", "tansu"])
def test_run_replay_publishes_to_the_actions_topic(engine, tmp_path):
    from harness.broker import EmbeddedBroker
    from memento.kafka_io import make_consumer
    from evaluation.replay import run_replay
    from memento.schemas import decode

    serving = _StandInServing("3")
    with EmbeddedBroker(engine, 0, str(tmp_path / "broker")) as broker, serving as url:
        settings = broker.settings()
        cfg = ReplayConfig(world=SMALL, seed=1, events=40, serving_url=url, settings=settings,
                           response_log=str(tmp_path / "responses.jsonl"), ready_timeout_s=20)
        summary = run_replay(cfg, progress=False)
        assert (summary.requests, summary.failed) == (40, 0)
        consumer = make_consumer(settings, [settings.topics.actions], group_id=None,
                                 consumer_timeout_ms=3000)
        try:
            received = [(m.key.decode(), decode(Action, m.value)) for m in consumer]
        finally:
            consumer.close()
    assert len(received) == summary.actions_published > summary.warmup_actions > 0
    assert all(key == a.user_id for key, a in received)
    tagged = [a for _, a in received if a.request_id]
    assert tagged and all(a.item_id == "3" for a in tagged)
    assert len(open(cfg.response_log).read().splitlines()) == 40
    assert serving.polls > serving.ready_after          # waited through the 503s of /readyz
    assert serving.recommends == 41                     # the one 503 was retried
    assert len(serving.connections) == 1                # one kept-alive connection
    assert [b["ts"] for b in serving.bodies] == sorted(b["ts"] for b in serving.bodies)
