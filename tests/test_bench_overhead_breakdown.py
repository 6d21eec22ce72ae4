"""bench/overhead_breakdown.py: a round's parts from the processes' stamped lines (synthetic lines)."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "overhead_breakdown", Path(__file__).resolve().parents[1] / "bench" / "overhead_breakdown.py")
breakdown_module = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(breakdown_module)

COORDINATOR = [
    (10.0, "00:00:10 round_open round=1 sampled=2 connected=2"),
    (13.0, "00:00:13 update round=1 accepted=True reason=accepted signer=aaaa0000bbbb1111"),
    (13.5, "00:00:13 update round=1 accepted=True reason=accepted signer=cccc2222dddd3333"),
    (13.6, "00:00:13 round_closed round=1 status=aggregated admitted=2"),
    (13.7, "00:00:13 round_open round=2 sampled=2 connected=2"),
    (15.2, "00:00:15 update round=2 accepted=True reason=accepted signer=cccc2222dddd3333"),
    (15.4, "00:00:15 update round=2 accepted=True reason=accepted signer=aaaa0000bbbb1111"),
    (15.5, "00:00:15 round_closed round=2 status=aggregated admitted=2"),
    (15.6, "00:00:15 finished rounds=2"),
]
VOLUNTEERS = [
    [(1.0, "volunteer aaaa-0000-bbbb-1111: 64 examples in x.jsonl"),
     (12.9, "00:00:12 round 1: update sent (2 steps, train loss 1.0, 336 KiB, 0.2 s)"),
     (13.9, "00:00:13 round 1: your update was admitted"),
     (14.9, "00:00:14 round 2: update sent (2 steps, train loss 1.0, 336 KiB, 0.2 s)")],
    [(1.0, "volunteer cccc-2222-dddd-3333: 64 examples in y.jsonl"),
     (13.2, "00:00:13 round 1: update sent (2 steps, train loss 1.0, 336 KiB, 0.2 s)"),
     (14.0, "00:00:14 round 1: your update was admitted"),
     (15.0, "00:00:15 round 2: update sent (2 steps, train loss 1.0, 336 KiB, 0.2 s)")],
]


def test_parts_follow_the_volunteer_the_round_waited_for():
    rows = breakdown_module.breakdown(COORDINATOR, VOLUNTEERS, rounds=2)
    assert [row["round"] for row in rows] == [1, 2]
    first, second = rows
    assert first["dispatch_s"] is None and first["volunteer_s"] is None  # no outcome rides on round 1
    assert first["reply_s"] == pytest.approx(0.3) and first["close_s"] == pytest.approx(0.1)
    # round 2 waited for aaaa (admitted last): its task came at 13.9, its update left at 14.9
    assert second["dispatch_s"] == pytest.approx(0.2) and second["volunteer_s"] == pytest.approx(1.0)
    assert second["reply_s"] == pytest.approx(0.5) and second["next_s"] == pytest.approx(0.1)
    total = sum(second[k] for k in ("dispatch_s", "volunteer_s", "reply_s", "close_s", "next_s"))
    assert total == pytest.approx(15.6 - 13.7)  # the parts add up to the round's wall time
