"""Case bank: fan-out exactness, recall, online index switch, eviction, durability, concurrency."""

from __future__ import annotations

import logging
import threading
import time

import faiss
import numpy as np
import pytest
from prometheus_client import generate_latest

from memento.encoder import case_feature_vector
from memento.schemas import Case
from memory_store import CaseBank, shard_of

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_cases(states: np.ndarray, start: int = 0, prefix: str = "c") -> list[Case]:
    return [Case(case_id=f"{prefix}{start + i}", state=s.tolist(), item_id=f"item{(start + i) % 97}",
                 item_vec=(-s).tolist(), outcome=float((start + i) % 5), ts=1000.0 + start + i)
            for i, s in enumerate(states)]


def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 50, spread: float = 0.35):
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return unit(points)


def test_fan_out_top_k_equals_one_flat_index():
    rng = np.random.default_rng(1)
    states = unit(rng.standard_normal((3000, DIM)))
    bank = CaseBank(None, DIM, num_shards=4, approx_index="flat")
    assert bank.add(make_cases(states)) == 3000
    assert sorted(len(s) for s in bank.shards)[0] > 500  # every shard got a share
    flat = faiss.IndexFlatIP(DIM)
    flat.add(states)
    queries = unit(rng.standard_normal((50, DIM)))
    want_scores, want_rows = flat.search(queries, 40)
    scores, ids = bank.search(queries, 40)
    assert scores.dtype == np.float32 and scores.shape == (50, 40)
    assert ids == [[f"c{r}" for r in row] for row in want_rows.tolist()]
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    bank.close()


def test_fewer_cases_than_k_pads_with_minus_inf_and_features_match_encoder():
    bank = CaseBank(None, DIM, num_shards=3)
    rng = np.random.default_rng(2)
    cases = make_cases(unit(rng.standard_normal((5, DIM))))
    bank.add(cases)
    query = np.asarray([cases[0].state], np.float32)
    ids, scores, features, mask = bank.search_with_features(query, 8)
    assert len(ids[0]) == 5 and ids[0][0] == "c0"
    assert mask.tolist() == [[True] * 5 + [False] * 3]
    assert np.isneginf(scores[0, 5:]).all()
    assert features.shape == (1, 8, 2 * DIM + 1) and not features[0, 5:].any()
    by_id = {c.case_id: c for c in cases}
    for slot, case_id in enumerate(ids[0]):
        c = by_id[case_id]
        np.testing.assert_array_equal(features[0, slot], case_feature_vector(c.state, c.item_vec, c.outcome))
    np.testing.assert_array_equal(bank.features(["c3"])[0], features[0, ids[0].index("c3")])
    assert bank.get("c2") == cases[2]
    assert bank.get("nope") is None and "c1" in bank and "nope" not in bank
    with pytest.raises(KeyError, match="'nope'"):
        bank.features(["c1", "nope"])
    bank.close()


def test_bad_input_is_named():
    bank = CaseBank(None, DIM)
    with pytest.raises(ValueError, match=r"shape \[B, 16\]"):
        bank.search(np.zeros((2, 3), np.float32), 4)
    with pytest.raises(ValueError, match="k must be"):
        bank.search(np.zeros((1, DIM), np.float32), 0)
    bad = Case("x", [0.0] * 3, "i", [0.0] * DIM, 1.0, 0.0)
    with pytest.raises(ValueError, match="'x' field 'state' has 3 values"):
        bank.add([bad])
    with pytest.raises(TypeError, match="unknown option 'shardz'"):
        CaseBank(None, DIM, shardz=2)
    bank.close()


def test_duplicate_ids_are_idempotent(tmp_path):
    rng = np.random.default_rng(3)
    cases = make_cases(unit(rng.standard_normal((20, DIM))))
    with CaseBank(tmp_path / "bank", DIM) as bank:
        assert bank.add(cases + cases[:5]) == 20
        assert bank.add(cases[10:]) == 0
        assert len(bank) == 20
    with CaseBank(tmp_path / "bank", DIM) as bank:
        assert len(bank) == 20 and bank.add(cases[:3]) == 0


def test_routing_is_stable_and_manifest_checked(tmp_path):
    # pinned values: a case is routed alike by every process and run (blake2b, not the salted hash())
    assert [shard_of(c, 4) for c in ("case-42", "a", "b", "act:e1")] == [2, 0, 0, 2]
    assert len({shard_of(f"c{i}", 4) for i in range(100)}) == 4
    CaseBank(tmp_path / "b", DIM, num_shards=2).close()
    with pytest.raises(ValueError, match="num_shards=2, opened with num_shards=3"):
        CaseBank(tmp_path / "b", DIM, num_shards=3)


@pytest.mark.parametrize("approx, options", [("ivf", {}), ("hnsw", {}), ("ivf-ood", {"nprobe": 16}),
                                             ("ivf", {"ivf_encoding": "fp16"})])
def test_approximate_index_recall_at_k_on_clustered_data(approx, options):
    """Queries come from the same mixture as the cases (serving searches with states like the
    stored ones), except for "ivf-ood": queries from other cluster centres, which a fixed nprobe
    must serve (the default nprobe is tuned on the stored cases, i.e. for in-distribution queries)."""
    rng = np.random.default_rng(4)
    if approx == "ivf-ood":
        states, queries = clustered(12000, DIM, rng), clustered(200, DIM, rng)
        approx = "ivf"
    else:
        both = clustered(12200, DIM, rng)
        states, queries = both[:12000], both[12000:]
    bank = CaseBank(None, DIM, num_shards=2, approx_index=approx, switch_threshold=2000,
                    background_build=False, **options)
    for start in range(0, len(states), 2000):
        bank.add(make_cases(states[start:start + 2000], start))
    assert bank.wait_for_index(60)
    assert {s["index_type"] for s in bank.stats()["shards"]} == {approx}
    flat = faiss.IndexFlatIP(DIM)
    flat.add(states)
    k = 32
    _, exact = flat.search(queries, k)
    _, ids = bank.search(queries, k)
    recall = np.mean([len({f"c{r}" for r in want} & set(got)) / k for want, got in zip(exact.tolist(), ids)])
    assert recall >= 0.95, f"{approx} recall@{k} = {recall:.3f}"
    bank.close()


def test_online_switch_does_not_block_searches_and_keeps_every_case():
    rng = np.random.default_rng(5)
    states = clustered(16000, DIM, rng)
    bank = CaseBank(None, DIM, num_shards=2, switch_threshold=3000, approx_index="ivf")
    bank.add(make_cases(states[:8000]))
    latencies = []
    deadline = time.monotonic() + 20
    # Keep adding while the background builders run, so their catch-up path is exercised.
    start = 8000
    while any(s["index_building"] for s in bank.stats()["shards"]) and time.monotonic() < deadline:
        t0 = time.perf_counter()
        bank.search(states[:1], 10)
        latencies.append(time.perf_counter() - t0)
        if start < len(states):
            bank.add(make_cases(states[start:start + 200], start))
            start += 200
    assert bank.wait_for_index(60)
    bank.add(make_cases(states[start:], start))
    assert {s["index_type"] for s in bank.stats()["shards"]} == {"ivf"}
    assert len(bank) == 16000
    # Every case, including those added during the build, is findable by its own state.
    sample = rng.choice(16000, 300, replace=False)
    _, ids = bank.search(states[sample], 1)
    found = np.mean([got[0] == f"c{i}" for i, got in zip(sample.tolist(), ids)])
    assert found >= 0.98
    assert latencies, "no search ran while the index was built"
    assert max(latencies) < 0.5, "a search waited for an index build"
    bank.close()


@pytest.mark.parametrize("policy", ["oldest", "utility"])
def test_eviction_keeps_the_bound(tmp_path, policy):
    rng = np.random.default_rng(6)
    cap = 50
    bank = CaseBank(tmp_path / "bank", DIM, num_shards=2, max_cases_per_shard=cap, eviction=policy)
    states = unit(rng.standard_normal((400, DIM)))
    for start in range(0, 400, 37):
        bank.add(make_cases(states[start:start + 37], start))
        assert all(len(s) <= cap for s in bank.shards)
    assert len(bank) == 2 * cap
    if policy == "oldest":
        # Survivors of each shard are its newest cases.
        for s in range(2):
            ids = [f"c{i}" for i in range(400) if shard_of(f"c{i}", 2) == s]
            assert all(i in bank for i in ids[-cap:]) and not any(i in bank for i in ids[:-cap])
    else:
        # outcome = index % 5: the survivors are high-outcome cases.
        kept = [int(c.case_id[1:]) % 5 for s in bank.shards for c in map(bank.get, list(s.slot_of))]
        assert np.mean(kept) > 3.0
    before = sorted(c for s in bank.shards for c in s.slot_of)
    assert bank.stats()["shards"][0]["evictions"] > 0
    bank.close()
    with CaseBank(tmp_path / "bank", DIM, num_shards=2, max_cases_per_shard=cap, eviction=policy) as again:
        assert sorted(c for s in again.shards for c in s.slot_of) == before


def test_utility_eviction_protects_frequently_retrieved_cases():
    bank = CaseBank(None, DIM, num_shards=1, max_cases_per_shard=10, eviction="utility",
                    utility_hit_weight=1.0)
    rng = np.random.default_rng(7)
    states = unit(rng.standard_normal((11, DIM)))
    cases = [Case(f"c{i}", s.tolist(), "i", s.tolist(), 0.0, float(i)) for i, s in enumerate(states)]
    bank.add(cases[:10])
    for _ in range(5):
        bank.search(states[:1], 1)  # c0 is the oldest but keeps being retrieved
    assert bank.hit_count("c0") == 5
    bank.add(cases[10:])
    assert "c0" in bank and "c1" not in bank and len(bank) == 10


def test_wal_replay_after_unclean_stop_and_snapshot(tmp_path):
    rng = np.random.default_rng(8)
    states = unit(rng.standard_normal((300, DIM)))
    bank = CaseBank(tmp_path / "bank", DIM, snapshot_on_close=False)
    bank.add(make_cases(states[:100]))
    bank.snapshot()
    bank.add(make_cases(states[100:], 100))
    assert bank.stats()["shards"][0]["wal_bytes"] > 0
    bank.close()  # no snapshot: the next open replays the log over the snapshot
    with CaseBank(tmp_path / "bank", DIM) as again:
        assert len(again) == 300
        assert again.get("c250") == make_cases(states[250:251], 250)[0]
        _, ids = again.search(states[[7, 250]], 1)
        assert ids == [["c7"], ["c250"]]


@pytest.mark.parametrize("damage", ["torn", "garbage"])
def test_corrupt_wal_tail_is_truncated_with_a_log_line(tmp_path, caplog, damage):
    rng = np.random.default_rng(9)
    states = unit(rng.standard_normal((60, DIM)))
    bank = CaseBank(tmp_path / "bank", DIM, num_shards=1, snapshot_on_close=False)
    bank.add(make_cases(states[:30]))
    bank.add(make_cases(states[30:], 30))
    bank.close()
    wal = tmp_path / "bank" / "shard-000" / "wal.log"
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        if damage == "torn":
            f.truncate(size - 17)  # the second record loses its last bytes
        else:
            f.seek(size - 40)
            f.write(b"\xff" * 10)  # bit rot inside the second record
    with caplog.at_level(logging.WARNING, logger="memory_store.wal"):
        again = CaseBank(tmp_path / "bank", DIM, num_shards=1)
    lines = [r.getMessage() for r in caplog.records if "corrupt tail" in r.getMessage()]
    assert len(lines) == 1 and "wal.log" in lines[0] and "truncating" in lines[0]
    assert len(again) == 30 and "c29" in again and "c30" not in again
    first_record_end = wal.stat().st_size
    assert first_record_end < size
    again.add(make_cases(states[30:], 30))  # the log continues cleanly after the truncation
    again.close()
    with CaseBank(tmp_path / "bank", DIM, num_shards=1) as third:
        assert len(third) == 60


def test_concurrent_search_during_appends(tmp_path):
    rng = np.random.default_rng(10)
    states = unit(rng.standard_normal((4000, DIM)))
    bank = CaseBank(tmp_path / "bank", DIM, num_shards=4, switch_threshold=400)
    errors: list[BaseException] = []
    stop = threading.Event()
    searches = [0]

    def searcher():
        try:
            while not stop.is_set():
                ids, scores, features, mask = bank.search_with_features(states[:4], 5)
                for row in range(4):
                    n = len(ids[row])
                    assert mask[row].sum() == n and np.isfinite(scores[row, :n]).all()
                    # A visible case is complete: its features hold its own state.
                    for j, case_id in enumerate(ids[row]):
                        i = int(case_id[1:])
                        np.testing.assert_allclose(features[row, j, :DIM], states[i], atol=1e-6)
                searches[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for start in range(0, 4000, 100):
        bank.add(make_cases(states[start:start + 100], start))
        assert time.monotonic() < deadline
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[0]
    assert searches[0] > 10
    bank.wait_for_index(60)
    assert len(bank) == 4000
    _, ids = bank.search(states[:3], 1)
    assert ids == [["c0"], ["c1"], ["c2"]]
    bank.close()


def test_metrics_exported(tmp_path):
    with CaseBank(tmp_path / "metricbank", DIM, num_shards=2, name="metricbank") as bank:
        bank.add(make_cases(unit(np.random.default_rng(11).standard_normal((10, DIM)))))
        bank.search(np.zeros((1, DIM), np.float32), 3)
        bank.snapshot()
        text = generate_latest().decode()
        for name in ('memento_casebank_cases{bank="metricbank",shard="0"}',
                     'memento_casebank_index_type{bank="metricbank",shard="1",type="flat"} 1.0',
                     'memento_casebank_adds_total{bank="metricbank"} 10.0',
                     'memento_casebank_search_seconds_count{bank="metricbank"}',
                     'memento_casebank_snapshot_age_seconds{bank="metricbank",shard="0"}',
                     'memento_casebank_wal_bytes{bank="metricbank",shard="1"} 0.0',
                     'memento_casebank_adds_per_second{bank="metricbank"}'):
            assert name in text, name


def test_add_arrays_stores_what_add_of_cases_stores(tmp_path):
    rng = np.random.default_rng(12)
    states = unit(rng.standard_normal((300, DIM)))
    cases = make_cases(states)
    with CaseBank(tmp_path / "a", DIM, num_shards=3) as a, CaseBank(tmp_path / "b", DIM, num_shards=3) as b:
        assert a.add(cases) == 300
        assert b.add_arrays([c.case_id for c in cases], states, [c.item_id for c in cases], -states,
                            [c.outcome for c in cases], np.array([c.ts for c in cases])) == 300
        scores_a, ids_a = a.search(states[:5], 7)
        scores_b, ids_b = b.search(states[:5], 7)
        assert ids_a == ids_b
        np.testing.assert_array_equal(scores_a, scores_b)
        # A known id and an id repeated inside the batch are skipped.
        assert b.add_arrays(["c0", "new", "new"], states[:3], "i", states[:3], 1.0, 0.0) == 1
        assert len(b) == 301 and b.get("new").item_id == "i" and b.get("new").source == "recommendation"
    with CaseBank(tmp_path / "b", DIM, num_shards=3, snapshot_on_close=False) as again:  # from the log
        assert len(again) == 301
        for c in cases[::37]:
            assert again.get(c.case_id) == c


def test_add_arrays_names_the_bad_field_and_stores_nothing():
    bank = CaseBank(None, DIM, num_shards=2)
    states = unit(np.random.default_rng(13).standard_normal((2, DIM)))
    ids = ["c0", "c1"]
    with pytest.raises(ValueError, match=r"field 'states' must have shape \[2, 16\], got \[2, 3\]"):
        bank.add_arrays(ids, states[:, :3], "i", states, 0.0, 0.0)
    bad = states.copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match="case 'c1' field 'item_vec' holds a non-finite value"):
        bank.add_arrays(ids, states, "i", bad, 0.0, 0.0)
    with pytest.raises(ValueError, match="field 'item_ids' has 1 values for 2 cases"):
        bank.add_arrays(ids, states, ["i"], states, 0.0, 0.0)
    with pytest.raises(ValueError, match="position 1 has an empty or non-string case_id ''"):
        bank.add_arrays(["c0", ""], states, "i", states, 0.0, 0.0)
    with pytest.raises(ValueError, match="field 'outcome' must be a number or 2 numbers"):
        bank.add_arrays(ids, states, "i", states, [1.0, 2.0, 3.0], 0.0)
    with pytest.raises(ValueError, match="case 'c0' field 'ts' is not a finite number"):
        bank.add_arrays(ids, states, "i", states, 0.0, [np.inf, 0.0])
    assert len(bank) == 0
    bank.close()


def test_shards_of_routes_like_shard_of():
    from memory_store.bank import shards_of
    ids = [f"case-{i}" for i in range(500)] + ["é", "a" * 300, "x\ny"]
    assert shards_of(ids, 5).tolist() == [shard_of(c, 5) for c in ids]
    assert shards_of(ids, 1).tolist() == [0] * len(ids)


def test_nprobe_is_tuned_at_build_and_again_as_the_shard_grows(tmp_path, caplog):
    rng = np.random.default_rng(14)
    both = clustered(6400, DIM, rng)
    states, queries = both[:6000], both[6000:]
    # Rebuilt at 4x the built size, tuned again at sqrt(4) = 2x.
    bank = CaseBank(tmp_path / "bank", DIM, num_shards=1, switch_threshold=1000, background_build=False,
                    rebuild_growth=4.0)
    with caplog.at_level(logging.INFO, logger="memory_store.shard"):
        bank.add(make_cases(states[:1500]))
        first = bank.stats()["shards"][0]
        assert first["index_type"] == "ivf" and first["tuned_recall"] >= 0.97
        assert bank.shards[0].index.tuned_size == 1500
        bank.add(make_cases(states[1500:3000], 1500))  # doubled: tuned again, not rebuilt
    second = bank.stats()["shards"][0]
    assert second["builds"] == 1 and bank.shards[0].index.tuned_size == 3000
    assert any("tuned IVF nprobe" in r.getMessage() for r in caplog.records)
    assert 1 <= second["nprobe"] <= first["nprobe"] and second["tuned_recall"] >= 0.97
    bank.add(make_cases(states[3000:], 3000))
    flat = faiss.IndexFlatIP(DIM)
    flat.add(states)
    _, exact = flat.search(queries, 64)
    _, ids = bank.search(queries, 64)
    recall = np.mean([len({f"c{r}" for r in want} & set(got)) / 64 for want, got in zip(exact.tolist(), ids)])
    assert recall >= 0.95, recall
    nprobe = bank.stats()["shards"][0]["nprobe"]
    bank.snapshot()
    bank.close()
    with CaseBank(tmp_path / "bank", DIM, num_shards=1) as again:  # the tuned nprobe is kept
        assert again.stats()["shards"][0]["nprobe"] == nprobe
    with CaseBank(None, DIM, num_shards=1, switch_threshold=1000, background_build=False, nprobe=7) as fixed:
        fixed.add(make_cases(states[:3000]))
        assert fixed.stats()["shards"][0]["nprobe"] == 7
        assert fixed.stats()["shards"][0]["tuned_recall"] is None


def test_hits_follow_the_case_not_its_reused_slot():
    bank = CaseBank(None, DIM, num_shards=1, max_cases_per_shard=3)
    states = unit(np.random.default_rng(15).standard_normal((4, DIM)))
    cases = [Case(f"c{i}", s.tolist(), "i", s.tolist(), 0.0, float(i)) for i, s in enumerate(states)]
    bank.add(cases[:3])
    slot = bank.shards[0].slot_of["c0"]
    for _ in range(3):
        assert bank.search(states[:1], 1)[1] == [["c0"]]  # hits still pending
    bank.add(cases[3:])  # evicts c0; c3 takes its slot
    assert bank.shards[0].slot_of["c3"] == slot
    assert bank.hit_count("c3") == 0 and bank.hit_count("c0") == 0
    bank.search(states[3:], 1)
    assert bank.hit_count("c3") == 1


def test_single_queries_search_on_one_faiss_thread():
    bank = CaseBank(None, DIM, num_shards=2, omp_threads=2)
    states = unit(np.random.default_rng(16).standard_normal((100, DIM)))
    bank.add(make_cases(states))
    bank.search(states[:1], 5)
    assert faiss.omp_get_max_threads() == 1
    bank.search(states[:32], 5)
    assert faiss.omp_get_max_threads() == 2
    bank.close()


def test_wal_drop_prefix_keeps_the_later_records(tmp_path):
    from memory_store.wal import WriteAheadLog
    wal = WriteAheadLog(tmp_path / "w.log")
    first = wal.append([(1, 1, b"a" * 10)])
    wal.sync(first)
    wal.sync(wal.append([(2, 1, b"b" * 5), (3, 2, b"c")]))
    wal.drop_prefix(first)
    assert [(r.lsn, r.payload) for r in wal.replay()] == [(2, b"bbbbb"), (3, b"c")]
    wal.sync(wal.append([(4, 1, b"d")]))
    wal.close()
    again = WriteAheadLog(tmp_path / "w.log")
    assert [r.lsn for r in again.replay()] == [2, 3, 4]
    again.drop_prefix(again.size_bytes)
    assert again.size_bytes == 0 and list(again.replay()) == []
    again.close()


def test_snapshot_by_log_size_runs_beside_the_adds(tmp_path):
    rng = np.random.default_rng(17)
    states = unit(rng.standard_normal((3000, DIM)))
    bank = CaseBank(tmp_path / "bank", DIM, num_shards=1, snapshot_wal_bytes=50_000, snapshot_on_close=False)
    for start in range(0, 3000, 100):
        bank.add(make_cases(states[start:start + 100], start))
    shard = bank.shards[0]
    if shard._snapshotter is not None:
        shard._snapshotter.join(30)
    assert (tmp_path / "bank" / "shard-000" / "snapshot.npz").exists()
    assert shard.stats()["snapshot_age_s"] is not None
    assert shard.wal.size_bytes < 3000 * (2 * DIM * 4 + 16)  # the snapshotted records were dropped
    bank.close()
    with CaseBank(tmp_path / "bank", DIM, num_shards=1) as again:  # snapshot + the log's tail
        assert len(again) == 3000 and again.get("c2999") == make_cases(states[2999:], 2999)[0]


def test_nprobe_tuning_counts_equal_scores_as_found():
    # 40 distinct states, each held by 50 cases (users with the same recent items): every top-10
    # is a set of ties, and any 10 of a state's copies are as good as the exact search's 10.
    from memory_store.index import IVFIndex, tune_nprobe

    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((40, 16)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    vectors = np.repeat(distinct, 50, axis=0)
    ids = rng.permutation(len(vectors)).astype(np.int64)
    ivf = IVFIndex(16, nprobe=1).build(ids, vectors)

    def search(q, k, params):
        return ivf.index.search(q, k, params=params)[1]

    nprobe, recall = tune_nprobe(search, ids, vectors, ivf.index.nlist, k=10, target=0.97)
    assert recall >= 0.97 and nprobe <= 2, (nprobe, recall)
    # An index that misses most cells does not pass: tuning still compares scores, not just ids.
    nprobe, recall = tune_nprobe(lambda q, k, params: np.full((len(q), k), -1, np.int64), ids, vectors,
                                 ivf.index.nlist, k=10, target=0.97)
    assert recall == 0.0 and nprobe == ivf.index.nlist


def test_fp16_ivf_index_persists_and_retunes(tmp_path):
    rng = np.random.default_rng(8)
    states = clustered(6000, DIM, rng)
    options = dict(num_shards=1, switch_threshold=1000, background_build=False, ivf_encoding="fp16")
    bank = CaseBank(tmp_path / "bank", DIM, **options)
    bank.add(make_cases(states[:3000]))
    assert bank.wait_for_index(60)
    assert isinstance(bank.shards[0].index.index, faiss.IndexIVFScalarQuantizer)
    before = bank.search(states[:50], 8)[1]
    bank.close()
    bank = CaseBank(tmp_path / "bank", DIM, **options)
    assert isinstance(bank.shards[0].index.index, faiss.IndexIVFScalarQuantizer)
    assert bank.search(states[:50], 8)[1] == before
    bank.add(make_cases(states[3000:], 3000))  # 2x growth: a rebuild, with its own tuning
    assert bank.wait_for_index(60) and len(bank) == 6000
    _, ids = bank.search(states[3000:3050], 1)
    assert sum(row[0] == f"c{3000 + i}" for i, row in enumerate(ids)) >= 48
    bank.close()
    with pytest.raises(ValueError, match="ivf_encoding must be 'flat' or 'fp16'"):
        CaseBank(None, DIM, ivf_encoding="pq")


def test_a_query_of_zeros_gets_the_items_users_acted_on_most_and_they_survive_a_restart(tmp_path):
    """With users' own actions in the bank, a query of zeros gets, for the items acted on most
    often among the newest organic cases (most often first, ties to the more recent), each item's
    newest organic case; recommendations' cases are not counted (they say what a policy chose);
    the rest of the answer is the newest cases; after a restart the stored cases say the same."""
    rng = np.random.default_rng(12)
    states = unit(rng.standard_normal((40, DIM)))
    acted = ["a", "b", "a", "c", "b", "a", "d", "c"]        # a: 3, then b and c: 2 (c more recent), d: 1
    organic = [Case(case_id=f"act:e{i}", state=states[i].tolist(), item_id=item, item_vec=(-states[i]).tolist(),
                    outcome=1.0, ts=100.0 + i, source="action") for i, item in enumerate(acted)]
    chosen = [Case(case_id=f"rec{i}", state=states[20 + i].tolist(), item_id="z", item_vec=states[i].tolist(),
                   outcome=0.0, ts=200.0 + i) for i in range(6)]   # "z" chosen most, never acted on
    bank = CaseBank(tmp_path / "bank", DIM, num_shards=2)
    bank.add(organic[:4])
    bank.add(chosen)
    bank.add(organic[4:])
    bank.add(organic[:4])                                  # re-sent: counted once
    assert bank.popular(10) == [("a", "act:e5"), ("c", "act:e7"), ("b", "act:e4"), ("d", "act:e6")]
    assert bank.popular_items(2) == ["a", "c"]
    answer = ["act:e5", "act:e7", "act:e4", "act:e6", "rec5", "rec4"]   # then the newest cases
    assert bank.search(np.zeros((1, DIM), np.float32), 6)[1] == [answer]
    bank.close()
    with CaseBank(tmp_path / "bank", DIM, num_shards=2) as again:
        assert again.popular(10) == [("a", "act:e5"), ("c", "act:e7"), ("b", "act:e4"), ("d", "act:e6")]
        assert again.search(np.zeros((1, DIM), np.float32), 6)[1] == [answer]


def test_popular_items_fall_back_to_an_older_case_when_the_newest_one_was_evicted():
    """An item's newest organic case can leave the bank before older ones (eviction by utility):
    the item is then offered with its newest case still in the bank, ranked by it."""
    rng = np.random.default_rng(13)
    states = unit(rng.standard_normal((8, DIM)))
    acted = [("a", 1.0), ("b", 1.0), ("a", 1.0), ("a", 0.0), ("b", 1.0)]   # a's newest case: the least useful
    bank = CaseBank(None, DIM, num_shards=1, max_cases_per_shard=5, eviction="utility")
    bank.add([Case(case_id=f"act:e{i}", state=states[i].tolist(), item_id=item, item_vec=states[i].tolist(),
                   outcome=outcome, ts=10.0 + i, source="action") for i, (item, outcome) in enumerate(acted)])
    assert bank.popular(5) == [("a", "act:e3"), ("b", "act:e4")]
    bank.add([Case(case_id="rec0", state=states[7].tolist(), item_id="z", item_vec=states[7].tolist(),
                   outcome=5.0, ts=20.0)])                  # evicts act:e3, the least useful
    assert "act:e3" not in bank
    assert bank.popular(5) == [("a", "act:e2"), ("b", "act:e4")]
    bank.close()


def test_a_query_of_zeros_gets_the_newest_cases_and_they_survive_a_restart(tmp_path):
    """A user with no history has a state of zeros: every case is equally near, so the index
    would answer with whichever cases it lists first. Without users' own actions to count, the
    bank answers with its newest cases instead (scored 0, features as stored), counts no retrieval hit for them, still searches the
    other rows of the batch, skips evicted cases, and knows its newest cases again after a
    restart (from the stored event times)."""
    rng = np.random.default_rng(11)
    states = unit(rng.standard_normal((300, DIM)))
    bank = CaseBank(tmp_path / "bank", DIM, num_shards=3, max_cases_per_shard=80, eviction="oldest")
    for start in range(0, 300, 50):
        bank.add(make_cases(states[start:start + 50], start))
    newest = [f"c{i}" for i in range(299, 289, -1)]
    queries = np.stack([np.zeros(DIM, np.float32), states[5]])
    ids, scores, features, mask = bank.search_with_features(queries, 10)
    assert ids[0] == newest and scores[0].tolist() == [0.0] * 10 and mask[0].all()
    np.testing.assert_array_equal(features[0], bank.features(newest))
    assert ids[1] == bank.search(states[5][None], 10)[1][0]       # the other row: a plain search
    assert bank.search(np.zeros((1, DIM), np.float32), 3)[1] == [newest[:3]]
    assert all(bank.hit_count(c) == 0 for c in newest)
    assert len(bank.newest(1000)) == len(bank) == 240            # evicted cases are not offered
    bank.close()
    with CaseBank(tmp_path / "bank", DIM, num_shards=3, max_cases_per_shard=80, eviction="oldest") as again:
        assert again.newest(10) == newest
        assert again.search(np.zeros((1, DIM), np.float32), 10)[1] == [newest]
