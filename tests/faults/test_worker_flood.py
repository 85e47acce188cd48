"""One user flooding the worker with recommendations inside one window, on a real embedded broker
(both engines). Before the fix every recommendation opened a window in the user's one table
value: ~1,500 of them made a value of over 1 MB, past Kafka's default record size, so the
changelog write failed (on every retry) and the worker stopped delivering. Now the user's windows
are capped (``max_windows_per_user``), the rest are dead-lettered with the reason, and another
user's transition still comes out."""

from __future__ import annotations

import pytest

from harness.processes import ProcessGroup
from memento.schemas import Action, Recommendation, encode
from support.streams import TransitionLog, fresh_settings, metric, produce, start_worker, wait_assigned

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

FLOOD = 1500
D = 32


def _rec(rid: str, user: str, ts: float) -> bytes:
    return encode(Recommendation(request_id=rid, user_id=user, item_id="i1", case_id="c1", propensity=0.5,
                                 policy_version=1, ts=ts, state=[0.1] * D, case_features=[0.2] * (2 * D + 1)))


@pytest.mark.parametrize("engine", ["noida", "tansu"])
def test_one_user_flooding_recommendations_is_capped_and_the_rest_flows(request, tmp_path, engine):
    broker = request.getfixturevalue(engine)
    s = fresh_settings(broker, tmp_path, item_dim=D, window_s=60.0, allowed_lateness_s=0.0, session_gap_s=0.0)
    cap = s.max_windows_per_user
    events = [("recommendation", "flood", _rec(f"f{i}", "flood", 1000.0 + i * 0.01)) for i in range(FLOOD)]
    events += [("recommendation", "calm", _rec("calm-1", "calm", 1001.0)),
               ("action", "calm", encode(Action("calm-a", "calm", "i1", "purchase", 1002.0, "calm-1")))]
    # organic actions far later move both users' partitions' watermarks past every window
    events += [("action", u, encode(Action(f"adv-{u}", u, "z", "click", 5000.0))) for u in ("flood", "calm")]
    with ProcessGroup() as group:
        worker, port = start_worker(group, s, tmp_path, name="worker", app_id=f"w-{s.topics.actions}")
        wait_assigned(group, s, [port])
        produce(s, events)
        log = TransitionLog(s, dead_letters=True)
        copies = log.read(lambda c: len(c) >= cap + 1 and len(log.dead) >= FLOOD - cap, timeout=120, group=group)
        dead = log.dead
        log.close()
        group.check()  # the worker is still running
        over_cap = metric(port, "memento_stream_dead_letters_total", reason="over_cap")
    assert copies.get("calm-1", [(None,)])[0][0] == 5.0, "the other user's transition did not come out"
    flood = {t for t in copies if t.startswith("f")}
    assert flood == {f"f{i}" for i in range(cap)}, (len(flood), sorted(flood)[:5])
    assert len(dead) == FLOOD - cap and all("max_windows_per_user" in r for r in dead), dead[:3]
    assert over_cap == FLOOD - cap
