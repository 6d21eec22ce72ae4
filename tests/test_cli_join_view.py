"""Issue 16: each volunteer's own line, "community adapter on your held-out data: loss X (your last
update alone: Y)", printed by `join` from the volunteer's `sent` status."""

from __future__ import annotations

import json

from loracommons import cli_join

LINE = "community adapter on your held-out data: loss {} (your last update alone: {})"

SENT = {"round": 4, "steps": 8, "train_loss": 0.41, "eval_loss": 0.52, "seconds": 2.0, "bytes": 4096,
        "digest": "ab" * 32}


def test_the_line_compares_the_community_adapter_with_the_last_update_alone():
    line = cli_join.community_line({**SENT, "community_loss": 0.61234, "own_loss": 0.70011})
    assert line == "round 4: " + LINE.format("0.612", "0.700")


def test_first_round_has_no_update_of_its_own_yet():
    line = cli_join.community_line({**SENT, "community_loss": 1.5, "own_loss": None})
    assert line == "round 4: " + LINE.format("1.500", "none yet")


def test_no_line_without_an_evaluation():
    assert cli_join.community_line({**SENT, "community_loss": None, "own_loss": None}) is None
    assert cli_join.community_line(SENT) is None  # a status from before the comparison existed


def test_join_view_prints_it_after_the_sent_line_and_keeps_it_in_the_status_file(tmp_path):
    status = tmp_path / "status.json"
    view = cli_join.JoinView(status, live=False)
    with cli_join.console.capture() as captured:
        view.event("sent", {**SENT, "community_loss": 0.61234, "own_loss": 0.70011})
    lines = captured.get().splitlines()
    assert "round 4: update sent" in lines[0]
    assert lines[1].endswith("round 4: " + LINE.format("0.612", "0.700"))

    state = json.loads(status.read_text())
    assert state["community_loss"] == 0.61234 and state["own_loss"] == 0.70011
