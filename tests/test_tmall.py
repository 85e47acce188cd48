"""The Tmall log loader, on the real shared sample and on hand-made files of both shapes."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from memento.encoder import load_products
from evaluation.tmall import TmallFormatError, iter_tmall_log, load_tmall_log, normalise_user_id, parse_vtime

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tmall-sample"
SAMPLE_LOG = SAMPLE / "sam_tianchi_2014002_rec_tmall_log.csv"
SAMPLE_PRODUCTS = SAMPLE / "sam_tianchi_2014001_rec_tmall_product.csv"
needs_sample = pytest.mark.skipif(not SAMPLE_LOG.exists(),
                                  reason=f"shared Tmall sample not found at {SAMPLE_LOG}")


@needs_sample
def test_real_sample_parses_completely():
    log = load_tmall_log(SAMPLE_LOG)
    assert log.rows_read == 3331 and len(log.actions) == 3331 and not log.bad_rows
    assert log.action_counts() == {"click": 3074, "cart": 249, "collect": 3, "purchase": 5}
    assert len({a.user_id for a in log.actions}) == 568
    assert all(not a.user_id.startswith("u") and not a.item_id.startswith("i") for a in log.actions)
    times = [a.ts for a in log.actions]
    assert times == sorted(times)
    assert calendar.timegm((2014, 9, 1, 0, 0, 0)) <= times[0] and times[-1] < calendar.timegm((2014, 9, 21, 0, 0, 0))
    ids = [a.event_id for a in log.actions]
    assert len(set(ids)) == len(ids) and ids == [a.event_id for a in load_tmall_log(SAMPLE_LOG).actions]
    # The first data row: i161,u2625,click,2014/9/18 15:03
    first = next(a for a in log.actions if a.event_id.endswith(":2"))
    assert (first.item_id, first.user_id, first.action, first.ts) == (
        "161", "2625", "click", calendar.timegm((2014, 9, 18, 15, 3, 0)))
    assert "parsed 3331 of 3331 rows" in log.summary()


@needs_sample
def test_every_logged_item_has_a_product_row():
    products = load_products(SAMPLE_PRODUCTS)
    assert {a.item_id for a in load_tmall_log(SAMPLE_LOG).actions} <= set(products)


@needs_sample
def test_x01_headerless_shape_reads_like_the_csv(tmp_path):
    lines = SAMPLE_LOG.read_bytes().decode("gb18030").splitlines()[1:]
    path = tmp_path / "part-00000"
    path.write_bytes(("\n".join(line.replace(",", "\x01") for line in lines) + "\n").encode("utf-8"))
    csv_log, x01_log = load_tmall_log(SAMPLE_LOG), load_tmall_log(path)
    assert x01_log.shape == "\\x01-separated" and not x01_log.bad_rows
    assert [(a.user_id, a.item_id, a.action, a.ts) for a in x01_log.actions] == \
        [(a.user_id, a.item_id, a.action, a.ts) for a in csv_log.actions]


def test_malformed_rows_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes("\n".join([
        "item_id,user_id,action,vtime",
        "i1,u1,click,2014/9/1 10:00",          # 2 ok
        "i2,u1,view,2014/9/1 10:01",           # 3 unknown action
        "i3,u2,cart",                          # 4 too few fields
        "i4,u2,alipay,2014/13/1 10:00",        # 5 month 13
        "i5,,click,2014/9/1 10:02",            # 6 empty user
        "",                                    # 7 blank: ignored
        "i6,u3,收藏,2014/9/2 8:00",             # 8 Chinese action (GB18030 bytes)
        "i7,u3,ALIPAY,2014-09-02 08:05:30",    # 9 ok: ISO time with seconds, upper case
    ]).encode("gb18030") + b"\n")
    log = load_tmall_log(path)
    assert [(a.item_id, a.action) for a in log.actions] == [("1", "click"), ("7", "purchase")]
    assert log.actions[1].ts == calendar.timegm((2014, 9, 2, 8, 5, 30))
    bad = {b.line: b.reason for b in log.bad_rows}
    assert sorted(bad) == [3, 4, 5, 6, 8]
    assert "unknown action 'view'" in bad[3]
    assert "expected 4 fields" in bad[4]
    assert "not a valid date" in bad[5]
    assert "empty user_id" in bad[6]
    assert "收藏" in bad[8]
    summary = log.summary()
    assert "parsed 2 of 7 rows" in summary and "skipped 5" in summary and "line 3:" in summary


def test_header_columns_in_any_order_and_utf8_bom(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("\ufeffuser_id,vtime,item_id,action\nu9,2014/9/3 1:02,i8,collect\n", encoding="utf-8")
    (a,) = load_tmall_log(path).actions
    assert (a.user_id, a.item_id, a.action, a.ts) == ("9", "8", "collect", calendar.timegm((2014, 9, 3, 1, 2, 0)))


def test_missing_file_and_nothing_parseable_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tmall_log(tmp_path / "absent.csv")
    junk = tmp_path / "junk.csv"
    junk.write_text("item_id,user_id,action,vtime\na,b,c,d\ne,f,g,h\n")
    with pytest.raises(TmallFormatError, match="none of 2 rows could be parsed; first problems: line 2"):
        load_tmall_log(junk)
    empty = tmp_path / "empty.csv"
    empty.write_text("item_id,user_id,action,vtime\n")
    with pytest.raises(TmallFormatError, match="no data rows"):
        load_tmall_log(empty)
    wrong_header = tmp_path / "wrong.csv"
    wrong_header.write_text("item_id,user_id,when\n1,2,3\n")
    with pytest.raises(TmallFormatError, match=r"lacks columns \['action', 'vtime'\]"):
        load_tmall_log(wrong_header)


def test_iter_streams_and_max_rows(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("item_id,user_id,action,vtime\n" + "".join(
        f"i{k},u1,click,2014/9/1 0:{k:02d}\n" for k in range(10)))
    assert [n for n, _ in iter_tmall_log(path)] == list(range(2, 12))
    assert len(load_tmall_log(path, max_rows=4).actions) == 4


def test_id_and_time_helpers():
    assert normalise_user_id("u2625") == "2625" and normalise_user_id("user") == "user"
    assert parse_vtime("2014/9/18 15:03") == calendar.timegm((2014, 9, 18, 15, 3, 0))
    assert parse_vtime("2014-09-18") == calendar.timegm((2014, 9, 18, 0, 0, 0))
    with pytest.raises(ValueError, match="unparseable vtime"):
        parse_vtime("18/9/2014")
