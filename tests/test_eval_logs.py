"""Logged data for ``memento eval``: interactions CSVs, item files and the shared Tmall sample."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import numpy as np

from memento.encoder import ItemMeta, signed_hash
from evaluation.logs import (
    CONTEXT_BUCKETS, LoggedData, LoggedEvent, load_interactions, load_items, load_tmall,
    parse_reward_mapping, parse_timestamp,
)

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tmall-sample"
SAMPLE_LOG = SAMPLE / "sam_tianchi_2014002_rec_tmall_log.csv"
SAMPLE_PRODUCTS = SAMPLE / "sam_tianchi_2014001_rec_tmall_product.csv"

# 2014-09-18 15:03:00 UTC and 2014-09-18 00:00:00 UTC, computed by hand.
T_1503 = 1411052580.0
T_DAY = 1410998400.0


def write(tmp_path: Path, text: str, name: str = "log.csv", encoding: str = "utf-8") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


ACTION_LOG = (
    "user_id,item_id,timestamp,action\n"
    "u1,i10,300,click\n"       # line 2
    "u1,i11,100,cart\n"        # line 3
    "u2,i10,200,alipay\n"      # line 4
    "u2,i12,400,collect\n"     # line 5
    "u3,i10,150,view\n"        # line 6
)


def test_action_log_with_default_mapping(tmp_path):
    data = load_interactions(write(tmp_path, ACTION_LOG))
    assert isinstance(data, LoggedData) and data.source == "interactions"
    assert [(e.event_id, e.user_id, e.item_id, e.ts, e.action, e.reward) for e in data.events] == [
        ("interactions-3", "u1", "11", 100.0, "cart", 3.0),
        ("interactions-4", "u2", "10", 200.0, "purchase", 5.0),
        ("interactions-2", "u1", "10", 300.0, "click", 1.0),
        ("interactions-5", "u2", "12", 400.0, "collect", 2.0),
    ]
    assert all(e.propensity is None and e.context is None and e.rating is None for e in data.events)
    assert len(data.skipped) == 1
    line, reason = data.skipped[0]
    assert line == 6 and "'view'" in reason and "cart, click, collect, purchase" in reason
    assert data.has_users and not data.has_propensity
    assert data.items == {} and data.context_columns == []
    assert data.summary() == ("interactions: 4 events (cart 1, click 1, collect 1, purchase 1); "
                              "2 users; 3 items; 1 skipped rows")


def test_action_log_with_custom_mapping(tmp_path):
    rewards = parse_reward_mapping("click=0.5, view=0.25,alipay=10")
    assert rewards == {"click": 0.5, "view": 0.25, "alipay": 10.0}
    data = load_interactions(write(tmp_path, ACTION_LOG), rewards=rewards)
    by_id = {e.event_id: (e.action, e.reward) for e in data.events}
    # named actions take the custom reward (alipay names purchase); cart and collect keep defaults
    assert by_id == {"interactions-2": ("click", 0.5), "interactions-3": ("cart", 3.0),
                     "interactions-4": ("purchase", 10.0), "interactions-5": ("collect", 2.0),
                     "interactions-6": ("view", 0.25)}
    assert data.skipped == []
    assert data.rewards["view"] == 0.25 and data.rewards["purchase"] == 10.0


@pytest.mark.parametrize("spec, words", [
    ("click", "'click'"), ("click=", "'' is not a number"), ("=3", "'=3'"), ("click=x", "'x' is not a number"),
    ("click=1,click=2", "twice"), ("", "empty"), ("click=inf", "finite"),
])
def test_reward_mapping_rejects_bad_parts(spec, words):
    with pytest.raises(ValueError) as err:
        parse_reward_mapping(spec)
    assert words in str(err.value)


def test_rating_log_with_threshold(tmp_path):
    path = write(tmp_path, "user_id,item_id,timestamp,rating\n"
                           "a,1,5,4\n"      # line 2: 4 >= 4 → 1
                           "a,2,6,3.5\n"    # line 3: 3.5 < 4 → 0
                           "b,1,7,5\n"      # line 4: 1
                           "b,3,8,good\n")  # line 5: not a number
    data = load_interactions(path, rating_threshold=4)
    assert [(e.item_id, e.action, e.rating, e.reward) for e in data.events] == [
        ("1", "rating", 4.0, 1.0), ("2", "rating", 3.5, 0.0), ("1", "rating", 5.0, 1.0)]
    assert data.skipped == [(5, "rating 'good' is not a number")]
    assert data.rewards == {}
    with pytest.raises(ValueError, match="rating log.*rating threshold"):
        load_interactions(path)
    with pytest.raises(ValueError, match="reward mapping does not apply"):
        load_interactions(path, rating_threshold=4, rewards={"click": 1})


def test_both_action_and_rating_columns_use_action(tmp_path):
    path = write(tmp_path, "user_id,item_id,timestamp,action,rating\nu,1,5,cart,2\nu,2,6,click,\n")
    data = load_interactions(path)
    assert [(e.action, e.reward, e.rating) for e in data.events] == [("cart", 3.0, 2.0), ("click", 1.0, None)]
    with pytest.raises(ValueError, match="action log"):
        load_interactions(path, rating_threshold=3)


def test_iso_and_numeric_timestamps_are_sorted_with_stable_ties(tmp_path):
    path = write(tmp_path, "user_id,item_id,timestamp,action\n"
                           "u,z,2014-09-18T15:03:00,click\n"          # T_1503
                           "u,b,1411052580,click\n"                   # T_1503, tie: file order
                           "u,c,2014-09-18,click\n"                   # T_DAY
                           "u,a,2014-09-18 17:03:00+02:00,click\n"    # T_1503 with an offset
                           "u,e,1410998400.5,click\n"                 # T_DAY + 0.5
                           "u,f,18/09/2014,click\n"                   # not ISO
                           "u,g,,click\n")
    data = load_interactions(path)
    assert [(e.item_id, e.ts) for e in data.events] == [
        ("c", T_DAY), ("e", T_DAY + 0.5), ("z", T_1503), ("b", T_1503), ("a", T_1503)]
    assert [line for line, _ in data.skipped] == [7, 8]
    assert "timestamp '18/09/2014'" in data.skipped[0][1] and "ISO 8601" in data.skipped[0][1]
    assert data.skipped[1][1] == "empty timestamp"
    assert parse_timestamp("2014-09-18T15:03:00Z") == T_1503


def test_naive_iso_times_are_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    try:
        assert parse_timestamp("2014-09-18T15:03:00") == T_1503 and parse_timestamp("2014-09-18") == T_DAY
    finally:
        monkeypatch.undo()
        time.tzset()


def test_context_columns_without_user_id(tmp_path):
    path = write(tmp_path, "x_age,item_id,timestamp,action,x_income,other\n"
                           "0.5,7,10,click,-1e3,zz\n"
                           "1.5,8,20,cart,2,zz\n"
                           "abc,9,30,click,2,zz\n")
    data = load_interactions(path, context_prefix="x_")
    assert data.context_columns == ["x_age", "x_income"]
    # x_age has a value that is not a number: the column is categorical, its values strings
    assert data.categorical_columns == ["x_age"]
    assert [(e.user_id, e.item_id, e.context) for e in data.events] == [
        ("", "7", ("0.5", -1000.0)), ("", "8", ("1.5", 2.0)), ("", "9", ("abc", 2.0))]
    assert data.skipped == []
    assert not data.has_users
    assert "no user ids" in data.summary() and "2 context columns (1 categorical)" in data.summary()
    # without the context columns, the same file lacks a user id
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['user_id'\]"):
        load_interactions(path)
    with pytest.raises(ValueError, match="no column starts with context prefix 'ctx_'"):
        load_interactions(path, context_prefix="ctx_")


MIXED_CONTEXT_LOG = (
    "item_id,timestamp,action,propensity,ctx_0,ctx_1,ctx_num,ctx_int\n"
    "1,10,click,0.5,81ce5f0a,a,1e3,7\n"        # line 2
    "2,11,click,0.5,,b,-0.25,\n"               # line 3: missing category, missing int
    "1,12,click,0.5,81ce5f0a,NaN,+.5,007\n"    # line 4: nan is missing in both kinds
    "2,13,click,0.5,9f00e1c2,b,null,-3\n"      # line 5: null is missing
    "1,14,click,0.5,9f00e1c2,a,inf,1\n"        # line 6: an infinite number: skipped
    "2,xx,click,0.5,not-a-number,a,zz,1\n"     # line 7: bad timestamp; its context types nothing
)


def test_context_columns_are_numeric_or_categorical_and_missing_values_load(tmp_path):
    data = load_interactions(write(tmp_path, MIXED_CONTEXT_LOG), context_prefix="ctx_")
    assert data.context_columns == ["ctx_0", "ctx_1", "ctx_num", "ctx_int"]
    assert data.categorical_columns == ["ctx_0", "ctx_1"]
    assert [e.context for e in data.events] == [
        ("81ce5f0a", "a", 1000.0, 7.0), ("", "b", -0.25, 0.0), ("81ce5f0a", "", 0.5, 7.0),
        ("9f00e1c2", "b", 0.0, -3.0)]
    assert [line for line, _ in data.skipped] == [6, 7]
    assert data.skipped[0] == (6, "ctx_num 'inf' is not a finite number")
    assert data.context_buckets == CONTEXT_BUCKETS
    assert data.context_dim == 2 + CONTEXT_BUCKETS
    assert "4 context columns (2 categorical)" in data.summary()


def test_context_vector_is_numbers_then_signed_hashed_one_hots(tmp_path):
    data = load_interactions(write(tmp_path, MIXED_CONTEXT_LOG), context_prefix="ctx_", context_buckets=64)
    assert data.context_dim == 66
    vectors = [data.context_vector(e) for e in data.events]
    assert all(v.dtype == np.float64 and v.shape == (66,) for v in vectors)
    first = vectors[0]
    assert first[:2].tolist() == [1000.0, 7.0]
    expected = np.zeros(64)
    for token in ("ctx_0=81ce5f0a", "ctx_1=a"):   # the item encoder's signed hashing
        index, sign = signed_hash(token, 64)
        expected[index] += sign
    assert first[2:].tolist() == expected.tolist()
    # a missing category adds nothing: one ±1 left on the second row
    assert np.abs(vectors[1][2:]).sum() == 1.0
    # the same category gives the same one-hot
    index, sign = signed_hash("ctx_0=81ce5f0a", 64)
    assert vectors[2][2 + index] == sign and np.abs(vectors[2][2:]).sum() == 1.0


def test_numeric_context_vector_is_the_values_as_logged(tmp_path):
    path = write(tmp_path, "item_id,timestamp,action,c_a,c_b\n1,1,click,0.0,1.0\n2,2,click,1,0\n")
    data = load_interactions(path, context_prefix="c_")
    assert data.categorical_columns == [] and data.context_dim == 2
    assert [data.context_vector(e).tolist() for e in data.events] == [[0.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("values", [
    (np.float16(0.5), np.float32(2.0), np.float64(-1.0)),
    np.array([0.5, 2.0, -1.0], np.float64),
    np.array([0.5, 2.0, -1.0], np.float32),
    (0.5, 2, -1.0),
])
def test_context_vector_accepts_any_float_type(values):
    data = LoggedData("interactions", [], context_columns=["a", "b", "c"])
    event = LoggedEvent("e", "", "1", 0.0, "click", 1.0, None, values)
    vec = data.context_vector(event)
    assert vec.dtype == np.float64 and vec.tolist() == [0.5, 2.0, -1.0]


def test_context_vector_refuses_a_context_of_the_wrong_length():
    data = LoggedData("interactions", [], context_columns=["a", "b"])
    with pytest.raises(ValueError, match="does not match the context columns"):
        data.context_vector(LoggedEvent("e", "", "1", 0.0, "click", 1.0, None, (1.0,)))


def test_context_buckets_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="context_buckets"):
        load_interactions(write(tmp_path, MIXED_CONTEXT_LOG), context_prefix="ctx_", context_buckets=0)


def test_propensity_validation(tmp_path):
    path = write(tmp_path, "user_id,item_id,timestamp,action,propensity\n"
                           "u,1,1,click,0.2\n"    # line 2: ok
                           "u,2,2,click,0\n"      # line 3: 0 is not a probability of a logged item
                           "u,3,3,click,1.5\n"    # line 4: above 1
                           "u,4,4,click,1\n"      # line 5: ok
                           "u,5,5,click,\n"       # line 6: missing while others have it
                           "u,6,6,click,p\n")     # line 7: not a number
    data = load_interactions(path)
    assert [(e.item_id, e.propensity) for e in data.events] == [("1", 0.2), ("4", 1.0)]
    assert data.has_propensity
    assert data.skipped == [
        (3, "propensity '0' is outside (0, 1]"),
        (4, "propensity '1.5' is outside (0, 1]"),
        (6, "empty propensity (other rows log one; every row needs it)"),
        (7, "propensity 'p' is not a number"),
    ]


def test_empty_propensity_column_means_no_propensity(tmp_path):
    data = load_interactions(write(tmp_path, "user_id,item_id,timestamp,action,propensity\nu,1,1,click,\n"))
    assert len(data.events) == 1 and data.events[0].propensity is None and not data.has_propensity


def test_event_id_column_is_used_and_duplicates_skipped(tmp_path):
    path = write(tmp_path, "event_id,user_id,item_id,timestamp,action\ne1,u,1,1,click\ne1,u,2,2,click\n")
    data = load_interactions(path)
    assert [e.event_id for e in data.events] == ["e1"]
    assert data.skipped == [(3, "duplicate event_id 'e1' (first on line 2)")]


def test_missing_required_columns_name_file_and_columns(tmp_path):
    path = write(tmp_path, "user_id,item,timestamp,action\nu,1,1,click\n")
    with pytest.raises(ValueError) as err:
        load_interactions(path)
    text = str(err.value)
    assert path in text and "['item_id']" in text and "columns found: ['user_id', 'item', 'timestamp', 'action']" in text
    path = write(tmp_path, "user_id,item_id,timestamp\nu,1,1\n", name="b.csv")
    with pytest.raises(ValueError, match="needs an 'action' or a 'rating' column"):
        load_interactions(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_interactions(tmp_path / "nope.csv")


def test_file_where_no_row_parses_is_an_error(tmp_path):
    path = write(tmp_path, "user_id,item_id,timestamp,action\nu,1,x,click\nu,2,1,teleport\n")
    with pytest.raises(ValueError) as err:
        load_interactions(path)
    text = str(err.value)
    assert path in text and "none of 2 rows" in text and "line 2: timestamp 'x'" in text and "line 3" in text
    with pytest.raises(ValueError, match="no data rows"):
        load_interactions(write(tmp_path, "user_id,item_id,timestamp,action\n", name="empty.csv"))


def test_wrong_field_count_is_skipped(tmp_path):
    data = load_interactions(write(tmp_path, "user_id,item_id,timestamp,action\nu,1,1,click\nu,2,2\n"))
    assert len(data.events) == 1 and data.skipped == [(3, "expected 4 fields as in the header, found 3")]


def test_items_with_brand_id_and_brand_variants(tmp_path):
    tmall_like = write(tmp_path, "item_id,title,pict_url,category,brand_id,seller_id\n"
                                 "277,秋装 新款,http://x,2-7,null,s1\n"
                                 "i185,夹克,http://y,1-6,b1,s2\n", name="p.csv", encoding="gb18030")
    assert load_items(tmall_like) == {
        "277": ItemMeta("277", category="2-7", brand="", seller="s1", title="秋装 新款"),
        "185": ItemMeta("185", category="1-6", brand="b1", seller="s2", title="夹克"),
    }
    plain = write(tmp_path, "Item_ID,brand,seller\n9,Acme,\n10,,shop\n11,NULL,\n", name="q.csv")
    assert load_items(plain) == {
        "9": ItemMeta("9", brand="Acme"), "10": ItemMeta("10", seller="shop"), "11": ItemMeta("11")}
    bad = write(tmp_path, "id,brand\n1,x\n", name="r.csv")
    with pytest.raises(ValueError) as err:
        load_items(bad)
    assert bad in str(err.value) and "item_id" in str(err.value) and "['id', 'brand']" in str(err.value)


def test_interactions_with_items_file(tmp_path):
    items = write(tmp_path, "item_id,category\n10,c1\n", name="items.csv")
    data = load_interactions(write(tmp_path, ACTION_LOG), items_path=items)
    assert data.items == {"10": ItemMeta("10", category="c1")}


def test_tmall_small_file_with_custom_mapping(tmp_path):
    path = write(tmp_path, "item_id,user_id,action,vtime\n"
                           "i1,u1,click,2014/9/18 15:03\n"
                           "i2,u1,alipay,2014/9/18 0:00\n"
                           "i3,u2,jump,2014/9/18 0:00\n")
    data = load_tmall(path, rewards={"click": 0.0})
    assert [(e.event_id, e.item_id, e.user_id, e.ts, e.action, e.reward) for e in data.events] == [
        ("tmall-3", "2", "1", T_DAY, "purchase", 5.0), ("tmall-2", "1", "1", T_1503, "click", 0.0)]
    assert [line for line, _ in data.skipped] == [4] and "'jump'" in data.skipped[0][1]


def test_tmall_shared_sample():
    if not SAMPLE.is_dir():
        pytest.skip(f"shared Tmall sample not found at {SAMPLE}")
    data = load_tmall(SAMPLE_LOG, SAMPLE_PRODUCTS)
    assert data.source == "tmall" and len(data.events) == 3331 and data.skipped == []
    assert data.action_counts() == {"click": 3074, "cart": 249, "collect": 3, "purchase": 5}
    assert sum(e.reward for e in data.events) == 3074 * 1 + 249 * 3 + 3 * 2 + 5 * 5
    times = [e.ts for e in data.events]
    assert times == sorted(times)
    assert len({e.event_id for e in data.events}) == 3331
    assert len(data.items) == 562 and data.items["185"].brand == "b1" and data.items["277"].brand == ""
    assert {e.item_id for e in data.events} <= set(data.items)
    assert data.has_users and not data.has_propensity
    first = next(e for e in data.events if e.event_id == "tmall-2")  # i161,u2625,click,2014/9/18 15:03
    assert first == LoggedEvent("tmall-2", "2625", "161", T_1503, "click", 1.0, None, None)
    assert data.summary().startswith("tmall: 3331 events (cart 249, click 3074, collect 3, purchase 5); "
                                     "568 users; 527 items; 562 with metadata")
