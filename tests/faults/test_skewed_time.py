"""An event time in milliseconds (or from a clock years ahead), on a real embedded broker (both
engines). Before the fix such a recommendation and action moved their partition's watermark
~50,000 years ahead: the open window of another user there closed at once with reward 0, and
its answer then counted as late. Now both are dead-lettered (``max_future_skew_s``) and the
window gets its reward; serving refuses such a ``ts`` with a 422."""

from __future__ import annotations

import time

import pytest

from harness.processes import ProcessGroup
from memento.schemas import Action, Recommendation, encode
from serving.validation import RequestError, parse_feedback, parse_recommend
from memento.kafka_io import partition_of
from support.streams import PARTITIONS, TransitionLog, fresh_settings, produce, start_worker, wait_assigned, wait_ticks

pytestmark = pytest.mark.faults

MS = time.time() * 1000.0  # "now", in milliseconds


def _rec(rid: str, user: str, ts: float, d: int) -> bytes:
    return encode(Recommendation(request_id=rid, user_id=user, item_id="i1", case_id="c1", propensity=0.5,
                                 policy_version=1, ts=ts, state=[0.1] * d, case_features=[0.2] * (2 * d + 1)))


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["noida", "tansu"])
def test_a_timestamp_in_milliseconds_does_not_close_other_windows(request, tmp_path, engine):
    broker = request.getfixturevalue(engine)
    s = fresh_settings(broker, tmp_path, window_s=60.0, allowed_lateness_s=0.0, session_gap_s=0.0)
    d = s.item_dim
    other = next(u for u in (f"b{i}" for i in range(100)) if partition_of(u.encode(), PARTITIONS) == partition_of(b"a", PARTITIONS))
    first = [("recommendation", "a", _rec("r1", "a", 1000.0, d)),
             ("recommendation", other, _rec("skewed-rec", other, MS, d)),
             ("action", other, encode(Action("skewed-act", other, "z", "click", MS)))]
    then = [("action", "a", encode(Action("answer", "a", "i1", "purchase", 1005.0, "r1"))),
            ("action", "a", encode(Action("later", "a", "z", "click", 5000.0))),
            ("recommendation", "a", _rec("r2", "a", 5000.0, d))]
    with ProcessGroup() as group:
        worker, port = start_worker(group, s, tmp_path, name="worker", app_id=f"w-{s.topics.actions}")
        wait_assigned(group, s, [port])
        log = TransitionLog(s, dead_letters=True)
        produce(s, first)
        log.read(lambda c: len(log.dead) >= 2 or "r1" in c, timeout=30, group=group)
        wait_ticks(port, 3 * PARTITIONS, group=group)  # a watermark moved by the skewed events closes r1 by then
        produce(s, then)
        copies = log.read(lambda c: "r1" in c, timeout=60, group=group)
        dead = log.dead
        log.close()
    assert copies.get("r1", [(None,)])[0][0] == 5.0, copies
    assert len(dead) == 2 and all("max_future_skew_s" in r and "milliseconds?" in r for r in dead), dead


def test_serving_refuses_a_timestamp_ahead_of_its_clock():
    now = 1_700_000_000.0
    for parse, body in ((parse_recommend, {"user_id": "u"}),
                        (parse_feedback, {"user_id": "u", "item_id": "i", "action": "click"})):
        assert parse({**body, "ts": now + 60}, now=now, max_future_skew_s=3600)  # a minute ahead: fine
        assert parse({**body, "ts": 1000.0}, now=now, max_future_skew_s=3600)   # the past: fine
        with pytest.raises(RequestError, match="milliseconds") as err:
            parse({**body, "ts": now * 1000}, now=now, max_future_skew_s=3600)
        assert err.value.status == 422
